"""Several ranks on one GPU, each held to a smaller card's memory: how bench/gpu_check.sh
proves the two-GPU path on the one GPU it is lent.

Read from the environment by `distributed.setup_distributed` (not training settings: a real run
sets neither):

    TRAINER_DIST_BACKEND=gloo       the process group's backend. NCCL refuses two ranks on one
                                    device; gloo moves CUDA tensors through host memory, slowly
                                    but with the same DDP and ZeRO code path.
    TRAINER_MEMORY_FRACTION=0.107   torch.cuda.set_per_process_memory_fraction for this rank:
                                    its caching allocator fails past that share of the device's
                                    memory, as it would on the smaller card.

With fewer visible GPUs than ranks on a machine, gloo ranks share them round-robin
(LOCAL_RANK modulo the device count, `gpu.cuda_device_index`); NCCL ranks get a clear error.
"""

from __future__ import annotations

import os

import torch

BACKEND_VARIABLE = "TRAINER_DIST_BACKEND"
FRACTION_VARIABLE = "TRAINER_MEMORY_FRACTION"
BACKENDS = ("nccl", "gloo")


def process_group_backend(device: torch.device, environ=os.environ) -> str:
    """NCCL on CUDA and gloo elsewhere, unless TRAINER_DIST_BACKEND names one."""
    chosen = environ.get(BACKEND_VARIABLE, "").strip().lower()
    if not chosen:
        return "nccl" if device.type == "cuda" else "gloo"
    if chosen not in BACKENDS:
        raise ValueError(f"{BACKEND_VARIABLE}={chosen!r}: expected one of {', '.join(BACKENDS)}")
    if chosen == "nccl" and device.type != "cuda":
        raise ValueError(f"{BACKEND_VARIABLE}=nccl needs CUDA; this rank runs on {device}")
    return chosen


def memory_fraction(environ=os.environ) -> float | None:
    """TRAINER_MEMORY_FRACTION as a float in (0, 1], or None when unset."""
    value = environ.get(FRACTION_VARIABLE, "").strip()
    if not value:
        return None
    try:
        fraction = float(value)
    except ValueError:
        raise ValueError(f"{FRACTION_VARIABLE}={value!r} is not a number") from None
    if not 0 < fraction <= 1:
        raise ValueError(f"{FRACTION_VARIABLE}={value!r}: expected a share in (0, 1]")
    return fraction


def apply_memory_fraction(device: torch.device, environ=os.environ) -> float | None:
    """Cap this process's CUDA allocator at TRAINER_MEMORY_FRACTION of the device, if set."""
    fraction = memory_fraction(environ)
    if fraction is not None and device.type == "cuda":
        torch.cuda.set_per_process_memory_fraction(fraction, device)
    return fraction


def memory_cap_bytes(device: torch.device, environ=os.environ) -> int | None:
    """Bytes this process's allocator may hold under the cap (None: no cap). What fits the
    card (`--batch-size auto`) must take the smaller of this and the device's free memory."""
    fraction = memory_fraction(environ)
    if fraction is None or device.type != "cuda":
        return None
    return int(fraction * torch.cuda.get_device_properties(device).total_memory)
