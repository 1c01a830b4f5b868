"""Peak GPU memory of each phase of a run, per rank, beside what `trainer.plan` predicts.

RUN/memory/rank<R>.jsonl gets one line per phase occurrence:

    {"phase": "evaluation", "step": 1000, "session_start": 0,
     "allocated": <bytes>, "reserved": <bytes>}

from `torch.cuda.max_memory_allocated` / `max_memory_reserved` since the phase began. Phases,
named as the plan names them: `first_step` (a fresh run's first optimiser step) or
`first_step_after_resume` (it includes loading the checkpoint onto the device),
`training_step` (the largest of the other steps since the previous record), `evaluation`,
`checkpoint_write`. Nothing is recorded off CUDA. The peak counters are reset after the first
step and around evaluation and checkpoint writes, so the periodic `gpu_memory_gb` scalar covers
training steps only.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch


class PhasePeaks:
    def __init__(
        self,
        run_dir: str | Path,
        rank: int,
        device: torch.device,
        session_start: int,
        read: Callable[[], tuple[int, int]] | None = None,
        reset: Callable[[], None] | None = None,
    ) -> None:
        self.enabled = device.type == "cuda" or read is not None
        self.read = read or (lambda: cuda_peaks(device))
        self.reset = reset or (lambda: torch.cuda.reset_peak_memory_stats(device))
        self.path = Path(run_dir) / "memory" / f"rank{rank}.jsonl"
        self.session_start = session_start
        self.first = "first_step_after_resume" if session_start > 0 else "first_step"
        self.steps = 0
        self.training: tuple[int, int, int] | None = None  # allocated, reserved, last step

    def step_done(self, step: int) -> None:
        """After each optimiser step: the first is a phase of its own, the rest are folded into
        one training_step record written before the next evaluation or checkpoint."""
        if not self.enabled:
            return
        self.steps += 1
        allocated, reserved = self.read()
        if self.steps == 1:
            self._write(self.first, step, allocated, reserved)
            self.reset()
            return
        if self.training is not None:
            allocated = max(allocated, self.training[0])
            reserved = max(reserved, self.training[1])
        self.training = (allocated, reserved, step)

    @contextmanager
    def phase(self, name: str, step: int) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        self._flush_training()
        self.reset()
        yield
        allocated, reserved = self.read()
        self._write(name, step, allocated, reserved)
        self.reset()

    def _flush_training(self) -> None:
        if self.training is not None:
            allocated, reserved, step = self.training
            self._write("training_step", step, allocated, reserved)
            self.training = None

    def _write(self, phase: str, step: int, allocated: int, reserved: int) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        record = {"phase": phase, "step": step, "session_start": self.session_start}
        record.update(allocated=int(allocated), reserved=int(reserved))
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")


def cuda_peaks(device: torch.device) -> tuple[int, int]:
    return torch.cuda.max_memory_allocated(device), torch.cuda.max_memory_reserved(device)


def read_records(run_dir: str | Path) -> dict[int, list[dict]]:
    """rank -> its records, in the order written."""
    found = {}
    for path in sorted((Path(run_dir) / "memory").glob("rank*.jsonl")):
        rank = int(path.stem.removeprefix("rank"))
        found[rank] = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return found
