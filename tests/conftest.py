"""Shared fixtures: the demo corpus, the tiny model preset, demo shards built once per session.

Everything here runs offline. The real pretrained Whisper is optional: tests that need it take
the `whisper_base_dir` fixture and are skipped, with the reason, when WHISPER_BASE_DIR is unset.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DEMO_CORPUS = REPO / "demo" / "corpus"
TINY_MODEL = REPO / "config" / "models" / "tiny-whisper-de"
DEMO_SHARD_SIZE = 64  # small shards so the demo corpus spans several per split


# The free disk the suite wants: its folders held at most 1.27 GB at once on a full run with the
# clean-up below (docs/benchmarks.md, "The test suite's disk"), plus a margin; less gets a warning.
SUITE_DISK_GB = 2.0


def free_disk_line(config) -> tuple[str, bool]:
    where = Path(config.getoption("basetemp") or tempfile.gettempdir())
    free_gb = shutil.disk_usage(where if where.exists() else where.parent).free / 2**30
    line = f"free disk under {where}: {free_gb:.1f} GB (the suite needs ~{SUITE_DISK_GB:.0f} GB)"
    return line, free_gb < SUITE_DISK_GB


def pytest_report_header(config) -> str:
    return free_disk_line(config)[0]


def pytest_sessionstart(session) -> None:
    line, short = free_disk_line(session.config)
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if short and reporter is not None:  # shown under -q too, where the header is not
        reporter.write_line(f"WARNING: {line}; tests that write will fail with 'No space left'")


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


@pytest.fixture(scope="module")
def module_tmp(tmp_path_factory, request):
    """`mktemp` for a module's shared fixtures (its reference runs, exports, shards). What it
    made is removed once the module's tests are done, unless one of them failed (kept to look
    at, as pytest keeps a failed test's tmp_path). Kept all at once the suite's folders came to
    ~5 GB, and a CI machine short of disk failed every test that wrote once the disk was full."""
    made: list[Path] = []
    failed_before = request.session.testsfailed

    def make(name: str) -> Path:
        made.append(tmp_path_factory.mktemp(name))
        return made[-1]

    yield make
    if request.session.testsfailed == failed_before:
        for folder in made:
            shutil.rmtree(folder, ignore_errors=True)


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
