"""Helpers shared by the benchmarks."""

from __future__ import annotations

import json
import shutil
from pathlib import Path


def model_with_bins(model: str, n_mels: int, workdir: Path, window_seconds: int = 30) -> Path:
    """A copy of a local model folder whose feature extractor computes `n_mels` bins over a
    `window_seconds` window (30 s, 3000 frames, as every released Whisper: the tiny preset's own
    5 s window would flatter the padded baseline's bytes and time)."""
    copy = workdir / f"model-{n_mels}"
    shutil.copytree(model, copy)
    frames = window_seconds * 100
    extractor = {
        "feature_size": n_mels,
        "chunk_length": window_seconds,
        "n_samples": window_seconds * 16000,
        "nb_max_frames": frames,
    }
    edits = (
        ("preprocessor_config.json", None, extractor),
        ("processor_config.json", "feature_extractor", extractor),  # read first, if present
        ("config.json", None, {"num_mel_bins": n_mels, "max_source_positions": frames // 2}),
    )
    for name, section, values in edits:
        path = copy / name
        if path.is_file():
            config = json.loads(path.read_text())
            (config.get(section, {}) if section else config).update(values)
            path.write_text(json.dumps(config))
    return copy
