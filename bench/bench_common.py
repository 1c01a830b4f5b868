"""Helpers shared by the benchmarks."""

from __future__ import annotations

import json
import shutil
from pathlib import Path


def model_with_bins(model: str, n_mels: int, workdir: Path) -> Path:
    """A copy of a local model folder whose feature extractor computes `n_mels` bins."""
    copy = workdir / f"model-{n_mels}"
    shutil.copytree(model, copy)
    edits = (
        ("preprocessor_config.json", None, "feature_size"),
        ("processor_config.json", "feature_extractor", "feature_size"),  # read first, if present
        ("config.json", None, "num_mel_bins"),
    )
    for name, section, key in edits:
        path = copy / name
        if path.is_file():
            config = json.loads(path.read_text())
            (config.get(section, {}) if section else config)[key] = n_mels
            path.write_text(json.dumps(config))
    return copy
