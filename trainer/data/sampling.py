"""Which samples each rank and loader worker reads, in which batches: pure arithmetic, no I/O.

An epoch's order is decided from the manifest's per-shard sample counts alone, so 128 ranks can
be planned in one process (tests do) and a resumed run recomputes exactly the same plan. The
plan does not depend on the number of ranks or loader workers, only on the number of virtual
data streams V (`data.streams`), so a run can resume on another number of GPUs.

1. The shard list is shuffled by a generator seeded by (seed, epoch), and so is the order of
   the samples inside each shard (seeded by (seed, epoch, shard)); the epoch stream is the
   concatenation of those shards' samples in that order. Without the second shuffle a bucket
   buffer would hold the same samples every epoch, and so would every batch cut from it.
   (Packed mode packs this stream into windows first; the windows are then the units below.)
2. The epoch's N units are cut into V equal contiguous blocks of M = N // V, one per stream.
3. Each stream fills buffers of `bucket_buffer` units from its block, sorts them by token
   length, cuts them into batches and emits them in an order shuffled per (seed, epoch, stream,
   buffer): no rank or worker in any key. Every stream holds M units, hence the same number B
   of batches.
4. Global batch g of the epoch is local batch g // V of stream g % V; there are V * B.
5. Rank r of R takes global batches r, r + R, r + 2R, ...: its local batch j is g = j*R + r.
   With V = m*K*R (K loader workers, num_workers 0 counting as 1), loader worker w of rank r
   owns the m streams i*K*R + w*R + r (i < m) and emits them in turn: its q-th batch is the
   next batch of stream (q mod m)*K*R + w*R + r. The torch DataLoader takes one batch from each
   worker in turn, so rank-local batch j = q*K + w, and j*R + r is exactly that stream's batch
   q // m. Resuming at rank-local batch j rotates the workers so that the DataLoader's worker 0
   is the one that owes batch j, and each worker's turns so that they start at the stream owed.

An optimiser step of A loader batches per rank (grad_accum) therefore trains on the global
batches [s*A*R, (s+1)*A*R) of the run's stream (epochs follow one another, each a multiple of
R batches long): the same set of batches for any R with the same R*A, only spread over the
ranks differently. A checkpoint stores the position in global batches; trainer/runtime/elastic.py
checks that a resume keeps V and R*A and derives grad_accum for a new number of GPUs.

Every rank has exactly V*B/R batches: no rank ever waits at a collective for a rank that ran out
of data. The price is a few units an epoch, different ones each epoch (the order changes):

    dropped = N - V*M <= V - 1
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from itertools import count
from typing import Any

import numpy as np

_SHARD_ORDER_STREAM = 1  # tags keep the generators of different purposes independent
_BATCH_ORDER_STREAM = 2
_SAMPLE_ORDER_STREAM = 3
_SEED_MASK = (1 << 63) - 1
MIN_AUTO_STREAMS = 8  # data.streams = 0: the smallest multiple of ranks x workers at least this


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
class StreamPlan:
    """What one stream holds and emits in one epoch."""

    spans: tuple[Span, ...]  # its samples, in stream order
    rng_key: tuple[int, ...] | None  # (seed, epoch, stream); None keeps sorted order (eval)
    first_batch: int = 0  # local batches already consumed before a resume

    @property
    def num_samples(self) -> int:
        return sum(span.num_samples for span in self.spans)


@dataclass(frozen=True)
class WorkerTurns:
    """The streams one DataLoader worker emits in turn: its q-th batch is the next batch of
    `streams[q % m]`. Before a resume, `first_batches[i]` batches of stream i and `first_turn`
    turns of the worker were consumed."""

    streams: tuple[int, ...]
    first_batches: tuple[int, ...]
    first_turn: int


@dataclass(frozen=True)
class WorkerPlan:
    """What one loader worker reads and emits in one epoch: its streams' plans, in turn."""

    streams: tuple[Any, ...]  # StreamPlan here; packing.WindowStreamPlan for windows
    first_turn: int = 0

    @property
    def num_samples(self) -> int:
        return sum(stream.num_samples for stream in self.streams)


def order_rng(stream: int, *key: int) -> np.random.Generator:
    return np.random.default_rng([stream, *(k & _SEED_MASK for k in key)])


def effective_workers(num_workers: int) -> int:
    """Loader workers per rank; 0 means loading in the main process, as 1."""
    return max(1, num_workers)


def resolve_streams(streams: int, world_size: int, num_workers: int) -> int:
    """`data.streams`, or for 0 (auto) the smallest multiple of ranks x workers >= 8."""
    per_round = world_size * effective_workers(num_workers)
    if streams == 0:
        return per_round * -(-MIN_AUTO_STREAMS // per_round)
    check_streams(streams, world_size, num_workers)
    return streams


def check_streams(streams: int, world_size: int, num_workers: int) -> None:
    workers = effective_workers(num_workers)
    if streams < 1 or streams % (world_size * workers):
        raise ValueError(
            f"data.streams {streams} is not a multiple of {world_size} rank(s) x {workers} "
            f"loader worker(s): every worker must own as many streams; set --streams to a "
            f"multiple of {world_size * workers} (0 = auto) or change --num-workers"
        )


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


def units_per_stream(num_units: int, streams: int) -> int:
    return num_units // streams


def stream_block(num_units: int, streams: int, stream: int) -> tuple[int, int]:
    """Epoch positions of stream `stream`: the stream-th of `streams` equal contiguous blocks."""
    if not 0 <= stream < streams:
        raise ValueError(f"stream {stream} is outside {streams} streams")
    per_stream = units_per_stream(num_units, streams)
    return stream * per_stream, (stream + 1) * per_stream


def dropped_bound(streams: int) -> int:
    """The most units an epoch leaves out so that every stream holds as many."""
    return streams - 1


def batches_for(num_samples: int, bucket_buffer: int, batch_size: int) -> int:
    """Batches a stream emits from `num_samples`: full buffers, then the short last buffer."""
    full_buffers, rest = divmod(num_samples, bucket_buffer)
    return full_buffers * (bucket_buffer // batch_size) + -(-rest // batch_size)


def turns_before(position: int, index: int, period: int) -> int:
    """How many of the positions 0 .. position-1 fall on `index` when `period` take turns."""
    return max(0, -(-(position - index) // period))


def stream_of(
    rank: int, worker: int, turn: int, world_size: int, num_workers: int, streams: int
) -> tuple[int, int]:
    """(stream, its local batch) that loader worker `worker` of rank `rank` emits at `turn`."""
    workers = effective_workers(num_workers)
    per_worker = streams // (world_size * workers)
    stream = (turn % per_worker) * workers * world_size + worker * world_size + rank
    return stream, turn // per_worker


def global_batch(stream: int, local_batch: int, streams: int) -> int:
    """The epoch's global batch that is local batch `local_batch` of stream `stream`."""
    return local_batch * streams + stream


def loader_turns(
    rank: int, world_size: int, num_workers: int, streams: int, start_batch: int = 0
) -> list[WorkerTurns]:
    """One entry per DataLoader worker, rotated so that worker 0 owes rank-local batch
    `start_batch`, each worker's turns starting at the stream it owes."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world size {world_size}")
    check_streams(streams, world_size, num_workers)
    workers = effective_workers(num_workers)
    per_worker = streams // (world_size * workers)
    plans = []
    for loader_worker in range(workers):
        worker = (loader_worker + start_batch) % workers
        first_turn = turns_before(start_batch, worker, workers)
        owned = tuple(
            stream_of(rank, worker, i, world_size, num_workers, streams)[0]
            for i in range(per_worker)
        )
        firsts = tuple(turns_before(first_turn, i, per_worker) for i in range(per_worker))
        plans.append(WorkerTurns(owned, firsts, first_turn))
    return plans


def interleave(batches: Sequence[Iterator], first_turn: int) -> Iterator:
    """The streams' batches in turn, from `first_turn` on; all streams are equally long, so
    the first one that runs dry ends the worker."""
    for turn in count(first_turn):
        batch = next(batches[turn % len(batches)], None)
        if batch is None:
            return
        yield batch


def train_worker_plans(
    shard_sizes: Sequence[int],
    *,
    seed: int,
    epoch: int,
    rank: int,
    world_size: int,
    num_workers: int,
    streams: int,
    start_batch: int = 0,
) -> list[WorkerPlan]:
    """One plan per DataLoader worker of rank `rank`, resuming at its local batch `start_batch`."""
    order = epoch_shard_order(len(shard_sizes), seed, epoch)
    total = sum(shard_sizes)
    plans = []
    for turns in loader_turns(rank, world_size, num_workers, streams, start_batch):
        stream_plans = []
        for stream, first_batch in zip(turns.streams, turns.first_batches, strict=True):
            start, stop = stream_block(total, streams, stream)
            spans = stream_spans(shard_sizes, order, start, stop, (seed, epoch))
            stream_plans.append(StreamPlan(spans, (seed, epoch, stream), first_batch))
        plans.append(WorkerPlan(tuple(stream_plans), turns.first_turn))
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
        plans.append(WorkerPlan((StreamPlan(spans=spans, rng_key=None),)))
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


def resume_point(first_batch: int, bucket_buffer: int, batch_size: int) -> tuple[int, int]:
    """(buffer holding a stream's local batch `first_batch`, batches of it already consumed):
    a stream resumes by skipping whole buffers and the head of that one."""
    return divmod(first_batch, bucket_buffer // batch_size)


def buffer_batches(
    lengths: Sequence[int],
    batch_size: int,
    rng_key: tuple[int, ...] | None,
    buffer_index: int,
    skip: int = 0,
) -> list[list[int]]:
    """One buffer's batches (`bucket_batches` with its own generator), the first `skip` left out."""
    return bucket_batches(lengths, batch_size, buffer_rng(rng_key, buffer_index))[skip:]
