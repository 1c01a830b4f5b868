"""Helpers for the trainer tests: run the real entry point in a subprocess, read a run folder.

Not a test module (no test_ prefix); imported by tests/test_{loop,checkpoint,evaluate,ddp}.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
TINY_MODEL = REPO / "config" / "models" / "tiny-whisper-de"

# Small and fast on two CPU cores: the tiny preset, 2 samples per micro-batch, few tokens decoded.
FAST = [
    "--config",
    str(REPO / "config" / "demo-tiny.toml"),
    "--device",
    "cpu",
    "--batch-size",
    "2",
    "--bucket-buffer",
    "8",
    "--num-workers",
    "1",
    "--grad-accum",
    "2",
    "--lr",
    "3e-3",
    "--warmup-steps",
    "0",
    "--eval-batch-size",
    "8",
    "--eval-limit",
    "8",
    "--max-new-tokens",
    "8",
    "--log-every",
    "1",
    "--progress",
    "false",
    "--tensorboard",
    "false",
    "--sample-log",
    "true",
]


def trainer_command(nproc: int, shards: Path, run_dir: Path, *extra: str) -> list[str]:
    if nproc == 1:
        launcher = [sys.executable, "-m", "trainer"]
    else:
        launcher = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(nproc),
            "--master_port",
            str(_free_port()),
            "-m",
            "trainer",
        ]
    return [*launcher, *FAST, "--shards", str(shards), "--output-dir", str(run_dir), *extra]


def run_trainer(
    nproc: int,
    shards: Path,
    run_dir: Path,
    *extra: str,
    env: dict | None = None,
    timeout: float = 300,
) -> subprocess.CompletedProcess:
    """Run `python -m trainer` (or torchrun with `nproc` ranks); on a timeout, say which rank
    stopped where (from the per-rank sample logs) and kill the whole process group."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1" if nproc > 1 else "2", **(env or {})}
    full_env.pop("RUNS_DIR", None)
    full_env.pop("SHARDS_DIR", None)
    process = subprocess.Popen(
        trainer_command(nproc, shards, run_dir, *extra),
        cwd=REPO,
        env=full_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        kill_processes_of(run_dir)  # torchrun starts its ranks in sessions of their own
        output, _ = process.communicate(timeout=60)
        where = {rank: last_step(run_dir, rank) for rank in range(nproc)}
        raise AssertionError(
            f"trainer timed out after {timeout} s; last step logged per rank: {where} "
            f"(a rank behind the others is the one that hung)\n{output[-4000:]}"
        ) from None
    return subprocess.CompletedProcess(process.args, process.returncode, output, "")


def kill_processes_of(run_dir: Path) -> None:
    """SIGKILL every process whose command line names `run_dir` (ranks, loader workers): a
    killed launcher's ranks live on in their own sessions and hold the output pipe open."""
    import psutil

    for proc in psutil.process_iter(["cmdline"]):
        if str(run_dir) in " ".join(proc.info["cmdline"] or []):
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def sample_log(run_dir: Path, rank: int) -> dict[int, dict]:
    """iteration -> entry of RUN/debug/samples-rank<R>.jsonl; a resumed run's entry wins.

    An iteration is one pass of grad_accum micro-batches: a step, or a skipped attempt at one
    (which leaves `step` where it was). Without skips the two numbers are the same."""
    path = Path(run_dir) / "debug" / f"samples-rank{rank}.jsonl"
    if not path.exists():
        return {}
    entries = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {entry.get("iteration", entry["step"]): entry for entry in entries}


def last_step(run_dir: Path, rank: int) -> int | None:
    """The optimiser step the last logged iteration ended at."""
    entries = sample_log(run_dir, rank)
    return entries[max(entries)]["step"] if entries else None


def metrics(run_dir: Path, kind: str = "train") -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [row for row in rows if row["kind"] == kind]


def weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(folder) / "model.safetensors"))


def spawn_ranks(fn, args: tuple, nprocs: int = 2, seconds: float = 180) -> None:
    """Run fn(rank, *args) in `nprocs` spawned processes; fail (instead of hanging CI) naming
    the ranks still running after `seconds`. A rank's exception fails the caller too."""
    import time

    import pytest
    import torch.multiprocessing as mp

    context = mp.start_processes(fn, args=args, nprocs=nprocs, join=False, start_method="spawn")
    deadline = time.monotonic() + seconds
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            alive = [i for i, p in enumerate(context.processes) if p.exitcode is None]
            for process in context.processes:
                process.kill()
            pytest.fail(f"ranks {alive} still running after {seconds} s: killed")
