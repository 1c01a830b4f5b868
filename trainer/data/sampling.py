"""Which samples each rank and loader worker reads, in which batches: pure arithmetic, no I/O.

An epoch's order is decided from the manifest's per-shard sample counts alone, so 128 ranks can
be planned in one process (tests do) and a resumed run recomputes exactly the same plan.

1. The shard list is shuffled by a generator seeded by (seed, epoch), and so is the order of
   the samples inside each shard (seeded by (seed, epoch, shard)); the epoch stream is the
   concatenation of those shards' samples in that order. Without the second shuffle a bucket
   buffer would hold the same samples every epoch, and so would every batch cut from it.
2. Rank r of R takes the contiguous block [r*M, (r+1)*M) with M = N // R. Within a rank,
   K loader workers (num_workers, 0 counting as 1) take contiguous sub-blocks of W = M // K.
3. Each worker fills buffers of `bucket_buffer` samples, sorts them by token length, cuts them
   into batches and emits them in an order shuffled per (seed, epoch, rank, worker, buffer).

Every worker of every rank holds exactly W samples, hence the same number of batches: no rank
ever waits at a collective for a rank that ran out of data. The price is a few samples a epoch:

    dropped <= (R - 1) + R * (K - 1)

(N - R*M <= R - 1 between ranks, M - K*W <= K - 1 inside each rank), and since the shard order
changes each epoch, different samples are dropped each epoch.

The torch DataLoader takes one batch from each worker in turn, so global batch g comes from
worker g % K as its local batch g // K. Resuming at batch s rotates the workers so that the
DataLoader's worker 0 is the one that owes batch s.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

_SHARD_ORDER_STREAM = 1  # tags keep the generators of different purposes independent
_BATCH_ORDER_STREAM = 2
_SAMPLE_ORDER_STREAM = 3
_SEED_MASK = (1 << 63) - 1


@dataclass(frozen=True)
class Span:
    """Samples [start, stop) of the shard at `shard` (its index in the manifest).

    Positions count in the shard's stored order, or, with `order_key`, in the order
    `shard_sample_order(shard_size, order_key)` gives it for one epoch.
    """

    shard: int
    start: int
    stop: int
    order_key: tuple[int, ...] | None = None  # (seed, epoch, shard) for training; None: stored
    shard_size: int = 0  # the shard's sample count, which its epoch order permutes

    @property
    def num_samples(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class WorkerPlan:
    """What one loader worker reads and emits in one epoch."""

    spans: tuple[Span, ...]  # its samples, in stream order
    rng_key: tuple[int, ...] | None  # (seed, epoch, rank, worker); None keeps sorted order (eval)
    first_batch: int = 0  # local batches already consumed before a resume

    @property
    def num_samples(self) -> int:
        return sum(span.num_samples for span in self.spans)


def order_rng(stream: int, *key: int) -> np.random.Generator:
    return np.random.default_rng([stream, *(k & _SEED_MASK for k in key)])


def effective_workers(num_workers: int) -> int:
    """Loader workers that split a rank's block; 0 means loading in the main process, as 1."""
    return max(1, num_workers)


def epoch_shard_order(num_shards: int, seed: int, epoch: int) -> list[int]:
    return order_rng(_SHARD_ORDER_STREAM, seed, epoch).permutation(num_shards).tolist()


def shard_sample_order(num_samples: int, order_key: tuple[int, ...]) -> np.ndarray:
    """Stored indices of a shard's samples in the order one epoch reads them."""
    return order_rng(_SAMPLE_ORDER_STREAM, *order_key).permutation(num_samples)


def stream_spans(
    shard_sizes: Sequence[int],
    order: Sequence[int],
    start: int,
    stop: int,
    epoch_key: tuple[int, int] | None = None,
):
    """The pieces of shards holding positions [start, stop) of the stream `order` defines;
    with `epoch_key` (seed, epoch), each shard's samples are read in that epoch's order."""
    spans, position = [], 0
    for shard in order:
        shard_start, position = position, position + shard_sizes[shard]
        low, high = max(start, shard_start), min(stop, position)
        if low < high:
            key = None if epoch_key is None else (*epoch_key, shard)
            size = shard_sizes[shard]
            spans.append(Span(shard, low - shard_start, high - shard_start, key, size))
        if position >= stop:
            break
    return tuple(spans)


def skip_samples(spans: Sequence[Span], count: int) -> tuple[Span, ...]:
    """`spans` without their first `count` samples; whole shards are skipped without reading."""
    kept = []
    for span in spans:
        if count >= span.num_samples:
            count -= span.num_samples
            continue
        kept.append(replace(span, start=span.start + count))
        count = 0
    return tuple(kept)


def samples_per_worker(num_samples: int, world_size: int, num_workers: int) -> int:
    return num_samples // world_size // effective_workers(num_workers)


def worker_block(
    num_samples: int, world_size: int, num_workers: int, rank: int, worker: int
) -> tuple[int, int]:
    """Stream positions of worker `worker` of rank `rank`: block-within-block, equal sizes."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world size {world_size}")
    per_rank = num_samples // world_size
    per_worker = per_rank // effective_workers(num_workers)
    start = rank * per_rank + worker * per_worker
    return start, start + per_worker


def dropped_bound(world_size: int, num_workers: int) -> int:
    """The most samples an epoch leaves out so that every worker of every rank is equal."""
    return (world_size - 1) + world_size * (effective_workers(num_workers) - 1)


def batches_for(num_samples: int, bucket_buffer: int, batch_size: int) -> int:
    """Batches a worker emits from `num_samples`: full buffers, then the short last buffer."""
    full_buffers, rest = divmod(num_samples, bucket_buffer)
    return full_buffers * (bucket_buffer // batch_size) + -(-rest // batch_size)


def first_local_batch(start_batch: int, worker: int, num_workers: int) -> int:
    """Local batches worker `worker` produced for global batches before `start_batch`."""
    k = effective_workers(num_workers)
    return max(0, -(-(start_batch - worker) // k))


def train_worker_plans(
    shard_sizes: Sequence[int],
    *,
    seed: int,
    epoch: int,
    rank: int,
    world_size: int,
    num_workers: int,
    start_batch: int = 0,
) -> list[WorkerPlan]:
    """One plan per DataLoader worker, rotated so that worker 0 owes global batch `start_batch`."""
    order = epoch_shard_order(len(shard_sizes), seed, epoch)
    k = effective_workers(num_workers)
    plans = []
    for loader_worker in range(k):
        worker = (loader_worker + start_batch) % k
        start, stop = worker_block(sum(shard_sizes), world_size, num_workers, rank, worker)
        plans.append(
            WorkerPlan(
                spans=stream_spans(shard_sizes, order, start, stop, (seed, epoch)),
                rng_key=(seed, epoch, rank, worker),
                first_batch=first_local_batch(start_batch, worker, num_workers),
            )
        )
    return plans


def eval_worker_plans(
    shard_sizes: Sequence[int], *, limit: int | None, rank: int, world_size: int, num_workers: int
) -> list[WorkerPlan]:
    """Stored order, the first `limit` samples, split as evenly as possible: nothing dropped."""
    total = sum(shard_sizes) if limit is None else min(limit, sum(shard_sizes))
    rank_start, rank_stop = even_split(total, world_size, rank)
    k = effective_workers(num_workers)
    order = range(len(shard_sizes))
    plans = []
    for worker in range(k):
        start, stop = even_split(rank_stop - rank_start, k, worker)
        spans = stream_spans(shard_sizes, order, rank_start + start, rank_start + stop)
        plans.append(WorkerPlan(spans=spans, rng_key=None))
    return plans


def even_split(total: int, parts: int, index: int) -> tuple[int, int]:
    return index * total // parts, (index + 1) * total // parts


def bucket_batches(
    token_lengths: Sequence[int], batch_size: int, rng: np.random.Generator | None
) -> list[list[int]]:
    """Indices of one buffer sorted by token length (stable), cut into batches, batches shuffled.

    Neighbours in length share a batch, so little of each batch is label (and frame) padding;
    shuffling the batch order keeps long and short batches from arriving in a predictable run.
    """
    ordered = sorted(range(len(token_lengths)), key=token_lengths.__getitem__)
    batches = [ordered[i : i + batch_size] for i in range(0, len(ordered), batch_size)]
    if rng is not None:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches


def buffer_rng(rng_key: tuple[int, ...] | None, buffer_index: int) -> np.random.Generator | None:
    return None if rng_key is None else order_rng(_BATCH_ORDER_STREAM, *rng_key, buffer_index)
