"""Shared fixtures: the demo corpus, the tiny model preset, demo shards built once per session.

Everything here runs offline. The real pretrained Whisper is optional: tests that need it take
the `whisper_base_dir` fixture and are skipped, with the reason, when WHISPER_BASE_DIR is unset.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DEMO_CORPUS = REPO / "demo" / "corpus"
TINY_MODEL = REPO / "config" / "models" / "tiny-whisper-de"
DEMO_SHARD_SIZE = 64  # small shards so the demo corpus spans several per split


def set_window(folder: Path, seconds: int) -> None:
    """Give a model folder (config and feature extractor files) a `seconds` input window.

    The tiny preset hears 5 s; faster-whisper's transcribe() runs only Whisper's 30 s window.
    """
    frames = seconds * 100
    extractor = {
        "chunk_length": seconds,
        "n_samples": seconds * 16000,
        "nb_max_frames": frames,
    }
    for name, section, values in (
        ("config.json", None, {"max_source_positions": frames // 2}),
        ("preprocessor_config.json", None, extractor),
        ("processor_config.json", "feature_extractor", extractor),
    ):
        path = folder / name
        if path.is_file():
            config = json.loads(path.read_text())
            (config[section] if section else config).update(values)
            path.write_text(json.dumps(config, indent=2))


def build_shards(
    out: Path,
    model: Path | str = TINY_MODEL,
    *extra: str,
    workers: int = 1,
    dataset: Path = DEMO_CORPUS,
):
    """Run the real builder entry point; returns the completed process."""
    command = [
        sys.executable,
        "-m",
        "shard_builder",
        "--dataset",
        str(dataset),
        "--model",
        str(model),
        "--out",
        str(out),
        "--workers",
        str(workers),
        "--shard-size",
        str(DEMO_SHARD_SIZE),
        *extra,
    ]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="session")
def demo_shards(tmp_path_factory) -> Path:
    """Demo corpus → shards for the tiny preset (train and test), built once per test session."""
    out = tmp_path_factory.mktemp("demo-shards")
    result = build_shards(out)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.fixture(scope="session")
def whisper_base_dir() -> Path:
    """A real pretrained multilingual Whisper folder, named by WHISPER_BASE_DIR."""
    value = os.environ.get("WHISPER_BASE_DIR")
    if not value:
        pytest.skip("WHISPER_BASE_DIR is not set: no pretrained Whisper folder to test with")
    path = Path(value)
    if not (path / "config.json").is_file():
        pytest.skip(f"WHISPER_BASE_DIR={value} holds no Whisper model (no config.json)")
    return path


@pytest.fixture(scope="session")
def bucket(demo_shards):
    """The demo shards at s3://shards/demo/{train,test} on a local moto S3 server:
    (endpoint URL, boto3 client). The AWS test credentials stay set for the session."""
    from tests.s3_server import BUCKET, CREDENTIALS, moto_server, s3_client, upload_folder

    saved = {name: os.environ.get(name) for name in CREDENTIALS}
    os.environ.update(CREDENTIALS)
    try:
        with moto_server() as endpoint:
            client = s3_client(endpoint)
            client.create_bucket(Bucket=BUCKET)
            upload_folder(client, demo_shards, BUCKET, "demo")
            yield endpoint, client
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
