"""Batches for training and evaluation, streamed from the builder's tar shards.

The order of an epoch is planned from the manifest alone (`trainer.data.sampling`): the epoch's
shuffled shard stream is cut into `data.streams` equal contiguous blocks (virtual streams),
each bucket-batched on its own, and the ranks and DataLoader workers take the streams' batches
in turn, so every rank has exactly the same number of batches and no rank ever waits at a
collective for one that ran out (the classic webdataset + DDP end-of-epoch hang). The price is
at most `streams - 1` samples left out per epoch, different ones each epoch because the shard
order changes. Which batches make up an optimiser step depends on the streams and on the
global batch (ranks x grad_accum), not on the number of ranks or workers.

Resume is exact and cheap: `batches(epoch, start_batch)` yields exactly the batches from index
`start_batch` on. Each stream skips whole bucket buffers without reading their data and
rebuilds only the buffer it stopped in, so a resume never re-reads the epoch from its start.
The position is valid for the same shards, streams, global batch, batch size, bucket buffer
and seed: `TrainData.order_signature()` names them for the checkpoint.

Shards are read through `shard_builder.reader`, the checker's reader too. Only torch, numpy, the
standard library and `shard_builder`'s contract, reader and storage are imported: the GPU
machine has no audio or dataset libraries.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from itertools import count, islice
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from shard_builder import contract, reader, storage
from trainer.data import sampling
from trainer.runtime import preemption

IGNORE_INDEX = -100  # label padding the loss ignores (HF's convention)


def _help(text: str, **kwargs):
    return field(metadata={"help": text}, **kwargs)


@dataclass
class DataConfig:
    shards: str = _help(
        "folder holding one subfolder per split, as the builder wrote it, or such a folder at "
        "a URL (s3://, gs://, hf://, https://; mirrored into shard_cache, see "
        "shard_builder/storage.py)",
        default="",
    )
    shard_cache: str = _help(
        "local folder for shards read from a URL (default: $SHARD_CACHE_DIR, else "
        "~/.cache/whisper-german-trainer/shards); a local --shards is read in place",
        default="",
    )
    train_split: str = _help("split to train on (a subfolder of `shards`)", default="train")
    eval_split: str = _help("split to evaluate on (a subfolder of `shards`)", default="test")
    batch_size: int | str = _help(
        "samples (packed: windows) per device per micro-step, or auto: the largest that fits "
        "the card, measured at setup, with the windows per step of fit.reference_batch_size "
        "(trainer/runtime/fit.py; on the CPU auto is the reference batch). 2 x grad_accum 12 is "
        "what trainer.plan finds to fit turbo on a 16 GB GPU",
        default="auto",
    )
    num_workers: int = _help(
        "DataLoader worker processes per rank (0 = load in the training process)", default=2
    )
    streams: int = _help(
        "virtual data streams the epoch is cut into, each batched on its own (trainer/"
        "sampling.py); a multiple of ranks x loader workers. 0 = auto: the smallest such "
        "multiple >= 8, recorded in the checkpoint and kept on resume, so a run can resume on "
        "any number of GPUs that divides it",
        default=0,
    )
    bucket_buffer: int = _help(
        "samples gathered, sorted by token length and cut into batches; a multiple of "
        "batch_size (larger: less padding, coarser shuffle)",
        default=64,
    )
    prefetch_factor: int = _help("batches each worker prepares ahead", default=2)
    pin_memory: bool = _help(
        "pin batches in page-locked memory (only effective on CUDA)", default=True
    )
    seed: int = _help("seed of the shard and batch order (combined with the epoch)", default=0)
    eval_limit: int | None = _help(
        "evaluate only the first N samples of the eval split (a fixed subset)", default=None
    )
    pack: bool = _help(
        "train on packed windows: consecutive utterances of the epoch's stream share one "
        "encoder window, with Whisper's timestamp tokens and previous-text prompts "
        "(trainer/data/packing.py); batch_size then counts windows",
        default=True,
    )
    timestamp_probability: float = _help(
        "packed mode: share of windows trained with timestamp tokens (the rest use "
        "<|notimestamps|>)",
        default=0.5,
    )
    prompt_probability: float = _help(
        "packed mode: share of windows whose target starts with <|startofprev|> and the "
        "previous window's text (not trained on)",
        default=0.3,
    )
    lone_probability: float = _help(
        "packed mode: share of utterances trained alone, from frame 0 of a window of their "
        "own, <|notimestamps|>, no prompt: the input trainer.evaluate's headline WER decodes, "
        "which packed windows otherwise almost never show",
        default=0.0,
    )
    pack_gap_seconds: list[float] = _help(
        "packed mode: silence between utterances, one value or a range `low,high` drawn "
        "uniformly per gap",
        default_factory=lambda: [0.1, 1.0],
    )

    def train_dir(self) -> str | Path:
        """The train split's location: a local folder, or a URL for `local_split_dir`."""
        return storage.join(self.shards, self.train_split)

    def eval_dir(self) -> str | Path:
        return storage.join(self.shards, self.eval_split)

    def local_split_dir(self, location: str | Path, progress: bool = True) -> Path:
        """A local folder holding the split: `location` itself, or its verified mirror."""
        return storage.local_split(location, self.shard_cache or None, progress)

    def validate(self) -> None:
        auto = self.batch_size == "auto"  # resolved by trainer/runtime/fit.py
        if not auto and (not isinstance(self.batch_size, int) or isinstance(self.batch_size, bool)):
            raise ValueError(f"batch_size must be a whole number or auto, not {self.batch_size!r}")
        if self.bucket_buffer < 1 or (not auto and self.batch_size < 1):
            raise ValueError("batch_size and bucket_buffer must be at least 1")
        if not auto and self.bucket_buffer % self.batch_size:
            raise ValueError(
                f"bucket_buffer {self.bucket_buffer} is not a multiple of batch_size "
                f"{self.batch_size}: a full buffer must cut into whole batches for exact resume"
            )
        if self.num_workers < 0 or self.prefetch_factor < 1:
            raise ValueError("num_workers must be >= 0 and prefetch_factor >= 1")
        if self.streams < 0:
            raise ValueError(f"streams must be >= 0 (0 = auto), not {self.streams}")
        if self.eval_limit is not None and self.eval_limit < 1:
            raise ValueError("eval_limit must be at least 1 (or unset)")
        self.validate_packing()

    def gap_range(self) -> tuple[float, float]:
        """`pack_gap_seconds` as (low, high); one value is a fixed gap."""
        gaps = self.pack_gap_seconds
        values = [float(gaps)] if isinstance(gaps, int | float) else [float(g) for g in gaps]
        if len(values) not in (1, 2):
            raise ValueError(
                f"pack_gap_seconds must be one value or a range low,high, not {gaps!r}"
            )
        return values[0], values[-1]

    def validate_packing(self) -> None:
        for name in ("timestamp_probability", "prompt_probability", "lone_probability"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1], not {value}")
        low, high = self.gap_range()
        if low < 0 or high < low:
            raise ValueError(
                f"pack_gap_seconds must be >= 0 with low <= high, not {self.pack_gap_seconds!r}"
            )


class DataMismatchError(ValueError):
    """The shards were built for another model (mel bins, window, tokenizer) or are not a split."""


# --- checking a split against the model --------------------------------------------------------


def check_split(
    split_dir: str | Path,
    n_mels: int,
    tokenizer_fingerprint: str,
    window_frames: int,
) -> dict[str, Any]:
    """The split's manifest, once it is known to fit a model with these mel bins, this input
    window (`2 * max_source_positions` frames, 3000 for released Whispers) and this tokenizer."""
    split_dir = Path(split_dir)
    if not split_dir.is_dir():
        raise DataMismatchError(f"{split_dir} is not a folder: no built split there")
    try:
        manifest = contract.load_manifest(split_dir)
    except contract.ContractError as error:
        raise DataMismatchError(str(error)) from None
    shard_mels = manifest["features"]["n_mels"]
    if shard_mels != n_mels:
        raise DataMismatchError(
            f"{split_dir} holds features with n_mels={shard_mels} but the model expects "
            f"n_mels={n_mels}: rebuild the shards with this model's feature extractor"
        )
    shard_window = contract.max_frames_of(manifest)
    if shard_window != window_frames:
        raise DataMismatchError(
            f"{split_dir} was built for a {shard_window}-frame input window but the model's "
            f"encoder takes {window_frames} frames: rebuild the shards with this model's "
            "preprocessor (its nb_max_frames)"
        )
    tokenizer = manifest["tokenizer"]
    if tokenizer["fingerprint"] != tokenizer_fingerprint:
        raise DataMismatchError(
            f"{split_dir} was tokenised with tokenizer fingerprint {tokenizer['fingerprint']} "
            f"({tokenizer.get('name_or_path')}) but the model's tokenizer has fingerprint "
            f"{tokenizer_fingerprint}: rebuild the shards with this model's tokenizer"
        )
    for shard in manifest["shards"]:
        path = split_dir / shard["name"]
        if not path.is_file() or path.stat().st_size != shard["bytes"]:
            raise DataMismatchError(
                f"{path}: missing or not the {shard['bytes']} bytes the manifest records; "
                "run scripts/check_shards.py on the split"
            )
    return manifest


# --- reading samples out of tar shards ---------------------------------------------------------


def iter_span_samples(split_dir: Path, shard_names: Sequence[str], spans) -> Iterator[dict]:
    """Decoded samples of `spans`, in their order: stored, or the epoch's in-shard shuffle.

    Each shard's header index is read once (512 bytes per member), then samples by offset, so
    neither a shuffle nor a resume reads a sample it does not yield.
    """
    with reader.ShardReader(split_dir, shard_names, keep_open=1) as shards:
        for span in spans:
            check_sample_count(split_dir / shard_names[span.shard], shards.index(span.shard), span)
            if span.order_key is None:
                positions = range(span.start, span.stop)
            else:
                order = sampling.shard_sample_order(span.shard_size, span.order_key)
                positions = order[span.start : span.stop]
            for position in positions:
                yield decode_sample(*shards.read(span.shard, int(position)))


def iter_split_samples(split_dir: str | Path) -> Iterator[dict]:
    """Every sample of a split, in stored order (for tools; training reads planned spans)."""
    sizes, names = shard_sizes_and_names(contract.load_manifest(split_dir))
    spans = [sampling.Span(i, 0, size, shard_size=size) for i, size in enumerate(sizes)]
    yield from iter_span_samples(Path(split_dir), names, spans)


def check_sample_count(path: Path, index: list, span: sampling.Span) -> None:
    """A shard holding other than the manifest's count would shift every position after it."""
    expected = span.shard_size or span.stop
    if len(index) < expected:
        relation = "fewer than"
    elif span.shard_size and len(index) != span.shard_size:
        relation = "more than"
    else:
        return
    raise contract.ContractError(
        f"{path} holds {len(index)} samples, {relation} the {expected} the manifest records"
    )


def decode_sample(key: str, members: dict[str, bytes]) -> dict[str, Any]:
    missing = set(contract.MEMBERS) - set(members)
    if missing:
        raise contract.ContractError(f"sample {key} lacks member(s) {sorted(missing)}")
    meta = json.loads(members[contract.META_MEMBER])
    return {
        "key": key,
        "features": reader.npy_array(members[contract.MEL_MEMBER]),
        "tokens": reader.npy_array(members[contract.TOKENS_MEMBER]),
        "pad_value": float(meta["pad_value"]),
        "text": meta["text"],
        "source": meta["source"],
        "duration": float(meta["duration"]),
    }


# --- batches -----------------------------------------------------------------------------------


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Samples -> one batch; features stay float16, the device pads them to the full window.

    features float16 [B, n_mels, T] (T = longest stored frames, each sample padded with its own
    pad value), pad_values float32 [B], num_frames int64 [B], tokens int64 [B, L] (full target
    sequences, -100 after each), token_lengths int64 [B]; keys, texts, sources (list[str]) and
    durations (list[float], audio seconds).
    """
    num_frames = [sample["features"].shape[1] for sample in samples]
    token_lengths = [len(sample["tokens"]) for sample in samples]
    n_mels = samples[0]["features"].shape[0]
    features = np.empty((len(samples), n_mels, max(num_frames)), dtype=np.float16)
    tokens = np.full((len(samples), max(token_lengths)), IGNORE_INDEX, dtype=np.int64)
    for i, sample in enumerate(samples):
        features[i, :, : num_frames[i]] = sample["features"]
        features[i, :, num_frames[i] :] = sample["pad_value"]
        tokens[i, : token_lengths[i]] = sample["tokens"]
    return {
        "features": torch.from_numpy(features),
        "pad_values": torch.tensor([s["pad_value"] for s in samples], dtype=torch.float32),
        "num_frames": torch.tensor(num_frames, dtype=torch.int64),
        "tokens": torch.from_numpy(tokens),
        "token_lengths": torch.tensor(token_lengths, dtype=torch.int64),
        "keys": [s["key"] for s in samples],
        "texts": [s["text"] for s in samples],
        "sources": [s["source"] for s in samples],
        "durations": [s.get("duration", 0.0) for s in samples],  # audio seconds, for reports
    }


def pad_features_to_full(
    features: torch.Tensor,
    pad_values: torch.Tensor,
    max_frames: int = contract.MAX_FRAMES,
    num_frames: torch.Tensor | None = None,
) -> torch.Tensor:
    """[B, n_mels, T] stored frames -> float32 [B, n_mels, max_frames], as the extractor pads.

    Frames past T take each sample's float32 pad value. With `num_frames`, the frames the
    collate padded in float16 (between a sample's own length and T) are also reset to the
    exact float32 pad value, so the result does not depend on which batch a sample landed in.
    """
    batch, n_mels, frames = features.shape
    if frames > max_frames:
        raise ValueError(f"features hold {frames} frames, more than max_frames={max_frames}")
    pad = pad_values.to(device=features.device, dtype=torch.float32)[:, None, None]
    full = pad.expand(batch, n_mels, max_frames).clone()
    full[:, :, :frames] = features
    if num_frames is not None:
        positions = torch.arange(max_frames, device=features.device)
        is_pad = positions[None, None, :] >= num_frames.to(features.device)[:, None, None]
        full = torch.where(is_pad, pad, full)
    return full


def stream_batches(
    split_dir: Path, shard_names: Sequence[str], plan: sampling.StreamPlan, config: DataConfig
) -> Iterator[dict[str, Any]]:
    """One stream's collated batches; whole buffers before `plan.first_batch` are never read."""
    first_buffer, skip_in_buffer = sampling.resume_point(
        plan.first_batch, config.bucket_buffer, config.batch_size
    )
    spans = sampling.skip_samples(plan.spans, first_buffer * config.bucket_buffer)
    samples = iter_span_samples(split_dir, shard_names, spans)
    for buffer_index in count(first_buffer):
        buffer = list(islice(samples, config.bucket_buffer))
        if not buffer:
            return
        lengths = [len(sample["tokens"]) for sample in buffer]
        skip = skip_in_buffer if buffer_index == first_buffer else 0
        batches = sampling.buffer_batches(
            lengths, config.batch_size, plan.rng_key, buffer_index, skip
        )
        for indices in batches:
            yield collate([buffer[i] for i in indices])


class PlannedBatches(IterableDataset):
    """Each DataLoader worker yields the batches of its own plan (worker i -> plans[i])."""

    def __init__(self, split_dir, shard_names, plans, config: DataConfig, length: int) -> None:
        self.split_dir, self.shard_names, self.plans = Path(split_dir), list(shard_names), plans
        self.config, self.length = config, length

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, num_workers = (0, 1) if info is None else (info.id, info.num_workers)
        assert num_workers == len(self.plans), (num_workers, len(self.plans))
        plan = self.plans[worker]
        streams = [
            stream_batches(self.split_dir, self.shard_names, stream, self.config)
            for stream in plan.streams
        ]
        yield from sampling.interleave(streams, plan.first_turn)

    def __len__(self) -> int:
        return self.length


def make_loader(dataset: PlannedBatches, config: DataConfig) -> DataLoader:
    # batch_size=None: workers yield whole batches, taken round robin (worker 0, 1, ..., 0, ...)
    return DataLoader(
        dataset,
        batch_size=None,
        num_workers=config.num_workers,
        pin_memory=config.pin_memory and torch.cuda.is_available(),
        prefetch_factor=config.prefetch_factor if config.num_workers > 0 else None,
        in_order=True,
        worker_init_fn=preemption.ignore_in_loader_worker,  # a Ctrl-C must not end the step
    )


def shard_sizes_and_names(manifest: dict[str, Any]) -> tuple[list[int], list[str]]:
    return (
        [shard["num_samples"] for shard in manifest["shards"]],
        [shard["name"] for shard in manifest["shards"]],
    )


def order_signature_base(
    manifest: dict[str, Any], config: DataConfig, streams: int, global_batch: int
) -> dict[str, Any]:
    """What the order of batches and steps depends on, packed or not: never ranks or workers."""
    return {
        "shards": [[shard["name"], shard["sha256"]] for shard in manifest["shards"]],
        "streams": streams,
        "global_batch": global_batch,  # loader batches per optimiser step, all ranks together
        "batch_size": config.batch_size,
        "bucket_buffer": config.bucket_buffer,
        "seed": config.seed,
        # Checkpoints from before samples were shuffled inside shards lack this: refused.
        "sample_order": "shuffled-within-shard",
    }


class TrainData:
    """The training split for one rank: equal batch counts on every rank, exact resume.

    `grad_accum`: loader batches per optimiser step on each rank; with the world size it makes
    the global batch, which the order signature records (trainer/runtime/elastic.py keeps it on
    resume).
    """

    def __init__(
        self, split_dir, config: DataConfig, rank: int, world_size: int, grad_accum: int = 1
    ) -> None:
        config.validate()
        self.split_dir, self.config = Path(split_dir), config
        self.rank, self.world_size, self.grad_accum = rank, world_size, grad_accum
        self.streams = sampling.resolve_streams(config.streams, world_size, config.num_workers)
        self.manifest = contract.load_manifest(self.split_dir)
        self.shard_sizes, self.shard_names = shard_sizes_and_names(self.manifest)
        self.samples_per_stream = sampling.units_per_stream(sum(self.shard_sizes), self.streams)
        if self.samples_per_stream < 1:
            raise ValueError(
                f"{self.split_dir} holds {sum(self.shard_sizes)} samples, too few for "
                f"{self.streams} data streams (data.streams)"
            )

    def batches_per_epoch(self, epoch: int = 0) -> int:
        del epoch  # every epoch has as many (the interface of packing.PackedTrainData)
        per_stream = sampling.batches_for(
            self.samples_per_stream, self.config.bucket_buffer, self.config.batch_size
        )
        return per_stream * self.streams // self.world_size

    def samples_per_epoch(self, epoch: int = 0) -> int:
        """Samples this rank trains on each epoch (the same on every rank)."""
        return self.samples_per_stream * self.streams // self.world_size

    def dropped_per_epoch(self, epoch: int = 0) -> int:
        return sum(self.shard_sizes) - self.samples_per_stream * self.streams

    def describe(self, epoch: int = 0) -> str:
        """One line for the log: how the epoch is cut into streams, and what it leaves out."""
        return (
            f"unpacked: {sum(self.shard_sizes)} samples in {self.streams} data streams of "
            f"{self.samples_per_stream}; {self.dropped_per_epoch()} sample(s) left out per "
            "epoch so that every data stream gets as many"
        )

    def order_signature(self) -> dict[str, Any]:
        """What a (epoch, batch) position depends on: store it, refuse a resume that differs."""
        global_batch = self.world_size * self.grad_accum
        return order_signature_base(self.manifest, self.config, self.streams, global_batch)

    def batches(self, epoch: int, start_batch: int = 0) -> DataLoader:
        """This rank's batches of `epoch` from index `start_batch` on, loaded by workers."""
        total = self.batches_per_epoch()
        if not 0 <= start_batch <= total:
            raise ValueError(f"start_batch {start_batch} outside [0, {total}] for this epoch")
        plans = sampling.train_worker_plans(
            self.shard_sizes,
            seed=self.config.seed,
            epoch=epoch,
            rank=self.rank,
            world_size=self.world_size,
            num_workers=self.config.num_workers,
            streams=self.streams,
            start_batch=start_batch,
        )
        dataset = PlannedBatches(
            self.split_dir, self.shard_names, plans, self.config, total - start_batch
        )
        return make_loader(dataset, self.config)


def eval_batches(split_dir, config: DataConfig, rank: int, world_size: int) -> DataLoader:
    """Each sample of the eval split (or its first `eval_limit`) exactly once across ranks.

    Ranks may get different batch counts: evaluation gathers its results once at the end.
    """
    config.validate()
    manifest = contract.load_manifest(split_dir)
    shard_sizes, shard_names = shard_sizes_and_names(manifest)
    plans = sampling.eval_worker_plans(
        shard_sizes,
        limit=config.eval_limit,
        rank=rank,
        world_size=world_size,
        num_workers=config.num_workers,
    )
    length = sum(
        sampling.batches_for(plan.num_samples, config.bucket_buffer, config.batch_size)
        for plan in plans
    )
    return make_loader(PlannedBatches(split_dir, shard_names, plans, config, length), config)
