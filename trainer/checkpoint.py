"""Checkpoints: a directory that appears under its final name only when complete.

Layout of RUN/checkpoints/step-N/ (everything loads with safetensors or weights_only=True):

    model.safetensors, config.json, generation_config.json, processor files
                       (a plain Hugging Face folder: evaluate or export any checkpoint)
    optimizer.pt       AdamW state (consolidated on rank 0 under ZeRO-1)
    training.pt        step, data position, best metric, counters, scheduler, scaler
    rng.pt             python/numpy/torch/cuda RNG states, one entry per rank
    state.json         the same counters for humans; run_config.json, the resolved config

The directory is written as RUN/checkpoints/.tmp-step-N, every file fsynced, then renamed; a
crash at any point leaves at most a hidden temporary that the next save or resume removes.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from shard_builder.writer import fsync_dir

log = logging.getLogger("trainer")

CHECKPOINTS = "checkpoints"
BEST = "best"
STEP_PATTERN = re.compile(r"^step-(\d+)$")
CRASH_HOOK = "TRAINER_DEBUG_CRASH_IN_CHECKPOINT"  # tests: SIGKILL mid-write at this step


def _help(text: str, **kwargs: Any):
    return field(metadata={"help": text}, **kwargs)


@dataclass
class CheckpointConfig:
    save_every: int = _help(
        "write a checkpoint every N optimiser steps (and at the end; 0 = only at the end)",
        default=1000,
    )
    keep_last: int = _help("keep the newest N checkpoints (plus the best one)", default=3)
    resume: bool = _help(
        "continue from the newest complete checkpoint in the run folder", default=True
    )


# --- finding checkpoints ----------------------------------------------------------------------


def checkpoints_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINTS


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first. Temporaries are hidden (.tmp-*) and never listed."""
    folder = checkpoints_dir(run_dir)
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        match = STEP_PATTERN.match(path.name)
        if match and path.is_dir():
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


# --- RNG states -------------------------------------------------------------------------------


def capture_rng() -> dict[str, Any]:
    """This process's RNG states as plain tensors, tuples and ints (weights_only-loadable)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --- writing ----------------------------------------------------------------------------------


def _fsync_tree(folder: Path) -> None:
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    fsync_dir(folder)


def remove_temporaries(run_dir: str | Path) -> None:
    """Remove what an interrupted save left behind (hidden, so it was never visible)."""
    for folder in (checkpoints_dir(run_dir), Path(run_dir)):
        if folder.is_dir():
            for path in folder.glob(".tmp-*"):
                log.info("removing the unfinished write %s", path)
                shutil.rmtree(path, ignore_errors=True)


def save_hf_folder(model, processor, folder: Path) -> None:
    model.save_pretrained(folder, safe_serialization=True)
    processor.save_pretrained(folder)
    # transformers 5 folds the feature extractor into processor_config.json; faster-whisper and
    # older transformers read preprocessor_config.json (for the mel-bin count), so write both.
    processor.feature_extractor.to_json_file(str(Path(folder) / "preprocessor_config.json"))


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    model,
    processor,
    optimizer_state: dict[str, Any],
    training_state: dict[str, Any],
    rng_states: list[dict[str, Any]],
    run_config: dict[str, Any],
) -> Path:
    """Write RUN/checkpoints/step-N atomically (rank 0 only; the caller gathers the rest)."""
    final = checkpoints_dir(run_dir) / f"step-{step}"
    temporary = final.parent / f".tmp-step-{step}"
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir(parents=True)
    save_hf_folder(model, processor, temporary)
    if os.environ.get(CRASH_HOOK) == str(step):
        os.kill(os.getpid(), signal.SIGKILL)  # test hook: die half-way through the write
    torch.save(optimizer_state, temporary / "optimizer.pt")
    torch.save(training_state, temporary / "training.pt")
    torch.save(rng_states, temporary / "rng.pt")
    human = {k: v for k, v in training_state.items() if not isinstance(v, dict)}
    (temporary / "state.json").write_text(json.dumps(human, indent=2) + "\n")
    (temporary / "run_config.json").write_text(json.dumps(run_config, indent=2) + "\n")
    _fsync_tree(temporary)
    if final.exists():  # a checkpoint of the same step from an earlier attempt
        shutil.rmtree(final)
    os.replace(temporary, final)
    fsync_dir(final.parent)
    return final


def save_best(run_dir: str | Path, model, processor) -> Path:
    """RUN/best/: a plain HF folder, replaced by rename so it is always complete or absent."""
    run_dir = Path(run_dir)
    final, temporary, old = run_dir / BEST, run_dir / ".tmp-best", run_dir / ".tmp-best-old"
    shutil.rmtree(temporary, ignore_errors=True)
    save_hf_folder(model, processor, temporary)
    _fsync_tree(temporary)
    if final.exists():
        os.replace(final, old)
    os.replace(temporary, final)
    fsync_dir(run_dir)
    shutil.rmtree(old, ignore_errors=True)
    return final


def prune_checkpoints(run_dir: str | Path, keep_last: int, keep_steps: set[int]) -> None:
    """Delete all but the newest `keep_last` checkpoints and those in `keep_steps`."""
    found = list_checkpoints(run_dir)
    newest = {step for step, _ in found[-keep_last:]} if keep_last > 0 else set()
    for step, path in found:
        if step not in newest and step not in keep_steps:
            shutil.rmtree(path, ignore_errors=True)


# --- reading ----------------------------------------------------------------------------------


def load_model_weights(model, folder: Path) -> None:
    from safetensors.torch import load_model

    # load_model understands the tied decoder embedding / output projection that
    # save_pretrained stores once.
    load_model(model, folder / "model.safetensors", strict=True)


def load_training_files(folder: Path) -> tuple[dict, dict, list[dict]]:
    """(training state, optimizer state, per-rank RNG states), all with weights_only=True."""
    training = torch.load(folder / "training.pt", weights_only=True, map_location="cpu")
    optimizer = torch.load(folder / "optimizer.pt", weights_only=True, map_location="cpu")
    rng = torch.load(folder / "rng.pt", weights_only=True, map_location="cpu")
    return training, optimizer, rng
