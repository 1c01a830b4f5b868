"""Resume on another number of GPUs: keep the data streams and the global batch, derive the rest.

The order of batches and optimiser steps (trainer/data/sampling.py) depends on the number of data
streams V and on the global batch, the loader batches per optimiser step of all ranks together
(ranks x grad_accum), never on the ranks themselves. A checkpoint records both and its data
position in global batches, so a run written on R ranks resumes on R' ranks when

    V % (R' x K') == 0   (K' loader workers per rank, num_workers 0 counting as 1)
    R' x A' == R x A      (A = grad_accum)

When the user changes only the GPU count, A' = R x A / R' is derived here and logged, and K' is
lowered until it divides V / R' (logged too); anything else is refused with the GPU counts,
grad_accum and num_workers that would work. Every optimiser step then trains on exactly the
batches it would have trained on without the change: exact as a set, not bit-exact (the
gradient sums run in another order, and each rank's dropout stream is another's).
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

from trainer.data import sampling


def resume_config(
    config, training: dict[str, Any], world_size: int, log: logging.Logger, folder: Path
):
    """`config` with the checkpoint's data streams and the grad_accum and num_workers that keep
    its global batch on `world_size` ranks; ValueError when no such setting exists."""
    saved = training["data_signature"]
    if "streams" not in saved:
        raise ValueError(
            f"{folder} was written before data streams (data.streams) made the data order "
            "independent of the number of ranks: resume it with the version that wrote it, or "
            "start a new run folder"
        )
    streams, global_batch = saved["streams"], saved["global_batch"]
    saved_world = training["world_size"]
    saved_accum = global_batch // saved_world
    data, optim = config.data, config.optim
    if data.streams not in (0, streams):
        raise ValueError(
            f"{folder}: its data order has {streams} data streams, --streams asks for "
            f"{data.streams}: set --streams {streams} (or 0, auto, keeps it) to resume"
        )
    accum = optim.grad_accum
    if world_size * accum != global_batch:
        derivable = accum == saved_accum and global_batch % world_size == 0
        if not derivable or streams % world_size:
            raise ValueError(
                f"{folder}: {refusal(streams, global_batch, saved_world, world_size, accum)}"
            )
        accum = global_batch // world_size
        log.info(
            "resuming on %d rank(s) instead of %d: grad_accum %d -> %d keeps the global batch "
            "of %d loader batches per optimiser step",
            world_size,
            saved_world,
            optim.grad_accum,
            accum,
            global_batch,
        )
    if streams % world_size:
        raise ValueError(
            f"{folder}: {refusal(streams, global_batch, saved_world, world_size, accum)}"
        )
    workers = fitting_workers(streams, world_size, data.num_workers)
    if workers != data.num_workers:
        log.info(
            "num_workers %d -> %d: %d data streams split evenly over %d rank(s) x %d worker(s)",
            data.num_workers,
            workers,
            streams,
            world_size,
            sampling.effective_workers(workers),
        )
    return replace(
        config,
        data=replace(data, streams=streams, num_workers=workers),
        optim=replace(optim, grad_accum=accum),
    )


def fitting_workers(streams: int, world_size: int, num_workers: int) -> int:
    """The most loader workers, at most `num_workers`, that divide each rank's streams."""
    per_rank = streams // world_size
    if per_rank % sampling.effective_workers(num_workers) == 0:
        return num_workers
    return max(k for k in range(1, num_workers + 1) if per_rank % k == 0)


def working_gpu_counts(streams: int, global_batch: int) -> list[int]:
    """The numbers of ranks that keep both the streams and the global batch."""
    return [n for n in range(1, global_batch + 1) if global_batch % n == 0 and streams % n == 0]


def refusal(streams: int, global_batch: int, saved_world: int, world_size: int, accum: int) -> str:
    """Why the global batch cannot be kept, and every GPU count (with its grad_accum and
    num_workers) that keeps it."""
    options = ", ".join(
        f"{n} GPU(s) with grad_accum {global_batch // n} and num_workers dividing {streams // n}"
        for n in working_gpu_counts(streams, global_batch)
    )
    return (
        f"it was trained on {saved_world} rank(s) x grad_accum "
        f"{global_batch // saved_world} = {global_batch} loader batches per optimiser step, "
        f"over {streams} data streams; {world_size} rank(s) x grad_accum {accum} = "
        f"{world_size * accum} would train other batches in each step. It resumes on {options} "
        "(grad_accum is derived when only the GPU count changes), or start a new run folder"
    )


def local_batch_in_epoch(training: dict[str, Any], world_size: int) -> int:
    """The checkpoint's data position as this world size's rank-local batch index."""
    consumed = training.get("global_batch_in_epoch")
    if consumed is None:  # written before positions were saved in global batches
        consumed = training["batch_in_epoch"] * training["world_size"]
    if consumed % world_size:
        raise ValueError(
            f"the checkpoint stopped after {consumed} global batches of its epoch, not a "
            f"multiple of {world_size} rank(s)"
        )
    return consumed // world_size
