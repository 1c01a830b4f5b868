"""Checkpoints: a directory that appears under its final name only when complete.

Layout of RUN/checkpoints/step-N/ (everything loads with safetensors or weights_only=True):

    model.safetensors, config.json, generation_config.json, processor files
                       (a plain Hugging Face folder: evaluate or export any checkpoint)
    optimizer-rank{R}-of-{W}.pt
                       under ZeRO-1: each rank's own share of the AdamW state, written by that
                       rank (the state dict of ZeroRedundancyOptimizer's inner optimiser, with
                       its parameters' names: another world size merges and re-splits them)
    optimizer.pt       without ZeRO-1: the whole AdamW state, written by rank 0 (every rank
                       holds the same one and loads this file)
    training.pt        step, data position, best metric, counters, scheduler, scaler
    rng.pt             python/numpy/torch RNG states and the CUDA state of the rank's own
                       device, one entry per rank
    state.json         the same counters for humans; run_config.json, the resolved config

The directory is written as RUN/checkpoints/.tmp-step-N: rank 0 creates it, every rank writes
and fsyncs its files, a barrier, then rank 0 checks that every shard is there and renames it. A
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
from trainer.runtime.distributed import Dist, barrier

log = logging.getLogger("trainer")

CHECKPOINTS = "checkpoints"
BEST = "best"
OPTIMIZER = "optimizer.pt"
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
    save_every_minutes: float = _help(
        "also write one when this many minutes of wall time have passed since the last "
        "(whichever comes first; fractions allowed; 0 = off): ~140 steps on 2 x 16 GB GPUs",
        default=30.0,
    )
    keep_last: int = _help("keep the newest N checkpoints (plus the best one)", default=3)
    resume: bool = _help(
        "continue from the newest complete checkpoint in the run folder", default=True
    )

    def validate(self) -> None:
        if self.save_every_minutes < 0:
            raise ValueError(
                f"checkpoint.save_every_minutes must be 0 (off) or more, not "
                f"{self.save_every_minutes}"
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


def capture_rng(device: torch.device) -> dict[str, Any]:
    """This process's RNG states as plain tensors, tuples and ints (weights_only-loadable).

    CUDA: the state of the run's own device only. get_rng_state_all would cover every visible
    GPU, and with one GPU visible per process a restore could not map it back."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else [],
    }


def restore_rng(state: dict[str, Any], device: torch.device) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    cuda = state["cuda"]
    if isinstance(cuda, list):  # an older checkpoint: one state per visible device
        cuda = cuda[device.index] if device.type == "cuda" and device.index < len(cuda) else None
    if cuda is not None and device.type == "cuda":
        torch.cuda.set_rng_state(cuda, device)


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


def optimizer_shard_file(rank: int, world_size: int) -> str:
    return f"optimizer-rank{rank}-of-{world_size}.pt"


def save_checkpoint(
    info: Dist,
    run_dir: str | Path,
    step: int,
    model,
    processor,
    optimizer_state: dict[str, Any] | None,
    sharded: bool,
    training_state: dict[str, Any] | None,
    rng_states: list[dict[str, Any]],
    run_config: dict[str, Any] | None,
) -> Path:
    """Write RUN/checkpoints/step-N atomically; every rank calls this.

    `sharded`: every rank passes its own share of the optimiser state (ZeRO-1) and writes it
    itself, so no rank ever holds another's; otherwise only rank 0's `optimizer_state` is used.
    The model, `training_state`, `rng_states` (all ranks') and `run_config` matter on rank 0.
    """
    final = checkpoints_dir(run_dir) / f"step-{step}"
    temporary = final.parent / f".tmp-step-{step}"
    if info.is_main:
        shutil.rmtree(temporary, ignore_errors=True)
        temporary.mkdir(parents=True)
    barrier(info)  # the folder exists before any rank writes into it
    if sharded:
        _save_synced(optimizer_state, temporary / optimizer_shard_file(info.rank, info.world_size))
    if info.is_main:
        save_hf_folder(model, processor, temporary)
        if os.environ.get(CRASH_HOOK) == str(step):
            os.kill(os.getpid(), signal.SIGKILL)  # test hook: die half-way through the write
        if not sharded:
            torch.save(optimizer_state, temporary / OPTIMIZER)
        torch.save(training_state, temporary / "training.pt")
        torch.save(rng_states, temporary / "rng.pt")
        human = {k: v for k, v in training_state.items() if not isinstance(v, dict)}
        (temporary / "state.json").write_text(json.dumps(human, indent=2) + "\n")
        (temporary / "run_config.json").write_text(json.dumps(run_config, indent=2) + "\n")
        _fsync_tree(temporary)
    barrier(info)  # every rank's shard is written and fsynced: only now may the name appear
    if info.is_main:
        expected = (
            [optimizer_shard_file(r, info.world_size) for r in range(info.world_size)]
            if sharded
            else [OPTIMIZER]
        )
        missing = [name for name in expected if not (temporary / name).is_file()]
        if missing:  # a rank wrote somewhere else (a run folder that is not shared?)
            raise RuntimeError(f"{temporary} lacks {', '.join(missing)} after every rank wrote")
        if final.exists():  # a checkpoint of the same step from an earlier attempt
            shutil.rmtree(final)
        os.replace(temporary, final)
        fsync_dir(final.parent)
    return final


def _save_synced(obj: Any, path: Path) -> None:
    torch.save(obj, path)
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


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


def load_training_files(folder: Path) -> tuple[dict, list[dict]]:
    """(training state, per-rank RNG states), both with weights_only=True."""
    training = torch.load(folder / "training.pt", weights_only=True, map_location="cpu")
    rng = torch.load(folder / "rng.pt", weights_only=True, map_location="cpu")
    return training, rng


SHARD_PATTERN = re.compile(r"^optimizer-rank(\d+)-of-(\d+)\.pt$")


def load_optimizer_state(
    folder: Path,
    rank: int,
    world_size: int,
    sharded: bool = True,
    wanted: list[list[str]] | None = None,
) -> tuple[dict, bool]:
    """(this rank's optimiser state, whether it is indexed like its local optimiser: a shard),
    weights_only=True. `sharded`: this run uses ZeRO-1; `wanted`: the names of this rank's
    optimiser parameters per group (optim.parameter_names).

    This rank's own shard of the same world size is loaded as it is; a whole state
    (optimizer.pt) too, ZeRO picking its share. Shards of another world size (or loaded without
    ZeRO-1) are merged by parameter name into this rank's share, read one file at a time and
    memory-mapped, so the host holds this rank's share and never the whole state at once.

    Read into host memory: the optimiser's own load_state_dict moves each tensor onto its
    parameter's device, so the device never holds the state twice.
    """
    shard = folder / optimizer_shard_file(rank, world_size)
    if sharded and shard.is_file():
        return _without_names(torch.load(shard, weights_only=True, map_location="cpu")), True
    whole = folder / OPTIMIZER
    if whole.is_file():
        return _without_names(torch.load(whole, weights_only=True, map_location="cpu")), False
    shards = _saved_shards(folder)
    if not shards:
        raise ValueError(f"{folder} holds neither {shard.name} nor {OPTIMIZER}")
    if wanted is None:
        raise ValueError(f"{folder} holds ZeRO-1 shards of another world size: pass `wanted`")
    return merged_shard(shards, wanted), True


def _without_names(state: dict) -> dict:
    from trainer.runtime.optim import PARAM_NAMES

    state.pop(PARAM_NAMES, None)
    return state


def _saved_shards(folder: Path) -> list[Path]:
    """The ZeRO-1 shard files, rank order, once every rank of their world size is there."""
    found = {}
    for path in folder.glob("optimizer-rank*-of-*.pt"):
        if match := SHARD_PATTERN.match(path.name):
            found[(int(match.group(2)), int(match.group(1)))] = path
    sizes = {size for size, _ in found}
    if len(sizes) > 1:
        raise ValueError(f"{folder} holds optimiser shards of several world sizes {sorted(sizes)}")
    if not sizes:
        return []
    size = sizes.pop()
    missing = [optimizer_shard_file(r, size) for r in range(size) if (size, r) not in found]
    if missing:
        raise ValueError(f"{folder} lacks {', '.join(missing)}")
    return [found[(size, r)] for r in range(size)]


def merged_shard(shards: list[Path], wanted: list[list[str]]) -> dict:
    """The state dict of an optimiser over the parameters `wanted` (names per group), merged
    by name from the shards of another world size."""
    from trainer.runtime.optim import PARAM_NAMES

    names_wanted = {name for group in wanted for name in group}
    by_name: dict[str, dict] = {}
    hyperparameters: list[dict] | None = None
    for path in shards:
        saved = torch.load(path, weights_only=True, map_location="cpu", mmap=True)
        if PARAM_NAMES not in saved:
            raise ValueError(
                f"{path} was written without parameter names, so its share cannot be re-split: "
                f"resume on {len(shards)} rank(s) with --zero1 true, or start a new run folder"
            )
        for names, group in zip(saved[PARAM_NAMES], saved["param_groups"], strict=True):
            for name, index in zip(names, group["params"], strict=True):
                if name in names_wanted and index in saved["state"]:
                    by_name[name] = _copied(saved["state"][index])  # off the mapped file
        if hyperparameters is None:
            hyperparameters = [
                {k: v for k, v in group.items() if k != "params"} for group in saved["param_groups"]
            ]
        del saved
    missing = sorted(names_wanted - set(by_name))
    if by_name and missing:  # none at all is a state saved before any step
        raise ValueError(
            f"the optimiser shards in {shards[0].parent} hold no state for {len(missing)} "
            f"trainable parameter(s) ({', '.join(missing[:3])}, ...): the model's trainable "
            "parameters differ from the run that wrote them"
        )
    if len(hyperparameters) != len(wanted):
        raise ValueError(
            f"the optimiser shards in {shards[0].parent} have {len(hyperparameters)} parameter "
            f"group(s), this optimiser {len(wanted)}"
        )
    state, groups, index = {}, [], 0
    for names, group in zip(wanted, hyperparameters, strict=True):
        indices = []
        for name in names:
            if name in by_name:
                state[index] = by_name[name]
            indices.append(index)
            index += 1
        groups.append({**group, "params": indices})
    return {"state": state, "param_groups": groups}


def _copied(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, dict):
        return {k: _copied(v) for k, v in value.items()}
    return value
