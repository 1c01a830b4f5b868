"""The shard contract shared by the builder, the checker and the trainer.

Only the standard library and numpy are imported here, so the trainer can read shards without
pulling in the builder's audio and dataset dependencies. docs/design.md describes the contract.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
REJECTS_NAME = "rejects.jsonl"
SHARD_SUFFIX = ".tar"

MEL_MEMBER = "mel.npy"
TOKENS_MEMBER = "tokens.npy"
META_MEMBER = "json"
MEMBERS = (MEL_MEMBER, TOKENS_MEMBER, META_MEMBER)
REQUIRED_META_FIELDS = ("id", "text", "source", "duration", "pad_value")

MAX_FRAMES = 3000  # every released Whisper's encoder takes exactly 30 s = 3000 frames
MAX_TARGET_POSITIONS = 448  # the decoder's position table
SAMPLING_RATE = 16000
N_FFT = 400
HOP_LENGTH = 160


class ContractError(ValueError):
    """A shard folder or sample does not honour the shard contract."""


def shard_name(index: int) -> str:
    return f"shard-{index:06d}{SHARD_SUFFIX}"


def sample_key(split: str, row_id: int, piece: int | None = None) -> str:
    """The tar key of one input row: unique within a split, no dots (webdataset splits on them).

    The pieces of a row split at pauses (docs/shards.md, "Clips longer than the window") are
    `<split>-<row>-p<piece>`, which sorts right after the row's own key would.
    """
    if piece is None:
        return f"{split}-{row_id:09d}"
    return f"{split}-{row_id:09d}-p{piece:03d}"


def piece_of_key(key: str) -> tuple[str, int] | None:
    """(the parent row's key, the piece index) for the key of a split row's piece, else None."""
    parent, _, piece = key.rpartition("-p")
    return (parent, int(piece)) if parent and piece.isdigit() else None


def count_pieces(keys: list[str]) -> tuple[int, int]:
    """(split rows, their pieces) among sample keys; the manifest's `num_split` and
    `num_split_pieces`, so that `num_samples - num_split_pieces + num_split + num_rejected`
    is the number of input rows."""
    parents = [found[0] for found in map(piece_of_key, keys) if found is not None]
    return len(set(parents)), len(parents)


def frames_touching_audio(num_samples: int, max_frames: int = MAX_FRAMES) -> int:
    """How many STFT frames of a clip of `num_samples` touch real audio (centre frames, n_fft 400).

    Frame t covers samples [160 t - 200, 160 t + 200); it touches audio when 160 t - 200 < len.
    `max_frames` is the model's window (`2 * max_source_positions`), 3000 for released Whispers.
    """
    return min(max_frames, (num_samples + N_FFT // 2 - 1) // HOP_LENGTH + 1)


def exceeds_window(num_samples: int, max_frames: int = MAX_FRAMES) -> bool:
    """The builder's `too_long` rule: a 16 kHz clip longer than the model's window (30 s for
    released Whispers) cannot be heard whole, so it is rejected rather than cut."""
    return num_samples > max_frames * HOP_LENGTH


def max_frames_of(manifest: dict[str, Any]) -> int:
    """The encoder window a split was built for; manifests always record it."""
    return int(manifest["features"].get("max_frames", MAX_FRAMES))


def pad_value_for(log10_max: float) -> float:
    """The value every frame holds that touches no real audio, given the clip's log10 maximum."""
    return (max(-10.0, log10_max - 8.0) + 4.0) / 4.0


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def npy_from_bytes(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def meta_bytes(meta: dict[str, Any]) -> bytes:
    return json.dumps(meta, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode()


def load_manifest(split_dir: str | Path) -> dict[str, Any]:
    """Read `split_dir/manifest.json`, with an error that says what to do when it is missing."""
    path = Path(split_dir) / MANIFEST_NAME
    if not path.is_file():
        raise ContractError(
            f"{path} does not exist: the split is not built, or its build did not finish "
            "(the manifest is written last). Run `python -m shard_builder` again."
        )
    manifest = json.loads(path.read_text())
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ContractError(
            f"{path} has format_version {manifest.get('format_version')!r}; "
            f"this code reads version {FORMAT_VERSION}"
        )
    return manifest


def shard_paths(split_dir: str | Path, manifest: dict[str, Any] | None = None) -> list[Path]:
    manifest = manifest or load_manifest(split_dir)
    return [Path(split_dir) / shard["name"] for shard in manifest["shards"]]


def tokenizer_fingerprint(vocab: dict[str, int]) -> str:
    """A tokenizer vocabulary's identity, the same whatever folder or hub id it came from.

    The builder records it in the manifest; the trainer compares it with its model's tokenizer
    so that shards tokenised for another vocabulary are refused before training on garbage.
    """
    import hashlib

    canonical = json.dumps(sorted(vocab.items(), key=lambda item: item[1]), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]
