"""Process-group helpers: who am I, talk to the others, and keep side effects on rank 0.

Everything works without torchrun too: a plain `python -m trainer` is rank 0 of a world of 1,
and then every collective here is a no-op.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from trainer.runtime import gpu, gpu_sharing


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup_distributed(device: str = "auto", timeout_minutes: float = 30.0) -> Dist:
    """Join the process group torchrun describes in the environment (if any) and pick a device.

    NCCL on CUDA, gloo otherwise: the CPU tests run two gloo ranks with the same code path.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    backend = gpu_sharing.process_group_backend(torch.device(device))
    if device == "cuda":
        # The GPU is made current before init: NCCL binds its communicator to it.
        torch_device = gpu.select_cuda_device(local_rank, backend)
        gpu_sharing.apply_memory_fraction(torch_device)
    else:
        torch_device = torch.device(device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(
            backend=backend,
            timeout=timedelta(minutes=timeout_minutes),
            device_id=torch_device if backend == "nccl" else None,
        )
    return Dist(rank=rank, world_size=world_size, local_rank=local_rank, device=torch_device)


def cleanup_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: Dist) -> None:
    if info.enabled:
        dist.barrier()


def print0(info: Dist, *args: Any, **kwargs: Any) -> None:
    """print on rank 0 only, flushed so interleaved logs from torchrun stay readable."""
    if info.is_main:
        print(*args, **kwargs, flush=True)


def any_rank(info: Dist, flag: bool) -> bool:
    """True on every rank when `flag` is true on at least one (an all-reduce of a single int)."""
    if not info.enabled:
        return flag
    value = torch.tensor([1 if flag else 0], dtype=torch.int32, device=_comm_device(info))
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def max_over_ranks(info: Dist, values: list[int]) -> list[int]:
    """The element-wise maximum of `values` over all ranks, on every rank (one all-reduce)."""
    if not info.enabled:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.int64, device=_comm_device(info))
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor.tolist()


def all_reduce_sum(info: Dist, values: list[float]) -> list[float]:
    if not info.enabled:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=_comm_device(info))
    dist.all_reduce(tensor)
    return tensor.tolist()


def gather_objects(info: Dist, obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order, on every rank (pickled; keep it small)."""
    if not info.enabled:
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(info: Dist, obj: Any) -> Any:
    """Rank 0's `obj` on every rank."""
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _comm_device(info: Dist) -> torch.device:
    # NCCL only moves CUDA tensors; gloo only CPU ones.
    return info.device if info.device.type == "cuda" else torch.device("cpu")
