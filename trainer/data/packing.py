"""Packed training windows: consecutive utterances of an epoch's stream share one 30 s window.

Whisper's encoder always sees a full window (3000 frames); the dataset's clips average ~4 s, so
one utterance per window spends most of every step on padding. Here the windows are filled with
several utterances, straight from the stored features (no rebuild), with targets in Whisper's
own timestamped format, so the decoding mode RealtimeSTT uses (timestamps on, often a prompt)
is the mode that is trained.

Features, exact. Each stored frame is `(max(x, m_i - 8) + 4) / 4`, with `m_i` the utterance's
log10 maximum. The window's maximum is `M = max_i m_i = 4 * (largest stored value) - 4`, and as
`M >= m_i`, clamping every frame again at `(max(-10, M - 8) + 4) / 4 = max(s - 2, -1.5)` (s the
largest stored value) gives what WhisperFeatureExtractor gives for the concatenated waveform
with silent gaps; gaps and the tail take that floor. Utterances start at even frames (multiples
of 320 samples, Whisper's 0.02 s timestamp grid). The collate leaves gaps at -inf;
`window_features_to_full` applies the floor on the device, where the unpacked path pads.

Which utterances share a window is a pure function of the manifest, the seed and the epoch:
the epoch's shuffled stream (`trainer.data.sampling`) is packed first-fit into a few open windows
(`OPEN_WINDOWS`), each utterance preceded by a silence drawn from a generator keyed by
(seed, epoch). The plan does not depend on ranks or workers. The windows are then the unit cut
into `data.streams` equal blocks, batched per stream and taken in turn by ranks and loader
workers, exactly as samples are in unpacked mode, so the same guarantees hold: equal batches on
every rank, at most `streams - 1` windows left out per epoch, exact resume, also on another
number of GPUs with the same global batch. Lengths
come from the shards' tar and .npy headers (`build_length_index`), never from their data.

Targets, every id from the tokenizer:
    [<|startofprev|> prompt...] <|startoftranscript|><|de|><|transcribe|>
        <|t_start|> text <|t_end|> <|t_start|> text <|t_end|> ... <|endoftext|>
or, with probability 1 - timestamp_probability, `<|notimestamps|>` and the texts one after the
other. An utterance drawn lone (`lone_probability`) has a window to itself from frame 0,
`<|notimestamps|>` and no prompt: the input of `trainer.evaluate`'s per-utterance WER. Each
text starts with a space token, as Whisper's own segments do (" Hallo Welt."); the stored
tokens have none, so the first word is re-encoded. The prompt (probability
`prompt_probability`) is the previous window's text, its last tokens up to 223 (Whisper's
limit) and to what the 448 positions leave; its positions carry no label.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import math
import os
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from shard_builder import contract
from shard_builder.reader import ShardReader, index_samples, npy_array, npy_shape_at
from trainer.data import sampling
from trainer.data.loader import (
    IGNORE_INDEX,
    decode_sample,
    make_loader,
    order_signature_base,
    shard_sizes_and_names,
)

OPEN_WINDOWS = 8  # first-fit candidates: fills ~all the tail space, keeps the stream's order
MAX_PROMPT_TOKENS = 223  # Whisper's limit: max_target_positions // 2 - 1
PREFIX_LENGTH = 4  # stored targets start <|startoftranscript|><|lang|><|task|><|notimestamps|>
TIME_STEP = 0.02  # seconds per timestamp token
FRAMES_PER_STEP = 2  # 10 ms frames per timestamp step
GAP_FILL = float("-inf")  # below any log-mel value: the device raises it to the window floor
_GAP_STREAM = 11  # generator tags, independent of trainer.data.sampling's
_WINDOW_STREAM = 12
_LONE_STREAM = 13
# Planned token cost of one utterance beyond its stored text tokens: two timestamps and one
# for the space the first word gains.
_TOKENS_PER_UTTERANCE = 3
_FIXED_TOKENS = 5  # <|startoftranscript|><|lang|><|task|>, <|notimestamps|> or none, <|eot|>


# --- lengths from headers ----------------------------------------------------------------------


@dataclass(frozen=True)
class LengthIndex:
    """Per shard (manifest order), per stored sample: feature frames and text tokens."""

    frames: tuple[np.ndarray, ...]
    text_tokens: tuple[np.ndarray, ...]

    @property
    def num_samples(self) -> int:
        return sum(len(f) for f in self.frames)


def shard_lengths(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(frames, text tokens) of each sample of one shard, in stored order, headers only."""
    frames, texts = [], []
    with open(path, "rb") as handle:
        for _, members in index_samples(handle, path):
            frames.append(npy_shape_at(handle, members[contract.MEL_MEMBER].offset)[-1])
            (length,) = npy_shape_at(handle, members[contract.TOKENS_MEMBER].offset)
            texts.append(length - PREFIX_LENGTH - 1)
    return np.asarray(frames, np.int32), np.asarray(texts, np.int32)


def load_or_build_length_index(
    split_dir: str | Path, manifest: dict[str, Any], cache_dir: Path | None, progress: bool
) -> LengthIndex:
    """The split's lengths, from `cache_dir` when an earlier start indexed these very shards.

    970k samples take minutes to index; a resumed run reads the cache instead. The file is named
    after the shards' checksums, so rebuilt shards are never matched with stale lengths.
    """
    digest = hashlib.sha256(
        "".join(f"{s['name']}:{s['sha256']};" for s in manifest["shards"]).encode()
    ).hexdigest()[:16]
    cache = None if cache_dir is None else Path(cache_dir) / f"lengths-{digest}.npz"
    if cache is not None and cache.is_file():
        with np.load(cache) as stored:
            sizes = np.cumsum(stored["shard_sizes"])[:-1]
            return LengthIndex(
                tuple(np.split(stored["frames"], sizes)),
                tuple(np.split(stored["text_tokens"], sizes)),
            )
    index = build_length_index(split_dir, manifest, progress)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        partial = cache.with_suffix(f".{os.getpid()}.partial.npz")
        np.savez(
            partial,
            shard_sizes=np.asarray([len(f) for f in index.frames], np.int64),
            frames=np.concatenate(index.frames),
            text_tokens=np.concatenate(index.text_tokens),
        )
        os.replace(partial, cache)  # ranks may race: each writes whole files, one wins
    return index


def build_length_index(
    split_dir: str | Path, manifest: dict[str, Any], progress: bool = False
) -> LengthIndex:
    """Lengths of every sample of a split: one header read per member, no feature data."""
    names = [shard["name"] for shard in manifest["shards"]]
    shards = names
    if progress:
        from tqdm import tqdm

        shards = tqdm(names, desc="indexing lengths", unit="shard", leave=False)
    frames, texts = [], []
    for shard, name in zip(manifest["shards"], shards, strict=True):
        shard_frames, shard_texts = shard_lengths(Path(split_dir) / name)
        if len(shard_frames) != shard["num_samples"]:
            raise contract.ContractError(
                f"{name} holds {len(shard_frames)} samples, not the {shard['num_samples']} "
                "the manifest records"
            )
        frames.append(shard_frames)
        texts.append(shard_texts)
    return LengthIndex(tuple(frames), tuple(texts))


# --- which utterances share a window -----------------------------------------------------------


@dataclass(frozen=True)
class Placed:
    """One utterance in a window: stored sample `index` of shard `shard`, from frame `offset`;
    `lone`: drawn to be trained alone (`lone_probability`), as one utterance per window is."""

    shard: int
    index: int
    offset: int
    lone: bool = False


@dataclass(frozen=True)
class PackingLimits:
    window_frames: int  # the encoder's input window, 3000 for released Whispers
    max_tokens: int = contract.MAX_TARGET_POSITIONS
    gap_seconds: tuple[float, float] = (0.1, 1.0)

    def __post_init__(self) -> None:
        low, high = self.gap_seconds
        if high * 100 >= self.window_frames:
            raise ValueError(
                f"pack_gap_seconds up to {high} s is not shorter than the "
                f"{self.window_frames / 100:g} s window: no utterance would fit after a gap"
            )


def even_up(frames: float) -> int:
    return FRAMES_PER_STEP * math.ceil(frames / FRAMES_PER_STEP)


def gap_frames(count: int, limits: PackingLimits, key: tuple[int, ...]) -> np.ndarray:
    low, high = limits.gap_seconds
    seconds = sampling.order_rng(_GAP_STREAM, *key).uniform(low, high, size=count)
    return np.rint(seconds * 100).astype(np.int64)


def pack_stream(
    items: Sequence[tuple[int, int]],
    frames: Sequence[int],
    text_tokens: Sequence[int],
    gaps: Sequence[int],
    limits: PackingLimits,
    open_windows: int = OPEN_WINDOWS,
    lone: Sequence[bool] | None = None,
) -> list[tuple[Placed, ...]]:
    """Windows of the stream `items` ((shard, index) pairs), first-fit into `open_windows`.

    An utterance flagged in `lone` gets a window of its own at frame 0, closed at once.

    Utterance i goes after a silence of `gaps[i]` frames into the first open window where its
    frames and tokens fit; if none has room it opens a new window, and the oldest window is
    closed once more than `open_windows` are open. A window never holds more frames than the
    encoder takes; a clip too long for its gap starts at frame 0 of a window of its own.
    """
    token_budget = limits.max_tokens - _FIXED_TOKENS
    open_: list[list] = []  # [placed list, next free frame, tokens used]
    closed: list[tuple[Placed, ...]] = []
    lone = lone if lone is not None else [False] * len(items)
    for (shard, index), length, text, gap, alone in zip(
        items, frames, text_tokens, gaps, lone, strict=True
    ):
        if alone:
            closed.append((Placed(int(shard), int(index), 0, lone=True),))
            continue
        cost = int(text) + _TOKENS_PER_UTTERANCE
        for window in open_:
            offset = even_up(window[1] + gap)
            if offset + length <= limits.window_frames and window[2] + cost <= token_budget:
                break
        else:
            window = [[], 0, 0]
            open_.append(window)
            offset = even_up(gap)
            if offset + length > limits.window_frames:
                offset = max(0, (limits.window_frames - length) // 2 * 2)
            if len(open_) > open_windows:
                closed.append(tuple(open_.pop(0)[0]))
        window[0].append(Placed(int(shard), int(index), offset))
        window[1], window[2] = offset + int(length), window[2] + cost
    closed.extend(tuple(window[0]) for window in open_)
    return closed


def epoch_stream(shard_sizes: Sequence[int], seed: int, epoch: int) -> list[tuple[int, int]]:
    """(shard, stored index) of every sample in the order the epoch reads them."""
    stream = []
    for shard in sampling.epoch_shard_order(len(shard_sizes), seed, epoch):
        order = sampling.shard_sample_order(shard_sizes[shard], (seed, epoch, shard))
        stream.extend((shard, int(i)) for i in order)
    return stream


def plan_windows(
    index: LengthIndex,
    limits: PackingLimits,
    *,
    seed: int,
    epoch: int | None,
    limit: int | None = None,
    lone_probability: float = 0.0,
) -> list[tuple[Placed, ...]]:
    """The epoch's windows; `epoch=None` packs the stored order (evaluation), first `limit`.

    Each utterance is drawn lone with `lone_probability` (a generator keyed by seed and epoch).
    """
    if epoch is None:
        items = [(s, i) for s, frames in enumerate(index.frames) for i in range(len(frames))]
        items = items[:limit] if limit is not None else items
    else:
        items = epoch_stream([len(f) for f in index.frames], seed, epoch)
    frames = [index.frames[s][i] for s, i in items]
    texts = [index.text_tokens[s][i] for s, i in items]
    key = (seed, -1 if epoch is None else epoch)
    gaps = gap_frames(len(items), limits, key)
    lone = sampling.order_rng(_LONE_STREAM, *key).random(len(items)) < lone_probability
    return pack_stream(items, frames, texts, gaps, limits, lone=lone.tolist())


# --- reading and building one window -----------------------------------------------------------


class WindowTargets:
    """Token sequences of packed windows, every id from the model's tokenizer."""

    def __init__(self, tokenizer, language: str, task: str, max_tokens: int) -> None:
        ids = tokenizer.convert_tokens_to_ids
        self.tokenizer = tokenizer
        self.prefix = [ids("<|startoftranscript|>"), ids(f"<|{language}|>"), ids(f"<|{task}|>")]
        self.no_timestamps = ids("<|notimestamps|>")
        self.start_of_prev = ids("<|startofprev|>")
        self.end = ids("<|endoftext|>")
        # Whisper's timestamp tokens follow <|notimestamps|>; HF tokenizers do not list them.
        self.timestamp_begin = self.no_timestamps + 1
        self.max_tokens = max_tokens
        self.stored_prefix = [*self.prefix, self.no_timestamps]

    def text_ids(self, stored: np.ndarray, key: str) -> list[int]:
        """The stored target's text tokens, the first word re-encoded with a leading space."""
        stored = [int(t) for t in stored]
        if stored[:PREFIX_LENGTH] != self.stored_prefix or stored[-1] != self.end:
            raise contract.ContractError(
                f"sample {key}: stored tokens {stored[:PREFIX_LENGTH]}... are not "
                f"{self.stored_prefix} ... {self.end} (shards tokenised for another language, "
                "task or tokenizer?)"
            )
        text = stored[PREFIX_LENGTH:-1]
        pieces = self.tokenizer.convert_ids_to_tokens(text)
        first = next((i for i, p in enumerate(pieces) if i and p.startswith("Ġ")), len(text))
        if not text or pieces[0].startswith("Ġ"):
            return text
        return [*self._spaced(tuple(text[:first])), *text[first:]]

    @functools.lru_cache(maxsize=65536)  # noqa: B019 (one instance per loader worker)
    def _spaced(self, word_ids: tuple[int, ...]) -> tuple[int, ...]:
        word = self.tokenizer.decode(list(word_ids))
        return tuple(self.tokenizer.encode(" " + word, add_special_tokens=False))

    def timestamp(self, seconds: float) -> int:
        return self.timestamp_begin + round(seconds / TIME_STEP)

    def sequence(
        self, texts: Sequence[list[int]], spans: Sequence[tuple[float, float]], timestamps: bool
    ) -> list[int]:
        if not timestamps:
            body = [t for text in texts for t in text]
            return [*self.prefix, self.no_timestamps, *body, self.end]
        body = []
        for text, (start, end) in zip(texts, spans, strict=True):
            body += [self.timestamp(start), *text, self.timestamp(end)]
        return [*self.prefix, *body, self.end]

    def with_prompt(self, sequence: list[int], prompt: Sequence[int]) -> tuple[list[int], int]:
        """(sequence, unlabelled): the prompt's last tokens that fit, and how many leading
        labels (the prompt's and <|startoftranscript|>'s) the loss ignores."""
        room = min(MAX_PROMPT_TOKENS, self.max_tokens - len(sequence) - 1)
        if room <= 0 or not prompt:
            return sequence, 0
        kept = list(prompt[-room:])
        return [self.start_of_prev, *kept, *sequence], 1 + len(kept)


@dataclass(frozen=True)
class WindowChoices:
    timestamps: bool
    prompt: bool


def window_choices(
    seed: int, epoch: int, window: int, timestamp_probability: float, prompt_probability: float
) -> WindowChoices:
    draw = sampling.order_rng(_WINDOW_STREAM, seed, epoch, window).random(2)
    return WindowChoices(bool(draw[0] < timestamp_probability), bool(draw[1] < prompt_probability))


def build_window(
    samples: Sequence[dict[str, Any]],
    placed: Sequence[Placed],
    targets: WindowTargets,
    choices: WindowChoices,
    prompt: Sequence[int] = (),
) -> dict[str, Any]:
    """One window: features float16 [n_mels, end] (gaps at -inf), tokens and what reports need.

    `texts` holds each utterance's text ids: the next window's prompt is made from them.
    """
    n_mels = samples[0]["features"].shape[0]
    end = max(p.offset + s["features"].shape[1] for p, s in zip(placed, samples, strict=True))
    features = np.full((n_mels, end), GAP_FILL, dtype=np.float16)
    texts, spans = [], []
    for sample, p in zip(samples, placed, strict=True):
        mel = sample["features"]
        features[:, p.offset : p.offset + mel.shape[1]] = mel
        texts.append(targets.text_ids(sample["tokens"], sample["key"]))
        start = p.offset / 100
        spans.append((start, _end_time(start, sample["duration"], mel.shape[1], p.offset)))
    timestamps = choices.timestamps
    sequence = targets.sequence(texts, spans, timestamps)
    if len(sequence) > targets.max_tokens and timestamps:
        timestamps, sequence = False, targets.sequence(texts, spans, False)
    if len(sequence) > targets.max_tokens:  # only a lone, extremely long text: keep it unspaced
        texts = [[int(t) for t in s["tokens"][PREFIX_LENGTH:-1]] for s in samples]
        sequence = targets.sequence(texts, spans, False)
    unlabelled = 0
    if choices.prompt:
        sequence, unlabelled = targets.with_prompt(sequence, prompt)
    return {
        "features": features,
        "tokens": np.asarray(sequence, dtype=np.int64),
        "unlabelled": unlabelled,
        "timestamps": timestamps,
        "texts": texts,
        "keys": [s["key"] for s in samples],
        "transcripts": [s["text"] for s in samples],
        "sources": [s["source"] for s in samples],
        "durations": [s["duration"] for s in samples],
        "spans": spans,
    }


def _end_time(start: float, duration: float, frames: int, offset: int) -> float:
    """The utterance's end on the 0.02 s grid, after its start, inside its stored frames."""
    steps = max(1, round(duration / TIME_STEP))
    limit = (offset + frames) // FRAMES_PER_STEP - offset // FRAMES_PER_STEP
    return start + min(steps, limit) * TIME_STEP


def prompt_of(texts: Sequence[list[int]]) -> list[int]:
    return [t for text in texts for t in text]


def collate_windows(windows: list[dict[str, Any]]) -> dict[str, Any]:
    """Windows -> one batch, as `trainer.data.loader.collate` lays out samples, plus what packing
    adds.

    features float16 [B, n_mels, T] (T = the furthest used frame; -inf where no utterance
    lies), tokens int64 [B, L] (-100 after each), unlabelled int64 [B] (leading labels the
    loss ignores: the prompt); keys, texts, sources, durations list the utterances;
    window_sizes [B] says how many belong to each window.
    """
    n_mels = windows[0]["features"].shape[0]
    frames = max(w["features"].shape[1] for w in windows)
    length = max(len(w["tokens"]) for w in windows)
    features = np.full((len(windows), n_mels, frames), GAP_FILL, dtype=np.float16)
    tokens = np.full((len(windows), length), IGNORE_INDEX, dtype=np.int64)
    for i, window in enumerate(windows):
        features[i, :, : window["features"].shape[1]] = window["features"]
        tokens[i, : len(window["tokens"])] = window["tokens"]
    return {
        "features": torch.from_numpy(features),
        "tokens": torch.from_numpy(tokens),
        "unlabelled": torch.tensor([w["unlabelled"] for w in windows], dtype=torch.int64),
        "token_lengths": torch.tensor([len(w["tokens"]) for w in windows], dtype=torch.int64),
        "keys": [k for w in windows for k in w["keys"]],
        "texts": [t for w in windows for t in w["transcripts"]],
        "sources": [s for w in windows for s in w["sources"]],
        "durations": [d for w in windows for d in w["durations"]],
        "spans": [w["spans"] for w in windows],
        "window_sizes": [len(w["keys"]) for w in windows],
        "timestamps": [w["timestamps"] for w in windows],
    }


def window_features_to_full(features: torch.Tensor, max_frames: int) -> torch.Tensor:
    """[B, n_mels, T] packed frames (gaps -inf) -> float32 [B, n_mels, max_frames], exactly
    WhisperFeatureExtractor's values for the window's concatenated audio (see module doc)."""
    batch, n_mels, frames = features.shape
    if frames > max_frames:
        raise ValueError(f"features hold {frames} frames, more than max_frames={max_frames}")
    values = features.float()
    top = values.amax(dim=(1, 2), keepdim=True)
    floor = torch.clamp(top - 2.0, min=-1.5)
    full = floor.expand(batch, n_mels, max_frames).clone()
    full[:, :, :frames] = torch.maximum(values, floor)
    return full


# --- one worker's batches ----------------------------------------------------------------------


@dataclass(frozen=True)
class WindowStreamPlan:
    """One stream's windows of an epoch: global indices [start, stop) of the plan."""

    start: int
    stop: int
    rng_key: tuple[int, ...]  # (seed, epoch, stream)
    first_batch: int = 0

    @property
    def num_samples(self) -> int:
        return self.stop - self.start


@dataclass
class PackingSettings:
    """What a worker needs to turn planned windows into batches."""

    targets: WindowTargets
    seed: int
    timestamp_probability: float
    prompt_probability: float
    batch_size: int
    bucket_buffer: int


def window_batches(
    reader: ShardReader,
    windows: Sequence[tuple[Placed, ...]],
    plan: WindowStreamPlan,
    epoch: int,
    settings: PackingSettings,
) -> Iterator[dict[str, Any]]:
    """A stream's collated batches of windows; buffers before `plan.first_batch` are skipped
    without reading, only the window before the first built one is read again for its text."""
    first_buffer, skip_in_buffer = sampling.resume_point(
        plan.first_batch, settings.bucket_buffer, settings.batch_size
    )
    start = plan.start + first_buffer * settings.bucket_buffer
    prompt = _window_prompt(reader, windows, start - 1, settings.targets)
    for buffer_index in itertools.count(first_buffer):
        low = plan.start + buffer_index * settings.bucket_buffer
        high = min(plan.stop, low + settings.bucket_buffer)
        if low >= high:
            return
        built = []
        for number in range(low, high):
            placed = windows[number]
            samples = [decode_sample(*reader.read(p.shard, p.index)) for p in placed]
            choices = window_choices(
                settings.seed,
                epoch,
                number,
                settings.timestamp_probability,
                settings.prompt_probability,
            )
            if placed[0].lone:
                choices = WindowChoices(timestamps=False, prompt=False)
            window = build_window(samples, placed, settings.targets, choices, prompt)
            prompt = prompt_of(window["texts"])
            built.append(window)
        lengths = [len(w["tokens"]) for w in built]
        skip = skip_in_buffer if buffer_index == first_buffer else 0
        batches = sampling.buffer_batches(
            lengths, settings.batch_size, plan.rng_key, buffer_index, skip
        )
        for indices in batches:
            yield collate_windows([built[i] for i in indices])


def _window_prompt(reader, windows, number: int, targets: WindowTargets) -> list[int]:
    """The prompt the window after `number` gets: window `number`'s text, its tokens only."""
    if number < 0:
        return []
    texts = []
    for p in windows[number]:
        key, data = reader.read(p.shard, p.index, (contract.TOKENS_MEMBER,))
        texts.append(targets.text_ids(npy_array(data[contract.TOKENS_MEMBER]), key))
    return prompt_of(texts)


# --- the training split, packed ----------------------------------------------------------------


class PlannedWindows(IterableDataset):
    """Each DataLoader worker yields the batches of its own plan (worker i -> plans[i])."""

    def __init__(self, split_dir, shard_names, windows, plans, epoch, settings, length) -> None:
        self.split_dir, self.shard_names, self.windows = Path(split_dir), list(shard_names), windows
        self.plans, self.epoch, self.settings, self.length = plans, epoch, settings, length

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, num_workers = (0, 1) if info is None else (info.id, info.num_workers)
        assert num_workers == len(self.plans), (num_workers, len(self.plans))
        reader = ShardReader(self.split_dir, self.shard_names)  # shared by the worker's streams
        plan = self.plans[worker]
        try:
            streams = [
                window_batches(reader, self.windows, stream, self.epoch, self.settings)
                for stream in plan.streams
            ]
            yield from sampling.interleave(streams, plan.first_turn)
        finally:
            reader.close()

    def __len__(self) -> int:
        return self.length


class PackedTrainData:
    """The training split for one rank in packed windows; the interface of `TrainData`.

    Window counts change from epoch to epoch (the stream is reshuffled, so the packing is
    too): `batches_per_epoch(epoch)` answers per epoch, the same on every rank. `grad_accum`:
    as for `TrainData`, part of the global batch the order signature records.
    """

    def __init__(
        self,
        split_dir,
        config,
        rank: int,
        world_size: int,
        targets: WindowTargets,
        window_frames: int,
        progress: bool = False,
        cache_dir: Path | None = None,
        grad_accum: int = 1,
    ) -> None:
        config.validate()
        self.split_dir, self.config = Path(split_dir), config
        self.rank, self.world_size, self.grad_accum = rank, world_size, grad_accum
        self.streams = sampling.resolve_streams(config.streams, world_size, config.num_workers)
        self.manifest = contract.load_manifest(self.split_dir)
        self.shard_sizes, self.shard_names = shard_sizes_and_names(self.manifest)
        self.limits = PackingLimits(window_frames, targets.max_tokens, config.gap_range())
        self.index = load_or_build_length_index(self.split_dir, self.manifest, cache_dir, progress)
        self.settings = PackingSettings(
            targets,
            config.seed,
            config.timestamp_probability,
            config.prompt_probability,
            config.batch_size,
            config.bucket_buffer,
        )
        self._planned: OrderedDict[int, list] = OrderedDict()
        if self.windows_per_stream(0) < 1:
            raise ValueError(
                f"{self.split_dir} packs into {len(self.windows(0))} windows, too few for "
                f"{self.streams} data streams (data.streams)"
            )

    def windows(self, epoch: int) -> list[tuple[Placed, ...]]:
        if epoch not in self._planned:
            self._planned[epoch] = plan_windows(
                self.index,
                self.limits,
                seed=self.config.seed,
                epoch=epoch,
                lone_probability=self.config.lone_probability,
            )
            if len(self._planned) > 2:
                self._planned.popitem(last=False)
        return self._planned[epoch]

    def windows_per_stream(self, epoch: int) -> int:
        return sampling.units_per_stream(len(self.windows(epoch)), self.streams)

    def batches_per_epoch(self, epoch: int = 0) -> int:
        per_stream = sampling.batches_for(
            self.windows_per_stream(epoch), self.config.bucket_buffer, self.config.batch_size
        )
        return per_stream * self.streams // self.world_size

    def _stream_block(self, epoch: int, stream: int) -> tuple[int, int]:
        return sampling.stream_block(len(self.windows(epoch)), self.streams, stream)

    def samples_per_epoch(self, epoch: int = 0) -> int:
        """Utterances in this rank's windows (ranks differ a little: windows hold more or fewer)."""
        windows = self.windows(epoch)
        own = range(self.rank, self.streams, self.world_size)  # stream s goes to rank s % R
        blocks = [self._stream_block(epoch, stream) for stream in own]
        return sum(len(windows[i]) for a, b in blocks for i in range(a, b))

    def dropped_per_epoch(self, epoch: int = 0) -> int:
        """Windows an epoch leaves out so that every stream has as many."""
        return len(self.windows(epoch)) - self.windows_per_stream(epoch) * self.streams

    def describe(self, epoch: int = 0) -> str:
        """One line for the log: how full the epoch's windows are."""
        windows = self.windows(epoch)
        utterances = sum(len(w) for w in windows)
        frames = sum(int(self.index.frames[p.shard][p.index]) for window in windows for p in window)
        share = frames / (len(windows) * self.limits.window_frames)
        return (
            f"packed: {utterances} utterances in {len(windows)} windows in epoch {epoch} "
            f"({utterances / len(windows):.2f} per window, {100 * share:.1f} % of the window "
            f"frames hold speech) and {self.streams} data streams; "
            f"{self.dropped_per_epoch(epoch)} window(s) left out so that every data stream "
            "gets as many"
        )

    def order_signature(self) -> dict[str, Any]:
        global_batch = self.world_size * self.grad_accum
        signature = order_signature_base(self.manifest, self.config, self.streams, global_batch)
        signature.update(
            packing={
                "open_windows": OPEN_WINDOWS,
                "window_frames": self.limits.window_frames,
                "gap_seconds": list(self.limits.gap_seconds),
                "timestamp_probability": self.config.timestamp_probability,
                "prompt_probability": self.config.prompt_probability,
            }
        )
        if self.config.lone_probability:  # absent at 0, so checkpoints from before still match
            signature["packing"]["lone_probability"] = self.config.lone_probability
        return signature

    def batches(self, epoch: int, start_batch: int = 0) -> DataLoader:
        total = self.batches_per_epoch(epoch)
        if not 0 <= start_batch <= total:
            raise ValueError(f"start_batch {start_batch} outside [0, {total}] for this epoch")
        plans = []
        turns = sampling.loader_turns(
            self.rank, self.world_size, self.config.num_workers, self.streams, start_batch
        )
        for worker in turns:
            streams = tuple(
                WindowStreamPlan(
                    *self._stream_block(epoch, stream), (self.config.seed, epoch, stream), first
                )
                for stream, first in zip(worker.streams, worker.first_batches, strict=True)
            )
            plans.append(sampling.WorkerPlan(streams, worker.first_turn))
        dataset = PlannedWindows(
            self.split_dir,
            self.shard_names,
            self.windows(epoch),
            plans,
            epoch,
            self.settings,
            total - start_batch,
        )
        return make_loader(dataset, self.config)
