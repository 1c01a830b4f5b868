"""shard_builder.inspect on the demo corpus (before the build) and the demo shards (after it).

The hub cannot be reached here. A hub dataset is read by the builder's ParquetSource over
HfFileSystem; the hub test below runs that same ParquetSource over an fsspec in-memory file
system holding the demo parquet files, and counts the bytes read, to show that only footers and
the sampled row groups are fetched. Only the commit lookup (`HfApi.dataset_info`) is not run.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import fsspec
import pytest

from shard_builder.contract import load_manifest
from shard_builder.inspect import inspect, parse_args, sample_ranges
from shard_builder.source import Columns, ParquetSource
from tests.conftest import DEMO_CORPUS, REPO, TINY_MODEL


def run_inspect(*args: str) -> tuple[dict, float]:
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "shard_builder.inspect", *args, "--json"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout), time.perf_counter() - started


def test_demo_corpus_figures_match_what_the_builder_does(demo_shards):
    report, seconds = run_inspect(str(DEMO_CORPUS), "--model", str(TINY_MODEL))
    assert report["kind"] == "parquet_folder" and seconds < 60
    train, test = report["splits"]["train"], report["splits"]["test"]
    assert (train["num_rows"], test["num_rows"]) == (272, 62)
    assert train["rows_inspected"] == 272  # under the sample budget: every row
    assert train["columns"] == {
        "audio": "struct<bytes: binary, path: string>",
        "transkription": "string",
        "source": "string",
    }
    assert sum(train["sources"].values()) == 272
    assert set(train["sources"]) == {"espeak-demo-male", "espeak-demo-female", "espeak-demo-klatt"}
    example = train["examples"][0]
    assert example["text"] and example["source"] and 1 < example["duration"] < 5
    # The builder's own verdicts on the same rows (demo/README.md: a 33.7 s clip and four long
    # rows of 37-42 s, which the tiny random preset cannot split confidently, one file that is
    # not audio, one WAV without frames).
    manifest = load_manifest(demo_shards / "train")
    assert train["too_long"] == manifest["rejects_by_reason"]["too_long_unaligned"] == 5
    assert train["too_long_share"] == pytest.approx(5 / 272)
    assert train["window_seconds"] == 5  # the tiny preset's window, read from its extractor
    assert train["unreadable_audio"] == 1 and train["empty_audio"] == 1
    assert train["duration_seconds"]["max"] > 37
    bins = train["duration_histogram"]
    assert sum(b["count"] for b in bins) == 271  # every readable clip in one bin
    assert bins[-1] == {"from": 5, "to": None, "count": 5}
    assert test["too_long"] == 0 and sum(test["sources"].values()) == 62
    assert train["tokens"]["min"] >= 4 and train["tokens"]["max"] <= 448


def test_demo_shards_figures_come_from_the_manifest_and_the_samples(demo_shards):
    report, seconds = run_inspect(str(demo_shards))
    assert report["kind"] == "shards" and seconds < 30
    train = report["splits"]["train"]
    manifest = load_manifest(demo_shards / "train")
    assert train["num_rows"] == train["rows_inspected"] == manifest["num_samples"] == 264
    assert train["columns"]["mel.npy"] == "float16 [80, n]"
    assert train["columns"]["tokens.npy"] == "int32 [n]"
    assert {"json.text", "json.source", "json.duration", "json.pad_value"} <= set(train["columns"])
    assert train["manifest"]["rejects_by_reason"] == manifest["rejects_by_reason"]
    assert train["too_long"] == 5 and train["too_long_share"] == pytest.approx(5 / 272)
    assert sum(train["sources"].values()) == 264
    assert sum(b["count"] for b in train["token_histogram"]) == 264
    assert train["tokens"]["max"] <= 448 and train["empty_audio"] == 0


def test_text_report_names_the_rule_and_draws_histograms(demo_shards):
    from shard_builder.inspect import format_report

    report = format_report(inspect(parse_args([str(demo_shards), "--splits", "train"])))
    assert "[train] 264 rows; 264 inspected (all)" in report
    assert (
        "longer than the model's 5 s window (split at pauses, or rejected: --long-audio): "
        "5 (1.84 %)" in report
    )
    assert "mel.npy: float16 [80, n]" in report and "|####" in report


class CountingFileSystem:
    """An fsspec file system that counts the bytes read through it (glob and open only: what
    ParquetSource calls on HfFileSystem)."""

    def __init__(self, inner) -> None:
        self.inner, self.bytes_read = inner, 0

    def glob(self, pattern: str):
        return self.inner.glob(pattern)

    def open(self, path: str, mode: str = "rb"):
        return CountingFile(self, self.inner.open(path, mode))


class CountingFile:
    def __init__(self, fs: CountingFileSystem, handle) -> None:
        self.fs, self.handle = fs, handle

    def read(self, size: int = -1) -> bytes:
        data = self.handle.read(size)
        self.fs.bytes_read += len(data)
        return data

    def __getattr__(self, name: str):
        return getattr(self.handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.handle.close()


def test_hub_code_path_reads_only_footers_and_sampled_row_groups():
    memory = fsspec.filesystem("memory")
    root = "/datasets/demo-user/asr-demo@0123abc"  # how open_source names a hub dataset
    sizes = {}
    for path in (DEMO_CORPUS / "data").glob("*.parquet"):
        memory.pipe(f"{root}/data/{path.name}", path.read_bytes())
        sizes[path.name.split("-")[0]] = path.stat().st_size
    fs = CountingFileSystem(memory)
    identity = {"dataset": "demo-user/asr-demo", "revision": "0123abc", "kind": "hub"}
    source = ParquetSource(root, fs, identity, Columns())
    args = parse_args(["demo-user/asr-demo", "--model", str(TINY_MODEL), "--sample-rows", "50"])
    args.splits = ["train"]
    report = inspect(args, source=source)
    train = report["splits"]["train"]
    assert report["kind"] == "hub"
    assert train["num_rows"] == 272  # exact, from the footer
    assert train["rows_inspected"] == 100  # one whole row group of the three
    assert sum(train["sources"].values()) == 100
    assert 0 < fs.bytes_read < 0.6 * sizes["train"], (fs.bytes_read, sizes["train"])
    memory.rm(root, recursive=True)


def test_a_saved_dataset_gives_the_parquet_folders_figures(tmp_path):
    import datasets

    files = {"test": str(next((DEMO_CORPUS / "data").glob("test-*")))}
    dataset = datasets.load_dataset("parquet", data_files=files, cache_dir=str(tmp_path / "c"))
    dataset.save_to_disk(tmp_path / "saved")  # Audio features: read back without decoding
    figures = {}
    for target in (tmp_path / "saved", DEMO_CORPUS):
        args = parse_args([str(target), "--model", str(TINY_MODEL), "--splits", "test"])
        figures[target] = inspect(args)["splits"]["test"]
    saved, parquet = figures[tmp_path / "saved"], figures[DEMO_CORPUS]
    assert saved["columns"]["transkription"] == "string"
    for key in ("num_rows", "sources", "duration_seconds", "duration_histogram", "tokens"):
        assert saved[key] == parquet[key], key


def test_sample_ranges_spread_over_the_split():
    groups = [(i * 10, i * 10 + 10) for i in range(10)]
    assert sample_ranges(groups, 1000) == groups
    assert sample_ranges(groups, 1) == [(0, 10)]
    assert sample_ranges(groups, 30) == [(0, 10), (40, 50), (90, 100)]


def test_a_folder_that_is_no_split_is_a_clear_error(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "shard-000000.tar").write_bytes(b"")
    result = subprocess.run(
        [sys.executable, "-m", "shard_builder.inspect", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "no parquet files for split 'train'" in result.stderr
