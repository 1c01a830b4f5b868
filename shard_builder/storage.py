"""Where a split lives: a local folder, or a URL read through fsspec into a local cache.

    s3://bucket/shards/train    gs://bucket/shards/train    https://host/shards/train
    hf://datasets/USER/REPO/shards/train   (a Hugging Face dataset repo of the builder's files)

A URL's split is mirrored once into a cache folder on local disk, and everything downstream
(the checker, the trainer's exact resume and in-shard shuffle, the packing index) reads local
files as before. The manifest is read first; each shard it lists is downloaded whole, resumed
with a range read after a dropped connection, and kept only when its size and sha256 equal the
manifest's, so a short or altered object is an error, never a silently short epoch. The mirror's
manifest is written last (as the builder does), and a file lock lets the ranks of one machine
share one download. Whole shards rather than range reads per sample: every epoch reads every
shard, and the packing index reads every header.

Credentials and endpoints come from fsspec's own configuration: the usual variables of each
store (AWS_ACCESS_KEY_ID, GOOGLE_APPLICATION_CREDENTIALS, HF_TOKEN), or fsspec's
`FSSPEC_<PROTOCOL>_<OPTION>` variables, e.g. `FSSPEC_S3_ENDPOINT_URL` for an S3-compatible
store. The backends are optional packages (`pip install -e ".[remote]"`: s3fs, gcsfs, aiohttp,
huggingface_hub).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shard_builder.contract import MANIFEST_NAME, REJECTS_NAME, ContractError, load_manifest

log = logging.getLogger(__name__)

CACHE_ENV = "SHARD_CACHE_DIR"
VERIFIED_SUFFIX = ".sha256"  # `.NAME.sha256` beside a cached shard: its verified digest
CHUNK_BYTES = 8 << 20


class ShardFetchError(OSError):
    """A shard or manifest could not be fetched from its URL, after retries."""


@dataclass(frozen=True)
class FetchPolicy:
    retries: int = 5  # attempts after the first, per file
    backoff_seconds: float = 1.0  # doubled after each failed attempt
    chunk_bytes: int = CHUNK_BYTES


def is_url(location: str | Path) -> bool:
    """True for `scheme://...` locations other than local files."""
    text = str(location)
    return "://" in text and not text.startswith("file://")


def local_path(location: str | Path) -> Path:
    text = str(location)
    return Path(text[len("file://") :] if text.startswith("file://") else text)


def join(location: str | Path, *parts: str) -> str | Path:
    """`location/part/...` for a URL or a local folder."""
    if is_url(location):
        return "/".join([str(location).rstrip("/"), *parts])
    return local_path(location).joinpath(*parts)


def default_cache_dir() -> Path:
    configured = os.environ.get(CACHE_ENV)
    if configured:
        return Path(configured)
    return Path.home() / ".cache" / "whisper-german-trainer" / "shards"


def cache_folder(url: str, cache_dir: str | Path | None) -> Path:
    """A folder of its own per URL: readable name, and a hash so different URLs never meet."""
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", url.split("://", 1)[1]).strip("_")[-80:]
    digest = hashlib.sha256(url.rstrip("/").encode()).hexdigest()[:12]
    return Path(cache_dir or default_cache_dir()) / f"{readable}-{digest}"


def local_split(
    location: str | Path,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    policy: FetchPolicy = FetchPolicy(),
) -> Path:
    """A local folder holding the split at `location`: the folder itself, or a verified mirror
    of the URL in `cache_dir` (fetched now where it is not there already)."""
    if not is_url(location):
        return local_path(location)
    url = str(location).rstrip("/")
    mirror = cache_folder(url, cache_dir)
    mirror.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(mirror / ".lock"):
        Mirror(url, mirror, policy, progress).sync()
    return mirror


def read_manifest(location: str | Path) -> dict[str, Any]:
    """A split's manifest, read from its folder or its URL (nothing else is fetched)."""
    if not is_url(location):
        return load_manifest(local_path(location))
    url = str(location).rstrip("/")
    data = Mirror(url, Path(), FetchPolicy(), progress=False).fetch_small(MANIFEST_NAME, True)
    return parse_manifest(data, f"{url}/{MANIFEST_NAME}")


def find_split_urls(url: str) -> list[str]:
    """`url` when it holds a manifest, else its subfolders that do (stores that can list)."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(url)
    url = url.rstrip("/")
    if fs.exists(f"{root.rstrip('/')}/{MANIFEST_NAME}"):
        return [url]
    found = fs.glob(f"{root.rstrip('/')}/*/{MANIFEST_NAME}")
    return sorted(f"{url}/{path.rstrip('/').split('/')[-2]}" for path in found)


def unlisted_shards(url: str, manifest: dict[str, Any]) -> list[str]:
    """Tar files in the split's folder at `url` that its manifest does not list (empty where
    the store cannot list a folder, as plain https cannot)."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(url)
    try:
        names = [path.rstrip("/").rsplit("/", 1)[-1] for path in fs.ls(root, detail=False)]
    except (NotImplementedError, OSError):
        return []
    listed = {shard["name"] for shard in manifest["shards"]}
    return sorted(n for n in names if n.endswith(".tar") and n not in listed)


@contextlib.contextmanager
def exclusive_lock(path: Path) -> Iterator[None]:
    """One process per machine fetches; the others wait, then find the files in place."""
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another process fetching into %s", path.parent)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class Mirror:
    """A URL's split mirrored into a local folder, every shard checked against the manifest."""

    def __init__(self, url: str, folder: Path, policy: FetchPolicy, progress: bool) -> None:
        import fsspec  # only a URL needs it, and it brings the store's backend

        self.url, self.folder, self.policy, self.progress = url, folder, policy, progress
        self.fs, self.root = fsspec.core.url_to_fs(url)

    def sync(self) -> None:
        manifest_bytes = self.fetch_small(MANIFEST_NAME, required=True)
        manifest = parse_manifest(manifest_bytes, f"{self.url}/{MANIFEST_NAME}")
        cached = self.folder / MANIFEST_NAME
        # Unchanged, the mirror is left alone: the other ranks of this machine sync after the
        # first and must not pull the manifest from under it while it starts training.
        unchanged = cached.is_file() and cached.read_bytes() == manifest_bytes
        missing = [s for s in manifest["shards"] if not self.is_cached(s)]
        if unchanged and not missing:
            return
        # The manifest goes in place last: a mirror cut short never looks complete.
        cached.unlink(missing_ok=True)
        rejects = self.fetch_small(REJECTS_NAME, required=False)
        if rejects is not None:
            atomic_write(self.folder / REJECTS_NAME, rejects)
        self.remove_unlisted(manifest)
        if missing:
            self.fetch_shards(missing)
        atomic_write(cached, manifest_bytes)
        load_manifest(self.folder)  # the same checks as for a local split

    def remote(self, name: str) -> str:
        return f"{self.root.rstrip('/')}/{name}"

    def fetch_small(self, name: str, required: bool) -> bytes | None:
        for attempt in self.attempts(f"{self.url}/{name}"):
            with attempt:
                try:
                    return self.fs.cat_file(self.remote(name))
                except FileNotFoundError:
                    if not required:
                        return None
                    raise ContractError(
                        f"{self.url}/{name} does not exist: no split there, or its build did "
                        "not finish (the manifest is written last)"
                    ) from None
        raise AssertionError("unreachable: attempts() raises after the last one")

    def is_cached(self, shard: dict[str, Any]) -> bool:
        path = self.folder / shard["name"]
        seal = self.folder / f".{shard['name']}{VERIFIED_SUFFIX}"
        return (
            path.is_file()
            and path.stat().st_size == shard["bytes"]
            and seal.is_file()
            and seal.read_text().strip() == shard["sha256"]
        )

    def remove_unlisted(self, manifest: dict[str, Any]) -> None:
        """Shards of an earlier build at this URL would read as extra shards to the checker."""
        listed = {shard["name"] for shard in manifest["shards"]}
        for path in self.folder.glob("*.tar"):
            if path.name not in listed:
                path.unlink()
                (self.folder / f".{path.name}{VERIFIED_SUFFIX}").unlink(missing_ok=True)

    def fetch_shards(self, shards: list[dict[str, Any]]) -> None:
        from tqdm import tqdm

        total = sum(shard["bytes"] for shard in shards)
        with tqdm(
            total=total,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc=f"fetching {len(shards)} shards of {self.url}",
            disable=not self.progress,
        ) as bar:
            for shard in shards:
                self.fetch_shard(shard, bar.update)

    def fetch_shard(self, shard: dict[str, Any], advance) -> None:
        """Download one shard, resuming after a dropped connection; keep it only if whole."""
        name, expected = shard["name"], shard["bytes"]
        partial = self.folder / f".{name}.partial"
        digest = hashlib.sha256()
        with open(partial, "wb") as out:
            # out.tell(): the bytes already kept, where a retry resumes with a range read
            for attempt in self.attempts(f"{self.url}/{name}", out.tell):
                with attempt:
                    try:
                        self.copy_from(name, expected, out, digest, advance)
                    except FileNotFoundError:
                        raise ContractError(
                            f"{self.url}/{name} is listed in the manifest but missing: the "
                            "upload did not finish, or the split was partly deleted"
                        ) from None
                    break
            out.flush()
            os.fsync(out.fileno())
            have = out.tell()
        if have != expected or digest.hexdigest() != shard["sha256"]:
            partial.unlink()
            what = f"{have} bytes" if have != expected else "bytes whose sha256 differs"
            raise ContractError(
                f"{self.url}/{name} gave {what}; the manifest records {expected} bytes with "
                f"sha256 {shard['sha256'][:16]}...: the bucket holds another build, or the "
                "object was changed. Re-upload the split, or check it with check_shards.py"
            )
        os.replace(partial, self.folder / name)
        atomic_write(self.folder / f".{name}{VERIFIED_SUFFIX}", shard["sha256"].encode())

    def copy_from(self, name: str, expected: int, out, digest, advance) -> None:
        have = out.tell()
        with self.fs.open(self.remote(name), "rb", block_size=self.policy.chunk_bytes) as remote:
            remote.seek(have)
            while have < expected and (chunk := remote.read(self.policy.chunk_bytes)):
                out.write(chunk)
                digest.update(chunk)
                have += len(chunk)
                advance(len(chunk))
        if have < expected and self.fs.size(self.remote(name)) >= expected:
            raise ConnectionError(f"the stream ended at byte {have} of {expected}")

    def attempts(self, what: str, position=lambda: 0) -> Iterator[_Attempt]:
        """Yields attempt contexts; a transient failure is retried after a growing pause."""
        for number in range(self.policy.retries + 1):
            attempt = _Attempt()
            yield attempt
            if attempt.error is None:
                return
            if number == self.policy.retries:
                raise ShardFetchError(
                    f"{what}: gave up after {number + 1} attempts, at byte {position()}: "
                    f"{type(attempt.error).__name__}: {attempt.error}"
                ) from attempt.error
            pause = self.policy.backoff_seconds * 2**number
            log.warning(
                "%s: %s at byte %d (%s); retrying in %.1f s",
                what,
                type(attempt.error).__name__,
                position(),
                attempt.error,
                pause,
            )
            time.sleep(pause)


class _Attempt:
    """Catches a transient failure of one attempt; errors that retrying cannot fix pass."""

    PERMANENT = (ContractError, FileNotFoundError, PermissionError, IsADirectoryError)

    def __init__(self) -> None:
        self.error: BaseException | None = None

    def __enter__(self) -> _Attempt:
        return self

    def __exit__(self, kind, error, traceback) -> bool:
        if error is None or isinstance(error, self.PERMANENT) or not isinstance(error, Exception):
            return False
        self.error = error
        return True


def parse_manifest(data: bytes, where: str) -> dict[str, Any]:
    try:
        manifest = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ContractError(f"{where} is not JSON ({error})") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("shards"), list):
        raise ContractError(f"{where} is not a shard manifest (no list of shards)")
    return manifest


def atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
