"""Running the loop on the hardware: processes and collectives (distributed, gpu_sharing), the
device and its memory (gpu, memory_phases), the batch that fits the card (fit), the optimiser
and its precision (optim), checkpoints (checkpoint), stopping on a signal or the clock
(preemption), and resuming on another number of GPUs (elastic)."""
