"""The trainer's data path: epoch plans for many ranks, real loading, exact resume, evaluation.

Most tests read small synthetic shards written with the builder's own ShardWriter (uneven
shard sizes, fast); the demo shards prove the bucketing and the manifest checks on real data.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from shard_builder.contract import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    MEL_MEMBER,
    META_MEMBER,
    TOKENS_MEMBER,
    ContractError,
    load_manifest,
    meta_bytes,
    npy_bytes,
    tokenizer_fingerprint,
)
from shard_builder.reader import npy_array, tar_members
from shard_builder.writer import ShardWriter
from trainer.data import sampling
from trainer.data.loader import (
    DataConfig,
    DataMismatchError,
    TrainData,
    check_split,
    collate,
    eval_batches,
    iter_span_samples,
    pad_features_to_full,
)

REPO = Path(__file__).resolve().parent.parent
N_MELS = 8
FINGERPRINT = tokenizer_fingerprint({"a": 0, "b": 1})
UNEVEN_SIZES = [7, 64, 3, 50]


def write_split(split_dir: Path, shard_sizes: list[int], seed: int = 0) -> dict:
    """Synthetic shards and a manifest shaped like shard_builder.build.make_manifest's."""
    rng = np.random.default_rng(seed)
    split_dir.mkdir(parents=True)
    entries, row = [], 0
    for index, size in enumerate(shard_sizes):
        writer = ShardWriter(split_dir / f"shard-{index:06d}.tar")
        for _ in range(size):
            frames, length = int(rng.integers(3, 40)), int(rng.integers(5, 30))
            meta = {
                "id": row,
                "text": f"satz {row}",
                "source": f"src{row % 3}",
                "duration": frames / 100,
                "pad_value": float(rng.uniform(-1.0, 0.0)),
            }
            writer.add(
                f"{split_dir.name}-{row:09d}",
                {
                    MEL_MEMBER: npy_bytes(rng.standard_normal((N_MELS, frames)).astype(np.float16)),
                    TOKENS_MEMBER: npy_bytes(rng.integers(0, 1000, length).astype(np.int32)),
                    META_MEMBER: meta_bytes(meta),
                },
            )
            row += 1
        entries.append(writer.close())
    manifest = {
        "format_version": FORMAT_VERSION,
        "split": split_dir.name,
        "num_input_rows": row,
        "num_samples": row,
        "num_rejected": 0,
        "features": {"n_mels": N_MELS, "dtype": "float16", "max_frames": 3000},
        "tokenizer": {"name_or_path": "synthetic", "fingerprint": FINGERPRINT},
        "shards": entries,
    }
    (split_dir / MANIFEST_NAME).write_text(json.dumps(manifest))
    return manifest


@pytest.fixture(scope="module")
def uneven_split(module_tmp) -> Path:
    split_dir = module_tmp("synthetic") / "train"
    write_split(split_dir, UNEVEN_SIZES)
    return split_dir


def all_keys(split_dir: Path) -> list[str]:
    keys = []
    for shard in load_manifest(split_dir)["shards"]:
        with tarfile.open(split_dir / shard["name"]) as tar:
            keys += [name.split(".")[0] for name in tar.getnames() if name.endswith(".json")]
    return keys


def config(**overrides) -> DataConfig:
    defaults = {"batch_size": 4, "bucket_buffer": 8, "num_workers": 2, "pin_memory": False}
    return DataConfig(**{**defaults, **overrides})


def batch_keys(batches) -> list[list[str]]:
    return [batch["keys"] for batch in batches]


# --- pure planning, 128 ranks in one process ---------------------------------------------------


@pytest.mark.parametrize("num_workers", [0, 1, 2, 3])
@pytest.mark.parametrize("epoch", [0, 1, 7])
def test_128_rank_plans_partition_the_epoch_within_the_drop_bound(num_workers, epoch):
    sizes = UNEVEN_SIZES * 40  # 4960 samples in 160 uneven shards
    world = 128
    streams = sampling.resolve_streams(0, world, num_workers)
    assert streams == world * max(1, num_workers)  # auto: the smallest multiple >= 8
    seen, batch_counts, stream_sizes = Counter(), set(), set()
    for rank in range(world):
        plans = sampling.train_worker_plans(
            sizes,
            seed=3,
            epoch=epoch,
            rank=rank,
            world_size=world,
            num_workers=num_workers,
            streams=streams,
        )
        for plan in plans:
            for stream in plan.streams:
                stream_sizes.add(stream.num_samples)
                seen.update(
                    (span.shard, i) for span in stream.spans for i in range(span.start, span.stop)
                )
        batch_counts.add(sum(sampling.batches_for(plan.num_samples, 16, 4) for plan in plans))
    assert len(stream_sizes) == 1  # every stream of every worker of every rank holds as many
    assert max(seen.values()) == 1  # no sample twice
    dropped = sum(sizes) - len(seen)
    assert dropped == sum(sizes) % streams <= sampling.dropped_bound(streams) == streams - 1
    assert len(batch_counts) == 1  # batches_per_epoch identical on every rank


def test_stream_blocks_are_contiguous_in_the_shuffled_stream():
    sizes = UNEVEN_SIZES
    order = sampling.epoch_shard_order(len(sizes), seed=0, epoch=0)
    stream = [(shard, i) for shard in order for i in range(sizes[shard])]
    for index in range(12):
        start, stop = sampling.stream_block(sum(sizes), 12, index)
        assert (start, stop) == (index * (124 // 12), (index + 1) * (124 // 12))
        spans = sampling.stream_spans(sizes, order, start, stop)
        flat = [(s.shard, i) for s in spans for i in range(s.start, s.stop)]
        assert flat == stream[start:stop]


def test_auto_streams_and_a_count_that_does_not_split_evenly():
    assert sampling.resolve_streams(0, 1, 0) == 8
    assert sampling.resolve_streams(0, 2, 1) == 8
    assert sampling.resolve_streams(0, 3, 2) == 12
    assert sampling.resolve_streams(0, 16, 2) == 32
    assert sampling.resolve_streams(12, 3, 2) == 12
    with pytest.raises(ValueError, match="12 is not a multiple of 4 rank"):
        sampling.resolve_streams(12, 4, 2)


# --- steps across world sizes, pure arithmetic -------------------------------------------------


def loader_order(rank, world, num_workers, streams, per_stream, start_batch=0):
    """(stream, local batch) in the order rank `rank`'s DataLoader yields them: its workers'
    turns interleaved, the workers taken round robin (as torch does, in_order=True)."""
    workers = []
    for turns in sampling.loader_turns(rank, world, num_workers, streams, start_batch):
        tagged = [
            iter([(stream, b) for b in range(first, per_stream)])
            for stream, first in zip(turns.streams, turns.first_batches, strict=True)
        ]
        workers.append(sampling.interleave(tagged, turns.first_turn))
    order = []
    for turn in itertools.count():
        item = next(workers[turn % len(workers)], None)
        if item is None:
            return order
        order.append(item)


def steps_of(world, accum, num_workers, streams, per_stream_by_epoch):
    """Per optimiser step, the set of (epoch, global batch) its ranks train on, epochs one
    after another (a step may span an epoch boundary)."""
    per_rank = {}
    for rank in range(world):
        batches = []
        for epoch, per_stream in enumerate(per_stream_by_epoch):
            for stream, local in loader_order(rank, world, num_workers, streams, per_stream):
                batches.append((epoch, sampling.global_batch(stream, local, streams)))
        per_rank[rank] = batches
    steps = []
    for step in range(min(len(b) for b in per_rank.values()) // accum):
        steps.append({g for b in per_rank.values() for g in b[step * accum : (step + 1) * accum]})
    return steps


CASES = [  # streams, (world, num_workers) pairs, global batch (world x grad_accum)
    (8, [(1, 1), (2, 1), (4, 2), (8, 1), (2, 4)], 8),
    (12, [(1, 2), (2, 3), (3, 2), (6, 1), (4, 3)], 12),
    (24, [(1, 0), (2, 2), (3, 4), (4, 1), (6, 2)], 12),
    (16, [(1, 1), (2, 2), (4, 4)], 4),
    (8, [(1, 1), (2, 1), (2, 4)], 6),  # steps that span an epoch boundary
]


@pytest.mark.parametrize(("streams", "layouts", "global_batch"), CASES)
def test_every_step_trains_on_the_same_global_batches_whatever_the_world_size(
    streams, layouts, global_batch
):
    epochs = [5, 3, 4]  # batches per stream (packed epochs differ in length)
    reference = None
    for world, num_workers in layouts:
        # the DataLoader order is exactly g = j*R + r, g from stream g % V as its batch g // V
        for rank in range(world):
            order = loader_order(rank, world, num_workers, streams, epochs[0])
            expected = [(g % streams, g // streams) for g in range(rank, streams * 5, world)]
            assert order == expected, (world, num_workers, rank)
        steps = steps_of(world, global_batch // world, num_workers, streams, epochs)
        if reference is None:
            reference = steps
        assert steps == reference, (world, num_workers)
    # the epochs' global batches one after another, each trained on once, global_batch per
    # step (the last few of the run, short of a step, are left)
    assert len(reference) == sum(streams * e for e in epochs) // global_batch
    assert all(len(step) == global_batch for step in reference)
    starts = [sum(streams * e for e in epochs[:epoch]) for epoch in range(len(epochs))]
    for index, step in enumerate(reference):  # step s: the run's global batches [s G, (s+1) G)
        run_wide = {starts[e] + g for e, g in step}
        assert run_wide == set(range(index * global_batch, (index + 1) * global_batch))


@pytest.mark.parametrize(("streams", "layouts", "global_batch"), CASES)
def test_a_resume_on_another_world_size_continues_with_the_same_batches(
    streams, layouts, global_batch
):
    """Stopped after any step on one layout, every layout's ranks continue from the global
    batch the checkpoint names (its position in global batches / the new world size)."""
    per_stream = 6
    for world, num_workers in layouts:
        for step in range(streams * per_stream // global_batch + 1):
            consumed = step * global_batch
            for rank in range(world):
                tail = loader_order(
                    rank, world, num_workers, streams, per_stream, consumed // world
                )
                expected = range(consumed + rank, streams * per_stream, world)
                assert tail == [(g % streams, g // streams) for g in expected], (world, step)


def test_shard_order_depends_on_epoch_and_seed_only():
    orders = {sampling.epoch_shard_order(50, 0, epoch).__repr__() for epoch in range(5)}
    assert len(orders) == 5
    assert sampling.epoch_shard_order(50, 0, 2) == sampling.epoch_shard_order(50, 0, 2)
    assert sampling.epoch_shard_order(50, 1, 2) != sampling.epoch_shard_order(50, 0, 2)


def test_skip_samples_drops_whole_shards_without_touching_them():
    spans = (sampling.Span(2, 5, 7), sampling.Span(0, 0, 64), sampling.Span(3, 0, 50))
    assert sampling.skip_samples(spans, 2) == spans[1:]
    assert sampling.skip_samples(spans, 10) == (sampling.Span(0, 8, 64), spans[2])
    assert sampling.skip_samples(spans, 116) == ()


def test_batches_for_counts_full_buffers_and_a_partial_last_batch():
    assert sampling.batches_for(16, 8, 4) == 4
    assert sampling.batches_for(19, 8, 4) == 5  # 2 full buffers + 3 samples -> 1 partial batch
    assert sampling.batches_for(21, 8, 4) == 6


# --- real loading over uneven shards -----------------------------------------------------------


def test_dataloader_takes_worker_batches_round_robin():
    """The stream arithmetic relies on it: rank-local batch j comes from worker j % K."""

    class Tagged(torch.utils.data.IterableDataset):
        def __iter__(self):
            worker = torch.utils.data.get_worker_info().id
            yield from ((worker, i) for i in range(3 + (worker == 0)))

    loader = torch.utils.data.DataLoader(Tagged(), batch_size=None, num_workers=2)
    got = [(int(w), int(i)) for w, i in loader]
    assert got == [(0, 0), (1, 0), (0, 1), (1, 1), (0, 2), (1, 2), (0, 3)]


def test_every_rank_yields_batches_per_epoch_and_keys_once(uneven_split):
    world, cfg = 2, config(num_workers=2)
    keys, counts = [], set()
    for rank in range(world):
        data = TrainData(uneven_split, cfg, rank, world)
        batches = batch_keys(data.batches(epoch=0))
        assert len(batches) == data.batches_per_epoch()
        counts.add(len(batches))
        keys += [key for batch in batches for key in batch]
    assert len(counts) == 1
    assert len(keys) == len(set(keys))
    manifest_keys = set(all_keys(uneven_split))
    assert set(keys) <= manifest_keys
    dropped = len(manifest_keys) - len(keys)
    assert data.streams == 8  # auto for 2 ranks x 2 workers
    assert dropped == data.dropped_per_epoch() == 124 % 8 <= sampling.dropped_bound(8)
    assert "124 samples in 8 data streams of 15; 4 sample(s) left out" in data.describe()


def test_three_uneven_shards_two_ranks_two_workers(tmp_path):
    split_dir = tmp_path / "train"
    write_split(split_dir, [5, 23, 11], seed=1)
    keys = []
    for rank in range(2):
        data = TrainData(split_dir, config(batch_size=2, bucket_buffer=4), rank, 2)
        batches = list(data.batches(epoch=3))
        assert len(batches) == data.batches_per_epoch()
        keys += [key for batch in batches for key in batch["keys"]]
    assert len(keys) == len(set(keys))
    assert 39 - len(keys) == 39 % data.streams <= sampling.dropped_bound(data.streams)


def step_keys(split_dir, cfg, world, accum, epoch, start_step=0):
    """Per optimiser step (from `start_step` of the epoch on), the set of sample keys its
    ranks train on: each rank's loader batches grouped `accum` at a time."""
    per_rank = []
    for rank in range(world):
        data = TrainData(split_dir, cfg, rank, world, accum)
        start = start_step * accum
        per_rank.append(batch_keys(data.batches(epoch, start_batch=start)))
    steps = len(per_rank[0]) // accum
    return [
        {k for batches in per_rank for batch in batches[s * accum : (s + 1) * accum] for k in batch}
        for s in range(steps)
    ], data


def test_real_batches_make_the_same_steps_on_one_two_and_four_ranks(uneven_split):
    """Loaded from shards: R x grad_accum = 4 loader batches per step over 8 streams, on 1, 2
    and 4 ranks (and other worker counts): every step holds the same samples; a resume in
    the middle of the epoch on another world size continues with the same steps."""
    cfg = config(batch_size=2, bucket_buffer=4, streams=8)
    reference, data = step_keys(uneven_split, dataclasses.replace(cfg, num_workers=1), 1, 4, 2)
    assert len(reference) == data.batches_per_epoch() // 4 >= 6
    for world, workers in ((2, 2), (4, 1), (4, 2)):
        steps, data = step_keys(
            uneven_split, dataclasses.replace(cfg, num_workers=workers), world, 4 // world, 2
        )
        assert steps == reference, (world, workers)
        assert data.order_signature()["global_batch"] == 4
        assert not {"world_size", "loader_workers"} & set(data.order_signature())
    tail, _ = step_keys(
        uneven_split, dataclasses.replace(cfg, num_workers=0), 2, 2, 2, start_step=3
    )
    assert tail == reference[3:]
    flat = [k for step in reference for k in step]
    assert len(flat) == len(set(flat)) == 124 - 124 % 8


def test_batch_tensors_follow_the_contract(uneven_split):
    batch = next(iter(TrainData(uneven_split, config(), 0, 1).batches(epoch=0)))
    size = len(batch["keys"])
    assert batch["features"].dtype == torch.float16 and batch["features"].shape[:2] == (
        size,
        N_MELS,
    )
    assert batch["features"].shape[2] == int(batch["num_frames"].max())
    assert batch["pad_values"].dtype == torch.float32
    assert batch["tokens"].dtype == torch.int64 and batch["token_lengths"].dtype == torch.int64
    for i, length in enumerate(batch["token_lengths"].tolist()):
        assert (batch["tokens"][i, length:] == -100).all() and (
            batch["tokens"][i, :length] >= 0
        ).all()
        frames = int(batch["num_frames"][i])
        expected = torch.tensor(float(batch["pad_values"][i])).half()
        assert (batch["features"][i, :, frames:] == expected).all()
    assert len(batch["texts"]) == len(batch["sources"]) == len(batch["durations"]) == size
    assert all(d > 0 for d in batch["durations"])


def test_same_epoch_and_seed_repeat_different_epochs_differ(uneven_split):
    data = TrainData(uneven_split, config(), 0, 1)
    first = batch_keys(data.batches(epoch=1))
    assert first == batch_keys(data.batches(epoch=1))
    assert first != batch_keys(data.batches(epoch=2))
    other_seed = TrainData(uneven_split, config(seed=5), 0, 1)
    assert first != batch_keys(other_seed.batches(epoch=1))


def test_batches_are_regrouped_every_epoch(tmp_path):
    """Samples are shuffled inside each shard per epoch, so a bucket buffer smaller than a shard
    (64 of 1000 samples on the real dataset) holds different samples each epoch, and so does each
    batch cut from it. In stored order the same buffers, hence the same batches, came back every
    epoch, which kept the tiny demo model from learning the acoustics."""
    write_split(tmp_path / "train", [64, 64, 64])
    data = TrainData(tmp_path / "train", config(num_workers=0, bucket_buffer=16), 0, 1)
    epochs = [batch_keys(data.batches(epoch=epoch)) for epoch in range(3)]
    groups = [{frozenset(keys) for keys in batches} for batches in epochs]
    for first, second in [(0, 1), (1, 2)]:
        shared = len(groups[first] & groups[second])
        assert shared <= len(groups[first]) // 4, (first, second, shared)
    for batches in epochs:  # still a permutation of the epoch's samples
        flat = [key for keys in batches for key in keys]
        assert len(flat) == len(set(flat)) == data.samples_per_epoch()


def test_sample_order_inside_a_shard_is_a_seeded_permutation():
    orders = [sampling.shard_sample_order(64, (0, epoch, 3)).tolist() for epoch in range(3)]
    assert all(sorted(order) == list(range(64)) for order in orders)
    assert orders[0] != orders[1] != orders[2]
    assert sampling.shard_sample_order(64, (0, 1, 3)).tolist() == orders[1]
    assert sampling.shard_sample_order(64, (0, 1, 4)).tolist() != orders[1]


@pytest.mark.parametrize("num_workers", [0, 1, 2])
def test_resume_yields_exactly_the_tail(uneven_split, num_workers):
    data = TrainData(uneven_split, config(num_workers=num_workers, bucket_buffer=12), 1, 2)
    full = list(data.batches(epoch=4))
    total = data.batches_per_epoch()
    assert len(full) == total
    for start in sorted({1, 2, 3, 5, 7, total // 2, total - 1, total}):
        tail = list(data.batches(epoch=4, start_batch=start))
        assert [b["keys"] for b in tail] == [b["keys"] for b in full[start:]], start
        for resumed, original in zip(tail, full[start:], strict=True):
            for name in ("features", "pad_values", "num_frames", "tokens", "token_lengths"):
                assert torch.equal(resumed[name], original[name])


def test_resume_outside_the_epoch_is_refused(uneven_split):
    data = TrainData(uneven_split, config(), 0, 1)
    with pytest.raises(ValueError, match="start_batch"):
        data.batches(epoch=0, start_batch=data.batches_per_epoch() + 1)


def test_config_rejects_a_buffer_that_does_not_cut_into_whole_batches(uneven_split):
    with pytest.raises(ValueError, match="multiple of batch_size"):
        TrainData(uneven_split, config(batch_size=4, bucket_buffer=10), 0, 1)


# --- evaluation --------------------------------------------------------------------------------


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("num_workers", [0, 2])
def test_eval_sees_each_sample_exactly_once(uneven_split, world, num_workers):
    keys = []
    for rank in range(world):
        keys += [
            k
            for batch in eval_batches(uneven_split, config(num_workers=num_workers), rank, world)
            for k in batch["keys"]
        ]
    assert sorted(keys) == sorted(all_keys(uneven_split))


@pytest.mark.parametrize("world", [2, 3])
def test_eval_limit_takes_a_fixed_first_subset(uneven_split, world):
    keys = []
    for rank in range(world):
        loader = eval_batches(uneven_split, config(eval_limit=20), rank, world)
        assert len(list(loader)) == len(loader)
        keys += [
            k
            for batch in eval_batches(uneven_split, config(eval_limit=20), rank, world)
            for k in batch["keys"]
        ]
    assert sorted(keys) == all_keys(uneven_split)[:20]


def test_trainer_data_imports_no_builder_only_library():
    """The GPU machine has no datasets, soundfile, soxr, pyarrow or jiwer."""
    code = (
        "import sys, trainer.data.loader; print([m for m in "
        "('datasets', 'soundfile', 'soxr', 'pyarrow', 'jiwer') if m in sys.modules])"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"


def test_config_names_the_split_folders():
    cfg = DataConfig(shards="out", train_split="train", eval_split="test")
    assert cfg.train_dir() == Path("out/train") and cfg.eval_dir() == Path("out/test")
    assert all(f.metadata.get("help") for f in dataclasses.fields(DataConfig))


# --- decoding ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "array",
    [
        np.full((128, 301), 1.5, np.float16),
        np.arange(7, dtype=np.int32),
        np.array(3.0),
        np.arange(6, dtype=">i8").reshape(2, 3),
        np.asfortranarray(np.ones((3, 4))),  # not the fast path: np.load decodes it
        np.zeros((0, 5), np.float32),
    ],
)
def test_npy_array_decodes_like_np_load(array):
    decoded = npy_array(npy_bytes(array))
    assert decoded.dtype == array.dtype and decoded.shape == array.shape
    assert np.array_equal(decoded, array)


def test_a_flipped_bit_in_a_tar_header_is_refused(uneven_split, tmp_path):
    broken = tmp_path / "broken.tar"
    source = uneven_split / "shard-000000.tar"
    with open(source, "rb") as handle:
        fourth_member_data = tar_members(handle)[3].offset
    data = bytearray(source.read_bytes())
    data[fourth_member_data - 512 + 130] ^= 0x01  # in the size field of sample 1's first header
    broken.write_bytes(bytes(data))
    with pytest.raises(ContractError, match="checksum"):
        list(iter_span_samples(tmp_path, ["broken.tar"], [sampling.Span(0, 0, 7)]))


def test_a_shard_shorter_than_its_manifest_is_refused(uneven_split):
    with pytest.raises(ContractError, match="fewer than"):
        list(iter_span_samples(uneven_split, ["shard-000000.tar"], [sampling.Span(0, 5, 9)]))


# --- padding helpers ---------------------------------------------------------------------------


def test_pad_features_to_full_restores_each_samples_pad_value():
    samples = [
        {
            "key": "a",
            "features": np.ones((N_MELS, 5), np.float16),
            "tokens": np.arange(3),
            "pad_value": -0.3,
            "text": "a",
            "source": "s",
        },
        {
            "key": "b",
            "features": np.ones((N_MELS, 9), np.float16),
            "tokens": np.arange(6),
            "pad_value": 0.7,
            "text": "b",
            "source": "s",
        },
    ]
    batch = collate(samples)
    full = pad_features_to_full(batch["features"], batch["pad_values"], 3000, batch["num_frames"])
    assert full.dtype == torch.float32 and full.shape == (2, N_MELS, 3000)
    assert (full[0, :, :5] == 1).all() and (full[0, :, 5:] == torch.tensor(-0.3)).all()
    assert (full[1, :, :9] == 1).all() and (full[1, :, 9:] == torch.tensor(0.7)).all()
    rough = pad_features_to_full(batch["features"], batch["pad_values"])
    assert (rough[0, :, 9:] == torch.tensor(-0.3)).all()  # past T: exact float32 pad value
    assert torch.allclose(rough, full, atol=1e-3)


# --- the demo shards: manifest checks and the effect of bucketing ------------------------------


def test_check_split_accepts_the_matching_model(demo_shards):
    manifest = load_manifest(demo_shards / "train")
    n_mels, fingerprint = manifest["features"]["n_mels"], manifest["tokenizer"]["fingerprint"]
    assert check_split(demo_shards / "train", n_mels, fingerprint, 500) == manifest


def test_check_split_names_both_windows(demo_shards):
    """Shards cut for the tiny preset's 5 s window would crash a 30 s encoder mid-run."""
    manifest = load_manifest(demo_shards / "train")
    n_mels, fingerprint = manifest["features"]["n_mels"], manifest["tokenizer"]["fingerprint"]
    with pytest.raises(DataMismatchError) as error:
        check_split(demo_shards / "train", n_mels, fingerprint, 3000)
    assert "500-frame input window" in str(error.value) and "takes 3000 frames" in str(error.value)


def test_check_split_names_both_mel_counts(demo_shards):
    manifest = load_manifest(demo_shards / "train")
    n_mels = manifest["features"]["n_mels"]
    with pytest.raises(DataMismatchError) as error:
        check_split(demo_shards / "train", n_mels + 48, manifest["tokenizer"]["fingerprint"], 500)
    assert f"n_mels={n_mels}" in str(error.value) and f"n_mels={n_mels + 48}" in str(error.value)


def test_check_split_names_both_tokenizer_fingerprints(demo_shards):
    manifest = load_manifest(demo_shards / "train")
    theirs = manifest["tokenizer"]["fingerprint"]
    with pytest.raises(DataMismatchError) as error:
        check_split(demo_shards / "train", manifest["features"]["n_mels"], "0123456789abcdef", 500)
    assert theirs in str(error.value) and "0123456789abcdef" in str(error.value)


def test_check_split_refuses_a_folder_that_is_not_a_built_split(tmp_path):
    with pytest.raises(DataMismatchError, match="does not exist"):
        check_split(tmp_path, 80, "x", 3000)
    with pytest.raises(DataMismatchError, match="not a folder"):
        check_split(tmp_path / "nothing", 80, "x", 3000)


def test_bucketing_cuts_label_padding_on_demo_data(demo_shards):
    def padded_token_slots(bucket_buffer: int) -> tuple[int, int]:
        cfg = config(batch_size=8, bucket_buffer=bucket_buffer, num_workers=0)
        batches = list(TrainData(demo_shards / "train", cfg, 0, 1).batches(epoch=0))
        slots = sum(b["tokens"].numel() for b in batches)
        real = sum(int(b["token_lengths"].sum()) for b in batches)
        return slots, real

    unbucketed, real = padded_token_slots(bucket_buffer=8)  # a buffer of one batch: no sorting
    bucketed, same_real = padded_token_slots(bucket_buffer=64)
    assert same_real == real
    assert bucketed - real < 0.5 * (unbucketed - real), (bucketed, unbucketed, real)
