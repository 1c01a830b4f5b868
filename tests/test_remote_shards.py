"""Shards at a URL: a real S3 API (moto's server on localhost), read through fsspec and s3fs.

The split is mirrored into a local cache, every shard checked against the manifest; dropped
connections are resumed or fail with a clear error, never with a short epoch.
"""

from __future__ import annotations

import json
import subprocess
import sys

import fsspec
import numpy as np
import pytest

from shard_builder import storage
from shard_builder.check import check_location
from shard_builder.contract import ContractError, load_manifest
from tests.conftest import REPO
from tests.s3_server import BUCKET, DroppingRelay, client_environment, upload_folder
from trainer.data.loader import iter_split_samples

FAST_RETRIES = storage.FetchPolicy(retries=2, backoff_seconds=0.01)

pytestmark = pytest.mark.slow


@pytest.fixture
def endpoint(bucket, monkeypatch):
    """Point fsspec's s3 at `url` (the server or a relay in front of it), fresh clients."""

    def use(url: str) -> None:
        import s3fs

        monkeypatch.setitem(fsspec.config.conf, "s3", {"endpoint_url": url})
        s3fs.S3FileSystem.clear_instance_cache()

    use(bucket[0])
    yield use
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()


def upstream_port(endpoint_url: str) -> int:
    return int(endpoint_url.rsplit(":", 1)[1])


def test_a_split_in_a_bucket_reads_exactly_like_the_local_one(
    demo_shards, bucket, endpoint, tmp_path
):
    mirror = storage.local_split(f"s3://{BUCKET}/demo/train", tmp_path, progress=False)
    local = demo_shards / "train"
    manifest = load_manifest(local)
    assert load_manifest(mirror) == manifest
    for shard in manifest["shards"]:
        assert (mirror / shard["name"]).read_bytes() == (local / shard["name"]).read_bytes()
    remote_samples, local_samples = iter_split_samples(mirror), iter_split_samples(local)
    for remote, here in zip(remote_samples, local_samples, strict=True):
        assert remote["key"] == here["key"] and remote["text"] == here["text"]
        assert np.array_equal(remote["features"], here["features"])
        assert np.array_equal(remote["tokens"], here["tokens"])


def test_a_cached_split_is_not_fetched_again(bucket, endpoint, tmp_path, monkeypatch):
    url = f"s3://{BUCKET}/demo/test"
    first = storage.local_split(url, tmp_path, progress=False)

    def refuse(*args):
        raise AssertionError("a verified cached shard was fetched again")

    monkeypatch.setattr(storage.Mirror, "fetch_shard", refuse)
    before = (first / "manifest.json").stat()
    assert storage.local_split(url, tmp_path, progress=False) == first
    # untouched: another rank of the machine may be reading it at that moment
    after = (first / "manifest.json").stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


def test_a_dropped_connection_is_resumed_and_the_shard_verified(
    demo_shards, bucket, endpoint, tmp_path
):
    relay = DroppingRelay(upstream_port(bucket[0]), cut_after=1_000_000, cuts=2)
    endpoint(relay.endpoint)
    try:
        mirror = storage.local_split(
            f"s3://{BUCKET}/demo/test", tmp_path, progress=False, policy=FAST_RETRIES
        )
    finally:
        relay.close()
    assert relay.cuts_done == 2  # two shard downloads were cut in the middle of their bodies
    for shard in load_manifest(mirror)["shards"]:
        local = demo_shards / "test" / shard["name"]
        assert (mirror / shard["name"]).read_bytes() == local.read_bytes()


def test_a_connection_that_keeps_dropping_fails_clearly_and_leaves_no_split(
    bucket, endpoint, tmp_path
):
    relay = DroppingRelay(upstream_port(bucket[0]), cut_after=1_000_000, cuts=None)
    endpoint(relay.endpoint)
    try:
        with pytest.raises(storage.ShardFetchError, match="gave up after 3 attempts"):
            storage.local_split(
                f"s3://{BUCKET}/demo/test", tmp_path, progress=False, policy=FAST_RETRIES
            )
    finally:
        relay.close()
    mirror = storage.cache_folder(f"s3://{BUCKET}/demo/test", tmp_path)
    # No manifest: the trainer and the checker refuse this folder instead of reading it short.
    assert not (mirror / "manifest.json").exists()
    assert not list(mirror.glob("*.tar"))


def test_an_object_changed_in_the_bucket_is_refused(demo_shards, bucket, endpoint, tmp_path):
    client = bucket[1]
    source = demo_shards / "test" / "shard-000000.tar"
    data = bytearray(source.read_bytes())
    data[len(data) // 2] ^= 0x01
    for split in ("test",):
        upload_folder(client, demo_shards / split, BUCKET, f"changed/{split}")
    client.put_object(Bucket=BUCKET, Key="changed/test/shard-000000.tar", Body=bytes(data))
    with pytest.raises(ContractError, match="sha256"):
        storage.local_split(f"s3://{BUCKET}/changed/test", tmp_path, progress=False)


def test_a_shard_missing_from_the_bucket_is_named(demo_shards, bucket, endpoint, tmp_path):
    client = bucket[1]
    upload_folder(client, demo_shards / "train", BUCKET, "partial/train")
    client.delete_object(Bucket=BUCKET, Key="partial/train/shard-000002.tar")
    with pytest.raises(ContractError, match="shard-000002.tar is listed in the manifest but"):
        storage.local_split(f"s3://{BUCKET}/partial/train", tmp_path, progress=False)


def test_a_url_without_a_manifest_names_the_problem(bucket, endpoint, tmp_path):
    with pytest.raises(ContractError, match="manifest.json does not exist"):
        storage.local_split(f"s3://{BUCKET}/nothing/train", tmp_path, progress=False)


def test_check_shards_checks_a_bucket_and_names_a_stray_shard(
    demo_shards, bucket, endpoint, tmp_path
):
    report = check_location(f"s3://{BUCKET}/demo", progress=False, cache_dir=str(tmp_path))
    assert report.ok, report.text()
    assert sorted(s.split for s in report.splits) == ["test", "train"]
    client = bucket[1]
    upload_folder(client, demo_shards / "test", BUCKET, "stray/test")
    client.put_object(Bucket=BUCKET, Key="stray/test/shard-000099.tar", Body=b"\0" * 1024)
    report = check_location(f"s3://{BUCKET}/stray/test", progress=False, cache_dir=str(tmp_path))
    assert report.broken() == ["test/shard-000099.tar"], report.text()


def test_check_shards_cli_takes_a_url(bucket, tmp_path):
    command = [sys.executable, "scripts/check_shards.py", f"s3://{BUCKET}/demo/test"]
    command += ["--no-progress", "--workers", "1"]
    env = client_environment(bucket[0], tmp_path)
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"s3://{BUCKET}/demo/test" in result.stdout and "all shards whole" in result.stdout


def test_evaluate_reads_a_split_from_a_bucket(bucket, endpoint, tmp_path):
    from tests.conftest import TINY_MODEL
    from trainer import evaluate

    output = tmp_path / "report.json"
    code = evaluate.main(
        ["--model", str(TINY_MODEL), "--shards", f"s3://{BUCKET}/demo/test"]
        + ["--shard-cache", str(tmp_path / "cache"), "--limit", "4", "--batch-size", "4"]
        + ["--max-new-tokens", "2", "--num-workers", "0", "--device", "cpu", "--worst", "0"]
        + ["--output", str(output)]
    )
    assert code == 0
    report = json.loads(output.read_text())
    assert report["shards"] == f"s3://{BUCKET}/demo/test" and report["num_utterances"] == 4
