"""The CUDA device of a rank: which one it is, how its allocator is set up, and what it holds.

Nothing here needs a GPU to import; without CUDA the functions are no-ops or a clear error.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

import torch

# Either name configures the caching allocator (PYTORCH_ALLOC_CONF is torch's newer spelling).
ALLOC_CONF_NAMES = ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")
EXPANDABLE_SEGMENTS = "expandable_segments:True"


def configure_allocator(environ: MutableMapping[str, str] = os.environ) -> str:
    """Ask for expandable segments unless the user configured the allocator; say which.

    Packed batches change the decoder length every step and `generate` under autocast caches
    float16 weight copies: with fixed-size segments the free memory ends up in pieces too small
    for the next request, and the run dies of fragmentation with gigabytes "reserved but
    unallocated". The allocator reads the variable once, when CUDA initialises: call this first.
    """
    for name in ALLOC_CONF_NAMES:
        if name in environ:
            return f"{name}={environ[name]} (set by you)"
    if torch.cuda.is_initialized():  # (a flag: asking it initialises nothing)
        return "CUDA was initialised before the trainer could set expandable_segments"
    environ[ALLOC_CONF_NAMES[0]] = EXPANDABLE_SEGMENTS
    return f"{ALLOC_CONF_NAMES[0]}={EXPANDABLE_SEGMENTS}"


def cuda_device_index(local_rank: int, visible: int, backend: str = "nccl") -> int:
    """The index, among the visible GPUs, for the process with this LOCAL_RANK.

    One GPU visible (a scheduler or a per-rank CUDA_VISIBLE_DEVICES gives each process its own
    card, or one card is shared on purpose): that one, index 0. Several: one per local rank;
    gloo ranks may share them round-robin (trainer/runtime/gpu_sharing.py), NCCL ranks may not.
    """
    if visible == 0:
        raise ValueError(
            "--device cuda, but no CUDA device is visible (CUDA_VISIBLE_DEVICES="
            f"{os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')!r}): check the driver, or use "
            "--device cpu"
        )
    if visible == 1:
        return 0
    if local_rank >= visible and backend == "gloo":
        return local_rank % visible
    if local_rank >= visible:
        raise ValueError(
            f"LOCAL_RANK {local_rank} but only {visible} GPUs are visible to this process: start "
            f"at most {visible} processes per machine (torchrun --nproc_per_node={visible}), or "
            "make exactly one GPU visible to each process"
        )
    return local_rank


def select_cuda_device(local_rank: int, backend: str = "nccl") -> torch.device:
    """Make this rank's GPU the current device (before NCCL binds its communicator to it)."""
    index = cuda_device_index(local_rank, torch.cuda.device_count(), backend)
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def check_bf16(device: torch.device) -> None:
    """bf16 autocast on a card without bfloat16 units is emulated at a fraction of the speed, or
    fails inside a kernel; refuse it at setup instead. (Asks the current device, which the
    trainer has made this one; without CUDA there is no card to ask: trainer.plan plans for one.)
    """
    if device.type != "cuda" or not torch.cuda.is_available():
        return
    if not torch.cuda.is_bf16_supported(including_emulation=False):
        major, minor = torch.cuda.get_device_capability(device)
        raise ValueError(
            f"--precision bf16, but {torch.cuda.get_device_name(device)} (compute capability "
            f"{major}.{minor}) has no bfloat16 support (it needs 8.0, Ampere, or newer): use "
            "--precision fp16 (autocast + GradScaler) or fp32"
        )


def memory_reading(device: torch.device) -> dict[str, float]:
    """Peak GiB allocated (tensors) and reserved (the allocator's segments, what the card sees
    as used) on this rank's GPU since the last reading; the peaks restart from here."""
    if device.type != "cuda":
        return {}
    reading = {
        "allocated": torch.cuda.max_memory_allocated(device) / 2**30,
        "reserved": torch.cuda.max_memory_reserved(device) / 2**30,
    }
    torch.cuda.reset_peak_memory_stats(device)
    return reading


def memory_metrics(readings: list[dict[str, float]]) -> dict[str, float]:
    """Every rank's readings (in rank order) as scalars: the largest over the ranks, and each
    rank's own, since ranks differ (rank 0 evaluates and writes, ZeRO shares are unequal)."""
    if not all(readings):  # not on CUDA (every rank runs on the same kind of device)
        return {}
    metrics = {
        "gpu_memory_gb": max(reading["allocated"] for reading in readings),
        "gpu_reserved_gb": max(reading["reserved"] for reading in readings),
    }
    for rank, reading in enumerate(readings):
        metrics[f"rank{rank}/gpu_allocated_gb"] = reading["allocated"]
        metrics[f"rank{rank}/gpu_reserved_gb"] = reading["reserved"]
    return metrics
