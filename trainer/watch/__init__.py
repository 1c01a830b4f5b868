"""Watching a run: the log, TensorBoard and WER figures (metrics), host and GPU readings
(sysmetrics), Weights & Biases (wandb_sink), and the end-of-run files (summary)."""
