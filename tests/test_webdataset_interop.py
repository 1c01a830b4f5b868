"""The builder's shards read by the real webdataset and wids libraries (webdataset 0.2.x, which
ships wids) give exactly what the trainer reads: same keys in the same order, same feature and
token arrays (dtype and values), same metadata. wids's indexed access rests on the descriptor
that shard_builder.interop writes from the manifest; wids never checks its sample counts.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import braceexpand
import numpy as np
import pytest
import webdataset
import wids
from wids.wids_decode import decode_basic
from wids.wids_specs import resolve_dsdesc

from shard_builder import contract, interop
from trainer.data import sampling
from trainer.data.loader import iter_span_samples

REPO = Path(__file__).resolve().parent.parent
SPLITS = ("train", "test")
MEMBER_NAMES = {contract.MEL_MEMBER, contract.TOKENS_MEMBER, contract.META_MEMBER}


@pytest.fixture(scope="module", params=SPLITS)
def split(request, demo_shards) -> tuple[Path, list[dict]]:
    """A demo split and every sample the trainer reads from it, in stored order."""
    split_dir = demo_shards / request.param
    manifest = contract.load_manifest(split_dir)
    shards = manifest["shards"]
    spans = [
        sampling.Span(shard=i, start=0, stop=s["num_samples"], shard_size=s["num_samples"])
        for i, s in enumerate(shards)
    ]
    samples = list(iter_span_samples(split_dir, [s["name"] for s in shards], spans))
    assert len(samples) == manifest["num_samples"] > 0
    assert len(shards) > 1 or request.param == "test"  # train spans several shards
    return split_dir, samples


def folder_digest(folder: Path) -> dict[str, str]:
    """Every file under `folder` (hidden ones included) with its sha256."""
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def assert_same_arrays(got: np.ndarray, want: np.ndarray, what: str) -> None:
    assert isinstance(got, np.ndarray), (what, type(got))
    assert got.dtype == want.dtype and got.shape == want.shape, (what, got.dtype, want.dtype)
    assert np.array_equal(got, want), what


def assert_same_meta(meta: dict, sample: dict, split_name: str) -> None:
    key = sample["key"]
    assert contract.sample_key(split_name, meta["id"]) == key
    for field in ("text", "source", "duration", "pad_value"):
        assert meta[field] == sample[field], (key, field, meta[field], sample[field])


def test_builder_output_is_what_its_manifest_recorded(split):
    """The shards read below are the builder's bytes: each hashes to its manifest entry."""
    split_dir, _ = split
    digest = folder_digest(split_dir)
    for shard in contract.load_manifest(split_dir)["shards"]:
        assert digest[shard["name"]] == shard["sha256"]
        assert (split_dir / shard["name"]).stat().st_size == shard["bytes"]


def test_webdataset_yields_what_the_trainer_reads(split):
    split_dir, expected = split
    before = folder_digest(split_dir)
    urls = interop.shard_urls(split_dir)
    assert urls == [str(path) for path in contract.shard_paths(split_dir)]
    got = list(webdataset.WebDataset(urls, shardshuffle=False).decode())

    assert [s["__key__"] for s in got] == [s["key"] for s in expected]
    counts = [shard["num_samples"] for shard in contract.load_manifest(split_dir)["shards"]]
    shard_of = [url for url, count in zip(urls, counts, strict=True) for _ in range(count)]
    for sample, want, url in zip(got, expected, shard_of, strict=True):
        assert {k for k in sample if not k.startswith("__")} == MEMBER_NAMES
        assert sample["__url__"] == url
        assert_same_arrays(sample[contract.MEL_MEMBER], want["features"], want["key"])
        assert_same_arrays(sample[contract.TOKENS_MEMBER], want["tokens"], want["key"])
        assert_same_meta(sample[contract.META_MEMBER], want, split_dir.name)
    assert folder_digest(split_dir) == before


def test_webdataset_brace_pattern_names_the_same_shards(split):
    split_dir, expected = split
    pattern = interop.shard_pattern(split_dir)
    assert list(braceexpand.braceexpand(pattern)) == interop.shard_urls(split_dir)
    keys = [s["__key__"] for s in webdataset.WebDataset(pattern, shardshuffle=False)]
    assert keys == [s["key"] for s in expected]


def wids_dataset(descriptor: Path, **kwargs) -> wids.ShardListDataset:
    return wids.ShardListDataset(str(descriptor), transformations=[decode_basic], **kwargs)


def assert_wids_matches(dataset: wids.ShardListDataset, expected: list[dict], split_name: str):
    assert len(dataset) == len(expected)
    for index, want in enumerate(expected):
        sample = dataset[index]
        assert sample["__key__"] == want["key"], index
        assert {k for k in sample if not k.startswith("__")} == {f".{m}" for m in MEMBER_NAMES}
        assert_same_arrays(sample[f".{contract.MEL_MEMBER}"], want["features"], want["key"])
        assert_same_arrays(sample[f".{contract.TOKENS_MEMBER}"], want["tokens"], want["key"])
        assert_same_meta(sample[f".{contract.META_MEMBER}"], want, split_name)
    with pytest.raises(IndexError):
        dataset[len(expected)]


def test_wids_descriptor_from_the_cli_indexes_what_the_trainer_reads(split, tmp_path):
    """The entry point's descriptor with absolute URLs, loaded from elsewhere; wids copies each
    local shard into its cache folder first (`cache_dir`)."""
    split_dir, expected = split
    before = folder_digest(split_dir)
    descriptor = tmp_path / "elsewhere" / f"{split_dir.name}.wids.json"
    descriptor.parent.mkdir()
    command = [sys.executable, "-m", "shard_builder.interop", str(split_dir)]
    command += ["--base-url", str(split_dir), "--out", str(descriptor)]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr

    manifest = contract.load_manifest(split_dir)
    written = json.loads(descriptor.read_text())
    assert written == interop.wids_descriptor(split_dir, base_url=str(split_dir))
    assert written["__kind__"] == "wids-shard-index-v1" and written["wids_version"] == 1
    assert written["name"] == split_dir.name
    assert [s["nsamples"] for s in written["shardlist"]] == [
        s["num_samples"] for s in manifest["shards"]
    ]

    dataset = wids_dataset(descriptor, cache_dir=str(tmp_path / "wids-cache"))
    assert len(dataset) == manifest["num_samples"]
    assert_wids_matches(dataset, expected, split_dir.name)
    dataset.close()
    assert folder_digest(split_dir) == before


def test_wids_reads_relative_descriptor_in_place(split, tmp_path):
    """Bare shard names resolved against `base=`; `localname` returning the URL itself makes
    wids open the shards where they are (no copy) and leave the folder as it was."""
    split_dir, expected = split
    before = folder_digest(split_dir)
    descriptor = tmp_path / "relative.json"
    assert interop.main([str(split_dir), "--out", str(descriptor)]) == 0
    dataset = wids_dataset(descriptor, base=str(split_dir), localname=lambda url: url)
    assert [s["url"] for s in dataset.shards] == [str(p) for p in contract.shard_paths(split_dir)]
    assert_wids_matches(dataset, expected, split_dir.name)
    dataset.close()
    assert folder_digest(split_dir) == before


def test_relative_descriptor_and_base_url_resolve_to_the_same_shards(demo_shards):
    """wids's own resolver: bare names under base `s3://...` equal the `--base-url` URLs."""
    split_dir = demo_shards / "train"
    base = "s3://bucket/shards/train"
    relative = interop.wids_descriptor(split_dir)
    absolute = interop.wids_descriptor(split_dir, base_url=base + "/")
    resolved = resolve_dsdesc(json.loads(json.dumps(relative)), base=base)
    urls = [shard["url"] for shard in absolute["shardlist"]]
    assert [shard["url"] for shard in resolved["shardlist"]] == urls
    assert urls[0] == f"{base}/shard-000000.tar"
    assert interop.shard_urls(split_dir, base_url=base) == urls


def test_wrong_sample_counts_break_wids_indexing(demo_shards, tmp_path):
    """wids trusts the descriptor's counts: one count off shifts every later index onto the
    wrong sample, which is why the descriptor is written from the manifest."""
    split_dir = demo_shards / "train"
    expected = [
        s["__key__"]
        for s in webdataset.WebDataset(interop.shard_urls(split_dir), shardshuffle=False)
    ]
    descriptor = interop.wids_descriptor(split_dir, base_url=str(split_dir))
    descriptor["shardlist"][0]["nsamples"] -= 1
    path = tmp_path / "wrong.json"
    path.write_text(json.dumps(descriptor))
    dataset = wids_dataset(path, localname=lambda url: url)
    assert len(dataset) == len(expected) - 1
    first = descriptor["shardlist"][0]["nsamples"]
    assert dataset[first - 1]["__key__"] == expected[first - 1]
    assert dataset[first]["__key__"] == expected[first + 1]  # the first shard's last is lost
    dataset.close()


def test_cli_refuses_a_folder_without_manifest(tmp_path, capsys):
    assert interop.main([str(tmp_path)]) == 2
    assert "manifest.json does not exist" in capsys.readouterr().err
