"""Packed windows: exact features, Whisper's timestamped targets, a pure and resumable plan."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from shard_builder.contract import MAX_TARGET_POSITIONS
from tests._trainer_run import TINY_MODEL
from tests.test_data import N_MELS, write_split
from trainer.data import sampling
from trainer.data.loader import DataConfig
from trainer.data.packing import (
    LengthIndex,
    PackedTrainData,
    PackingLimits,
    Placed,
    WindowChoices,
    WindowTargets,
    build_window,
    collate_windows,
    pack_stream,
    plan_windows,
    window_features_to_full,
)
from trainer.model import decoder_inputs_and_labels

DEMO_TRAIN = TINY_MODEL.parent.parent.parent / "demo" / "corpus" / "data"


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import WhisperTokenizerFast

    return WhisperTokenizerFast.from_pretrained(TINY_MODEL)


@pytest.fixture(scope="module")
def targets(tokenizer):
    return WindowTargets(tokenizer, "de", "transcribe", MAX_TARGET_POSITIONS)


def demo_waveforms(count: int) -> list[np.ndarray]:
    import pyarrow.parquet as pq

    from shard_builder.audio import decode_audio

    table = pq.read_table(next(DEMO_TRAIN.glob("test-*.parquet")), columns=["audio"])
    waveforms = []
    for row in table.column("audio").to_pylist():
        try:
            waveforms.append(decode_audio(row["bytes"]))
        except Exception:  # the corpus holds a few deliberately broken rows
            continue
        if len(waveforms) == count:
            return waveforms
    raise AssertionError("the demo test split holds too few clips")


# --- features --------------------------------------------------------------------------------


@pytest.mark.parametrize("n_mels", [80, 128])
def test_packed_features_equal_the_extractor_on_concatenated_audio(n_mels):
    from transformers import WhisperFeatureExtractor

    from shard_builder.features import LogMelExtractor

    extractor = WhisperFeatureExtractor(feature_size=n_mels)
    lone = LogMelExtractor(extractor.mel_filters)
    # six clips, loudness from a whisper to full scale: their own maxima differ by ~3 decades
    gains = [0.02, 1.0, 0.1, 0.5, 0.005, 0.3]
    clips = [w * g for w, g in zip(demo_waveforms(len(gains)), gains, strict=True)]
    audio = np.zeros(30 * 16000, dtype=np.float32)
    window = np.full((n_mels, 3000), -np.inf, dtype=np.float16)
    offset, starts = 30, []
    for clip in clips:
        stored = lone(clip).features  # what the shard holds for the clip alone
        if offset + stored.shape[1] > 3000:
            break
        audio[offset * 160 : offset * 160 + clip.size] = clip
        window[:, offset : offset + stored.shape[1]] = stored
        starts.append(offset)
        offset += stored.shape[1] + 36  # a 0.36 s gap, even frames
    assert len(starts) >= 5, "the clips should share the window"

    packed = window_features_to_full(torch.from_numpy(window)[None], 3000)[0].numpy()
    expected = extractor(audio, sampling_rate=16000, return_tensors="np").input_features[0]
    assert packed.shape == expected.shape == (n_mels, 3000)
    error = np.abs(packed - expected).max(axis=0)  # per frame
    differing = np.flatnonzero(error > 2e-3)  # beyond float16 rounding of values in [-1.5, 2]
    # only a frame or two where a lone clip's padding met real neighbouring audio
    assert len(differing) <= 2 * len(starts), differing
    near_edge = [min(abs(f - s) for s in starts) for f in differing]
    assert all(d <= 2 for d in near_edge), (differing, starts)
    assert error.max() < 1.0


def test_gap_and_tail_take_the_window_floor():
    loud = np.full((4, 10), 1.5, dtype=np.float16)  # stored max 1.5 -> floor max(1.5-2, -1.5)
    window = np.full((4, 30), -np.inf, dtype=np.float16)
    window[:, 4:14] = loud
    window[:, 20:22] = -1.0  # a quiet clip's own floor, below the window's
    full = window_features_to_full(torch.from_numpy(window)[None], 40)[0]
    assert torch.all(full[:, :4] == -0.5) and torch.all(full[:, 14:] == -0.5)
    assert torch.all(full[:, 4:14] == 1.5)


# --- targets ---------------------------------------------------------------------------------


def stored_tokens(tokenizer, text: str) -> np.ndarray:
    tokenizer.set_prefix_tokens(language="de", task="transcribe", predict_timestamps=False)
    return np.asarray(tokenizer(text).input_ids, dtype=np.int32)


def sample(tokenizer, text: str, frames: int, key: str = "k") -> dict:
    return {
        "key": key,
        "features": np.full((80, frames), 1.0, dtype=np.float16),
        "tokens": stored_tokens(tokenizer, text),
        "text": text,
        "source": "test",
        "duration": (frames - 2) / 100,
    }


def test_timestamped_target_decodes_to_the_offsets_and_texts(tokenizer, targets):
    samples = [sample(tokenizer, "Guten Morgen.", 152), sample(tokenizer, "Wie geht es dir?", 204)]
    placed = [Placed(0, 0, 40), Placed(0, 1, 250)]
    window = build_window(samples, placed, targets, WindowChoices(True, False))
    decoded = tokenizer.decode(window["tokens"], decode_with_timestamps=True)
    assert decoded == (
        "<|startoftranscript|><|de|><|transcribe|><|0.40|> Guten Morgen.<|1.90|>"
        "<|2.50|> Wie geht es dir?<|4.52|><|endoftext|>"
    )
    assert window["unlabelled"] == 0 and window["timestamps"]
    # the texts carry Whisper's leading space, as its own segments do
    plain = build_window(samples, placed, targets, WindowChoices(False, False))
    assert tokenizer.decode(plain["tokens"]) == (
        "<|startoftranscript|><|de|><|transcribe|><|notimestamps|> Guten Morgen. Wie geht es "
        "dir?<|endoftext|>"
    )


def test_prompt_is_the_previous_text_and_carries_no_label(tokenizer, targets):
    samples = [sample(tokenizer, "Guten Morgen.", 152)]
    previous = build_window(
        [sample(tokenizer, "Das Wetter ist schön.", 100)],
        [Placed(0, 0, 0)],
        targets,
        WindowChoices(True, False),
    )
    prompt = [t for text in previous["texts"] for t in text]
    window = build_window(samples, [Placed(0, 0, 0)], targets, WindowChoices(True, True), prompt)
    tokens = window["tokens"]
    assert tokenizer.decode(tokens[: window["unlabelled"]]) == (
        "<|startofprev|> Das Wetter ist schön."
    )
    assert tokens[window["unlabelled"]] == targets.prefix[0]  # <|startoftranscript|> follows
    batch = collate_windows([window])
    inputs, labels = decoder_inputs_and_labels(batch["tokens"], 50257, batch["unlabelled"])
    unlabelled = window["unlabelled"]
    # every prompt token and <|startoftranscript|> (predicted from the prompt) are context only
    assert torch.all(labels[0, :unlabelled] == -100)
    assert labels[0, unlabelled:].tolist() == tokens[unlabelled + 1 :].tolist()
    assert inputs[0].tolist() == tokens[:-1].tolist()


def test_a_long_prompt_is_cut_from_the_left_to_223_tokens(tokenizer, targets):
    prompt = list(range(1000, 1600))
    window = build_window(
        [sample(tokenizer, "Hallo.", 100)],
        [Placed(0, 0, 0)],
        targets,
        WindowChoices(True, True),
        prompt,
    )
    assert window["unlabelled"] == 1 + 223
    assert window["tokens"][1:224].tolist() == prompt[-223:]


def test_no_window_exceeds_448_positions(tokenizer, targets):
    long_text = " ".join(["Donaudampfschifffahrtsgesellschaftskapitän"] * 12)
    rng = np.random.default_rng(0)
    items = [(0, i) for i in range(60)]
    texts = [int(len(stored_tokens(tokenizer, long_text)) - 5)] * 60
    frames = rng.integers(100, 600, size=60).tolist()
    windows = pack_stream(items, frames, texts, [10] * 60, PackingLimits(3000))
    assert sum(len(w) for w in windows) == 60
    for placed in windows:
        samples = [sample(tokenizer, long_text, frames[p.index]) for p in placed]
        window = build_window(
            samples, placed, targets, WindowChoices(True, True), list(range(1000, 1400))
        )
        assert len(window["tokens"]) <= MAX_TARGET_POSITIONS
        assert window["timestamps"]  # the plan left room for two timestamps per utterance


def test_stored_tokens_of_another_task_are_refused(tokenizer, targets):
    wrong = sample(tokenizer, "x", 10)
    tokenizer.set_prefix_tokens(language="de", task="translate", predict_timestamps=False)
    wrong["tokens"] = np.asarray(tokenizer("Hallo").input_ids)
    with pytest.raises(ValueError, match="not"):
        build_window([wrong], [Placed(0, 0, 0)], targets, WindowChoices(True, False))


# --- the plan --------------------------------------------------------------------------------


def test_windows_hold_whole_utterances_inside_the_window():
    rng = np.random.default_rng(1)
    frames = np.clip(rng.gamma(2.0, 220, size=2000), 30, 3000).astype(int).tolist()
    frames[500] = 2990  # a clip near 30 s
    items = [(0, i) for i in range(2000)]
    gaps = rng.integers(10, 100, size=2000).tolist()
    windows = pack_stream(items, frames, [20] * 2000, gaps, PackingLimits(3000))
    assert sorted(p.index for w in windows for p in w) == list(range(2000))
    for window in windows:
        ends = [p.offset + frames[p.index] for p in window]
        assert all(p.offset % 2 == 0 for p in window)  # on the 0.02 s grid
        assert max(ends) <= 3000
        spans = sorted((p.offset, p.offset + frames[p.index]) for p in window)
        assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:], strict=False))  # no overlap
    (alone,) = [w for w in windows if any(p.index == 500 for p in w)]
    assert len(alone) == 1 and alone[0].offset + 2990 <= 3000
    speech = sum(frames) / (len(windows) * 3000)
    assert speech > 0.8, speech


def test_a_gap_longer_than_the_window_is_refused():
    with pytest.raises(ValueError, match="pack_gap_seconds"):
        PackingLimits(3000, gap_seconds=(0.5, 31.0))
    with pytest.raises(ValueError, match=r"timestamp_probability must lie in \[0, 1\]"):
        DataConfig(timestamp_probability=1.2).validate()
    with pytest.raises(ValueError, match="prompt_probability"):
        DataConfig(prompt_probability=-0.1).validate()
    with pytest.raises(ValueError, match="low <= high"):
        DataConfig(pack_gap_seconds=[1.0, 0.5]).validate()


def synthetic_index(sizes: list[int], seed: int = 0) -> LengthIndex:
    rng = np.random.default_rng(seed)
    frames = tuple(np.clip(rng.gamma(2.0, 220, n), 30, 3000).astype(np.int32) for n in sizes)
    texts = tuple(rng.integers(5, 60, n).astype(np.int32) for n in sizes)
    return LengthIndex(frames, texts)


def test_the_plan_is_a_pure_function_of_manifest_seed_and_epoch():
    index, limits = synthetic_index([300, 17, 250, 90]), PackingLimits(3000)
    first = plan_windows(index, limits, seed=3, epoch=2)
    assert first == plan_windows(index, limits, seed=3, epoch=2)
    assert first != plan_windows(index, limits, seed=3, epoch=1)
    assert first != plan_windows(index, limits, seed=4, epoch=2)
    assert sorted((p.shard, p.index) for w in first for p in w) == sorted(
        (s, i) for s, n in enumerate([300, 17, 250, 90]) for i in range(n)
    )


@pytest.mark.parametrize("num_workers", [0, 3])
def test_128_ranks_get_equal_windows_within_the_drop_bound(num_workers):
    index = synthetic_index([400] * 20)
    windows = plan_windows(index, PackingLimits(3000), seed=0, epoch=5)
    world = 128
    streams = sampling.resolve_streams(0, world, num_workers)
    seen, counts = [], set()
    for rank in range(world):
        for turns in sampling.loader_turns(rank, world, num_workers, streams):
            for stream in turns.streams:
                start, stop = sampling.stream_block(len(windows), streams, stream)
                counts.add(stop - start)
                seen.extend(range(start, stop))
    assert len(counts) == 1 and counts.pop() >= 1
    assert len(seen) == len(set(seen))
    assert len(windows) - len(seen) == len(windows) % streams <= sampling.dropped_bound(streams)


# --- the training split, read from shards ----------------------------------------------------


@pytest.fixture(scope="module")
def token_split(module_tmp, tokenizer):
    """Synthetic shards whose token members are real stored targets of the tiny tokenizer."""
    split_dir = module_tmp("packed") / "train"
    write_split(split_dir, [40, 9, 33])
    return split_dir


class FakeTargets(WindowTargets):
    """The synthetic shards' tokens are random ids: treat all but prefix and end as text."""

    def text_ids(self, stored, key):
        return [int(t) for t in stored[1:-1]]


def packed_data(split_dir, tokenizer, rank=0, world=1, **overrides) -> PackedTrainData:
    settings = dict(shards=str(split_dir.parent), batch_size=2, bucket_buffer=4, num_workers=2)
    settings["pack_gap_seconds"] = [0.02, 0.2]
    settings.update(overrides)
    config = DataConfig(**settings)
    fake = FakeTargets(tokenizer, "de", "transcribe", MAX_TARGET_POSITIONS)
    return PackedTrainData(split_dir, config, rank, world, fake, window_frames=120)


def window_keys(loader) -> list[list[str]]:
    return [batch["keys"] for batch in loader]


def test_every_rank_and_worker_gets_as_many_batches(token_split, tokenizer):
    ranks = [packed_data(token_split, tokenizer, rank, 3) for rank in range(3)]
    for epoch in (0, 1):
        lengths = {len(list(data.batches(epoch))) for data in ranks}
        assert lengths == {ranks[0].batches_per_epoch(epoch)}
        keys = [k for data in ranks for batch in window_keys(data.batches(epoch)) for k in batch]
        assert len(keys) == len(set(keys))
        dropped = ranks[0].dropped_per_epoch(epoch)
        assert ranks[0].streams == 12  # auto: 3 ranks x 2 workers, at least 8
        windows = len(ranks[0].windows(epoch))
        assert dropped == windows % 12 <= sampling.dropped_bound(12)
        assert len({k for k in keys}) == sum(
            len(w) for w in ranks[0].windows(epoch)[: windows - dropped]
        )


def packed_steps(split_dir, tokenizer, world, accum, epoch, start_step=0, **overrides):
    """Per optimiser step, its batches as (window keys, target tokens), whichever rank had them."""
    per_rank = []
    for rank in range(world):
        data = packed_data(split_dir, tokenizer, rank, world, streams=8, **overrides)
        loader = data.batches(epoch, start_step * accum)
        per_rank.append([(tuple(b["keys"]), b["tokens"].numpy().tobytes()) for b in loader])
    return [
        sorted(b for batches in per_rank for b in batches[s * accum : (s + 1) * accum])
        for s in range(len(per_rank[0]) // accum)
    ]


def test_packed_steps_are_the_same_batches_on_one_and_two_ranks(token_split, tokenizer):
    """Windows, prompts and timestamp choices belong to the window, batches to the stream:
    one rank x grad_accum 2 and two ranks x 1 (other workers, a resume mid-epoch on the other
    world size too) train every step on bit-identical batches."""
    reference = packed_steps(token_split, tokenizer, 1, 2, 1, prompt_probability=0.5)
    assert len(reference) >= 4
    two = packed_steps(token_split, tokenizer, 2, 1, 1, prompt_probability=0.5, num_workers=1)
    assert two == reference
    resumed = packed_steps(token_split, tokenizer, 2, 1, 1, 2, prompt_probability=0.5)
    assert resumed == reference[2:]


def test_packed_resume_yields_exactly_the_tail(token_split, tokenizer):
    data = packed_data(token_split, tokenizer, prompt_probability=0.5)
    full = list(data.batches(1))
    for start in (1, 3, len(full) - 1):
        tail = list(data.batches(1, start))
        assert len(tail) == len(full) - start
        for ours, theirs in zip(tail, full[start:], strict=True):
            assert ours["keys"] == theirs["keys"]
            assert torch.equal(ours["tokens"], theirs["tokens"])  # prompts included
            assert torch.equal(ours["features"], theirs["features"])


def test_packed_batches_lay_out_windows(token_split, tokenizer):
    data = packed_data(token_split, tokenizer)
    batch = next(iter(data.batches(0)))
    assert batch["features"].dtype == torch.float16 and batch["features"].shape[1] == N_MELS
    assert batch["features"].shape[2] <= 120
    assert sum(batch["window_sizes"]) == len(batch["keys"])
    full = window_features_to_full(batch["features"], 120)
    assert full.shape == (2, N_MELS, 120) and torch.isfinite(full).all()
    assert "shuffled" in data.order_signature()["sample_order"]
    assert data.order_signature()["packing"]["window_frames"] == 120


def test_length_index_is_cached_per_shard_checksums(token_split, tmp_path):
    from shard_builder import contract
    from trainer.data.packing import build_length_index, load_or_build_length_index

    manifest = contract.load_manifest(token_split)
    fresh = build_length_index(token_split, manifest)
    assert [len(f) for f in fresh.frames] == [40, 9, 33]
    first = load_or_build_length_index(token_split, manifest, tmp_path, progress=False)
    (cache,) = tmp_path.glob("lengths-*.npz")
    again = load_or_build_length_index(token_split, manifest, tmp_path, progress=False)
    for a, b, c in zip(
        fresh.frames + fresh.text_tokens,
        first.frames + first.text_tokens,
        again.frames + again.text_tokens,
        strict=True,
    ):
        assert np.array_equal(a, b) and np.array_equal(a, c)
    manifest["shards"][0]["sha256"] = "0" * 64  # rebuilt shards: the old lengths do not apply
    load_or_build_length_index(token_split, manifest, tmp_path, progress=False)
    assert len(list(tmp_path.glob("lengths-*.npz"))) == 2


def test_lone_utterances_train_the_per_utterance_input(token_split, tokenizer):
    """`lone_probability`: that share of utterances gets a window of its own at frame 0,
    `<|notimestamps|>` and no prompt (what trainer.evaluate's per-utterance WER decodes); the
    rest pack as before, and at 0 the plan is exactly the old one."""
    index, limits = synthetic_index([300, 17, 250, 90]), PackingLimits(3000)
    plain = plan_windows(index, limits, seed=3, epoch=2)
    assert plain == plan_windows(index, limits, seed=3, epoch=2, lone_probability=0.0)
    windows = plan_windows(index, limits, seed=3, epoch=2, lone_probability=0.2)
    lone = [w for w in windows if w[0].lone]
    assert all(len(w) == 1 and w[0].offset == 0 for w in lone)
    assert not any(p.lone for w in windows if len(w) > 1 for p in w)
    share = len(lone) / sum(len(w) for w in windows)
    assert 0.15 < share < 0.25  # of 657 utterances
    assert sorted((p.shard, p.index) for w in windows for p in w) == sorted(
        (p.shard, p.index) for w in plain for p in w
    )
    # Every other window timestamped and prompted: the only <|notimestamps|> windows are lone.
    data = packed_data(token_split, tokenizer, lone_probability=0.5, prompt_probability=1.0)
    data.settings.timestamp_probability = 1.0
    notimestamps = data.settings.targets.no_timestamps
    found = []
    for batch in data.batches(0):
        for size, tokens, unlabelled in zip(
            batch["window_sizes"], batch["tokens"], batch["unlabelled"], strict=True
        ):
            if notimestamps in tokens.tolist():
                found.append((size, int(unlabelled)))
    lone_windows = sum(w[0].lone for w in data.windows(0))
    assert found and set(found) == {(1, 0)}  # one utterance, no prompt
    assert lone_windows - data.dropped_per_epoch(0) <= len(found) <= lone_windows
    assert data.order_signature()["packing"]["lone_probability"] == 0.5
    assert (
        "lone_probability" not in packed_data(token_split, tokenizer).order_signature()["packing"]
    )
