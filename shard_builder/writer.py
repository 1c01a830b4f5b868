"""Byte-reproducible tar shards that appear under their final name only when complete.

Every tar header field that could vary between runs (mtime, owner, mode, format) is fixed, and
samples are written in row order, so the same rows always give the same bytes whatever the
number of worker processes and however often the build was interrupted.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import tarfile
from pathlib import Path
from typing import Any

from shard_builder.contract import MEMBERS


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that `path` is either absent, or whole and on disk."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def atomic_write_json(path: Path, payload: Any) -> None:
    text = json.dumps(payload, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    atomic_write_bytes(path, text.encode())


class ShardWriter:
    """Collects the members of one shard's samples, then writes the tar atomically."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.tmp_path = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        self.num_samples = 0
        self._handle = open(self.tmp_path, "wb")
        self._tar = tarfile.open(fileobj=self._handle, mode="w", format=tarfile.USTAR_FORMAT)

    def add(self, key: str, members: dict[str, bytes]) -> None:
        assert "." not in key and set(members) == set(MEMBERS), (key, sorted(members))
        for suffix in MEMBERS:
            data = members[suffix]
            info = tarfile.TarInfo(f"{key}.{suffix}")
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            self._tar.addfile(info, io.BytesIO(data))
        self.num_samples += 1

    def close(self) -> dict[str, Any]:
        """Finish the tar, make it durable, rename it into place; return its manifest entry."""
        self._tar.close()
        self._handle.flush()
        os.fsync(self._handle.fileno())
        self._handle.close()
        entry = {
            "name": self.path.name,
            "num_samples": self.num_samples,
            "bytes": self.tmp_path.stat().st_size,
            "sha256": file_sha256(self.tmp_path),
        }
        os.replace(self.tmp_path, self.path)
        fsync_dir(self.path.parent)
        return entry

    def abort(self) -> None:
        """Drop the partial shard. Write nothing more to it: on a full disk, finishing the tar
        or flushing fails again, and an error here would leave the temporary file behind."""
        with contextlib.suppress(OSError):  # the error that made us abort is the one to report
            self._handle.close()
        self.tmp_path.unlink(missing_ok=True)


def file_sha256(path: Path, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()
