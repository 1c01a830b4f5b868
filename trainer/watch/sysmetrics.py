"""System metrics at every log step, and the warnings a day-long run needs before it is too late.

Every rank measures itself (GPU memory allocated, reserved and peak; GPU utilisation and power
through NVML; the process's RSS and the machine's free RAM); the figures are gathered to rank 0,
which adds what only it needs to know (free disk where the run folder and the shards live, the
loader wait share of all ranks) and sends everything to the three sinks as `system/...`.

NVML (`nvidia-ml-py`, imported as `pynvml`) is optional at run time: on a machine without an
NVIDIA driver the utilisation and power figures are simply absent. The same holds for CUDA
memory on a CPU run.

Two warnings, on rank 0:

- the loader wait share (time spent waiting for the next batch / step time) above a threshold
  for several log steps in a row: the GPUs starve, so the fix is more loader workers or shards
  on a faster (local) disk, not a smaller model;
- before a checkpoint, a run folder whose disk cannot hold one more checkpoint (the size of the
  newest one on disk, or estimated from the parameter count before the first).
"""

from __future__ import annotations

import contextlib
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from trainer.runtime import checkpoint as ckpt
from trainer.runtime import distributed
from trainer.runtime.distributed import Dist

GIB = 2**30


def _help(text: str, **kwargs: Any):
    return field(metadata={"help": text}, **kwargs)


@dataclass
class SystemConfig:
    system_metrics: bool = _help(
        "log GPU memory, utilisation and power, RSS, free RAM and disk, loader wait share at "
        "every log step (system/...)",
        default=True,
    )
    loader_wait_warning: float = _help(
        "warn when the loader wait share (time waiting for batches / step time) stays above "
        "this share of the step",
        default=0.2,
    )
    loader_wait_log_steps: int = _help(
        "... for this many log steps in a row (one warning per such stretch)", default=3
    )


# --- what each rank measures --------------------------------------------------------------------


def open_nvml(device: torch.device) -> Any:
    """NVML's handle of this rank's GPU, or None (no CUDA, no driver, no nvidia-ml-py)."""
    if device.type != "cuda":
        return None
    try:
        import pynvml

        pynvml.nvmlInit()
        index = device.index if device.index is not None else torch.cuda.current_device()
        # NVML numbers the machine's GPUs, CUDA the visible ones: match by UUID.
        uuid = str(torch.cuda.get_device_properties(index).uuid)
        try:
            return pynvml.nvmlDeviceGetHandleByUUID(f"GPU-{uuid}")
        except pynvml.NVMLError:
            return pynvml.nvmlDeviceGetHandleByIndex(index)
    except Exception:  # any failure only means no utilisation figures
        return None


def rank_figures(device: torch.device, nvml: Any) -> dict[str, float]:
    """This rank's own figures (GiB, %, W). The CUDA peaks since the last log step are the
    training scalars' (`gpu.memory_reading`, which resets them): read in one place only."""
    import psutil

    figures: dict[str, float] = {}
    if device.type == "cuda":
        figures["gpu_allocated_gb"] = torch.cuda.memory_allocated(device) / GIB
        figures["gpu_reserved_gb"] = torch.cuda.memory_reserved(device) / GIB
    if nvml is not None:
        figures.update(_nvml_figures(nvml))
    figures["rss_gb"] = psutil.Process().memory_info().rss / GIB
    figures["ram_free_gb"] = psutil.virtual_memory().available / GIB
    return figures


def _nvml_figures(handle: Any) -> dict[str, float]:
    import pynvml

    figures = {}
    with contextlib.suppress(pynvml.NVMLError):  # a GPU may not report one of them
        figures["gpu_utilisation_pct"] = float(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu)
    with contextlib.suppress(pynvml.NVMLError):
        figures["gpu_power_w"] = pynvml.nvmlDeviceGetPowerUsage(handle) / 1000.0  # milliwatts
    return figures


def free_disk_gb(path: str | Path) -> float | None:
    """Free space on the disk holding `path` (its nearest existing parent), or None."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free / GIB
    except OSError:
        return None


# --- rank 0: the loader and the disk ---------------------------------------------------------


class LoaderWatch:
    """Says once per stretch when the loader wait share stays above the threshold."""

    def __init__(self, threshold: float, log_steps: int, num_workers: int) -> None:
        self.threshold, self.log_steps, self.num_workers = threshold, log_steps, num_workers
        self.streak = 0

    def update(self, share: float) -> str | None:
        self.streak = self.streak + 1 if share > self.threshold else 0
        if self.streak != self.log_steps:
            return None
        return (
            f"data loading is the bottleneck: the ranks spent {100 * share:.0f} % of the last "
            f"steps waiting for batches (above {100 * self.threshold:.0f} % for {self.log_steps} "
            f"log steps in a row). Raise --num-workers (now {self.num_workers}) if the CPUs have "
            "room, and keep the shards (or --shard-cache for shards at a URL) on a local disk, "
            "not a network folder"
        )


def checkpoint_bytes(run_dir: str | Path, model: torch.nn.Module) -> int:
    """The newest checkpoint's size on disk, or before the first one the weights plus AdamW's
    two fp32 moments per trainable parameter (what optimizer.pt holds)."""
    saved = ckpt.list_checkpoints(run_dir)
    if saved:
        folder = saved[-1][1]
        return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    moments = sum(2 * 4 * p.numel() for p in model.parameters() if p.requires_grad)
    return weights + moments


def checkpoint_space_warning(run_dir: str | Path, model: torch.nn.Module) -> str | None:
    """A warning when the run folder's disk has less room than one more checkpoint takes."""
    free = free_disk_gb(run_dir)
    needed = checkpoint_bytes(run_dir, model) / GIB
    if free is None or free >= needed:
        return None
    return (
        f"the run folder's disk has {free:.2f} GiB free but a checkpoint takes ~{needed:.2f} GiB: "
        "this save will probably fail. Free space there, lower --keep-last, or move the run "
        "folder (--output-dir) to a larger disk; the run resumes from the last complete "
        "checkpoint"
    )


# --- the monitor the loop calls --------------------------------------------------------------


class SystemMonitor:
    """Called on every rank at every log step (it gathers, so all ranks must call it)."""

    def __init__(
        self, config: SystemConfig, info: Dist, run_dir: Path, shard_dir: Path, num_workers: int
    ) -> None:
        self.config, self.info = config, info
        self.run_dir, self.shard_dir = run_dir, shard_dir
        self.nvml = open_nvml(info.device) if config.system_metrics else None
        self.loader = LoaderWatch(
            config.loader_wait_warning, config.loader_wait_log_steps, num_workers
        )

    def figures(self, loader_wait_share: float) -> dict[str, float] | None:
        """Every rank's figures by name on rank 0 (rank<R>/...); None on the others."""
        per_rank = distributed.gather_objects(self.info, rank_figures(self.info.device, self.nvml))
        if not self.info.is_main:
            return None
        values = {
            f"rank{rank}/{name}": value
            for rank, figures in enumerate(per_rank)
            for name, value in figures.items()
        }
        values["loader_wait_share"] = loader_wait_share
        for name, path in (
            ("disk_free_run_gb", self.run_dir),
            ("disk_free_shards_gb", self.shard_dir),
        ):
            free = free_disk_gb(path)
            if free is not None:
                values[name] = free
        return values

    def log(self, step: int, loader_wait_share: float, logger) -> None:
        if self.config.system_metrics:
            values = self.figures(loader_wait_share)
            if values is not None:
                logger.scalars(step, values, kind="system")
        if self.info.is_main and (warning := self.loader.update(loader_wait_share)):
            logger.warning("%s", warning)
