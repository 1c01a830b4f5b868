"""The builder under faults (docs/design.md, guarantee 1): killed or out of disk space at any point,
it never leaves a partial file under a final name, and a rerun gives byte-identical shards that
pass the checker.

The reference is the uninterrupted `demo_shards` build. Kills happen at exact points through a
small driver that wraps the real entry point (no hook in the builder itself); each scenario is
one resumed run after the previous one, so five builder processes cover four kill points.
Disk full is a fake disk with a byte budget under the writer's `open`, run in-process.
"""

from __future__ import annotations

import errno
import io
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from shard_builder import writer
from shard_builder.__main__ import main as builder_main
from shard_builder.build import RECORDS_DIR
from shard_builder.check import check_folder
from shard_builder.contract import MANIFEST_NAME, REJECTS_NAME
from tests.conftest import DEMO_CORPUS, DEMO_SHARD_SIZE, REPO, TINY_MODEL

SPLIT = "train"  # 5 shards of the demo corpus; test has one, and adds nothing here

# Runs the builder's real entry point, SIGKILLing it at one point given as argv[1]:
#   add:N          right after the N-th sample of this run went into a shard (mid-write)
#   before:NAME    when a finished temporary is about to be renamed to NAME (closing)
#   after:NAME     right after the rename to NAME, before anything else is written
KILL_DRIVER = """
import os, signal, sys
from shard_builder import writer
from shard_builder.__main__ import main

point, target = sys.argv[1].split(":")

def die():
    os.kill(os.getpid(), signal.SIGKILL)

if point == "add":
    original_add, added = writer.ShardWriter.add, []
    def add(self, key, members):
        original_add(self, key, members)
        added.append(key)
        if len(added) == int(target):
            self._handle.flush()  # the partial tar really reaches the file
            die()
    writer.ShardWriter.add = add
else:
    real_replace = os.replace
    def replace(src, dst):
        if point == "before" and str(dst).endswith(target):
            die()
        real_replace(src, dst)
        if point == "after" and str(dst).endswith(target):
            die()
    os.replace = replace
sys.exit(main(sys.argv[2:]))
"""


def builder_args(out: Path) -> list[str]:
    """The demo_shards fixture's arguments, for one split: the manifest does not depend on it."""
    return [
        "--dataset", str(DEMO_CORPUS), "--model", str(TINY_MODEL), "--out", str(out),
        "--workers", "1", "--shard-size", str(DEMO_SHARD_SIZE), "--splits", SPLIT,
    ]  # fmt: skip


def final_files(split_dir: Path) -> dict[str, bytes]:
    """Every file under a final name (shards, records, rejects, manifest); not temporaries."""
    names = [p for p in split_dir.glob("*") if p.is_file() and not p.name.startswith(".")]
    names += [p for p in (split_dir / RECORDS_DIR).glob("*.json") if not p.name.startswith(".")]
    return {str(p.relative_to(split_dir)): p.read_bytes() for p in names}


def temporaries(split_dir: Path) -> list[str]:
    return sorted(str(p.relative_to(split_dir)) for p in split_dir.rglob(".*") if p.is_file())


def assert_every_final_file_is_whole(split_dir: Path, reference: dict[str, bytes], when: str):
    """A file under a final name is byte-identical to the uninterrupted build's, or absent."""
    for name, data in final_files(split_dir).items():
        assert data == reference[name], f"{when}: {name} differs from the uninterrupted build"


def assert_identical_and_checked(split_dir: Path, reference: dict[str, bytes]) -> None:
    assert final_files(split_dir) == reference
    assert temporaries(split_dir) == []
    report = check_folder(split_dir, deep=True, progress=False)
    assert report.ok, report.text()


@pytest.fixture
def reference(demo_shards) -> dict[str, bytes]:
    return final_files(demo_shards / SPLIT)


# --- SIGKILL ----------------------------------------------------------------------------------


KILL_POINTS = [  # point, what it means, whether a temporary is left for the rerun to remove
    ("add:70", "mid-write: shard 1 holds 6 of its samples", True),
    ("after:shard-000002.tar", "shard 2 renamed into place, its record not yet written", False),
    ("before:shard-000003.tar", "closing shard 3: tar finished and synced, not renamed", True),
    (f"before:{MANIFEST_NAME}", "writing the manifest: rejects written, manifest not", True),
]


def test_killed_builds_resume_to_identical_shards(reference, tmp_path):
    out = tmp_path / "out"
    split_dir = out / SPLIT
    for point, meaning, leaves_temporary in KILL_POINTS:
        killed = run_killed(point, out)
        assert killed.returncode == -signal.SIGKILL, f"{point}: not killed\n{killed.stderr[-2000:]}"
        assert bool(temporaries(split_dir)) == leaves_temporary, temporaries(split_dir)
        assert_every_final_file_is_whole(split_dir, reference, f"killed at {meaning}")
        assert not check_folder(out, progress=False).ok, f"a build killed at {meaning} passed"
    assert (split_dir / f"{RECORDS_DIR}/shard-000001.tar.json").is_file()  # the kills resumed
    finished = subprocess.run(
        [sys.executable, "-m", "shard_builder", *builder_args(out)],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert "resuming: 5 complete shard(s) kept, 0 to build" in finished.stdout
    assert_identical_and_checked(split_dir, reference)


def run_killed(point: str, out: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-c", KILL_DRIVER, point, *builder_args(out)]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)


# --- disk full --------------------------------------------------------------------------------


class FullDisk:
    """`open` for the writer module, on a disk with `free` bytes left: a write that does not fit
    raises ENOSPC, as the kernel does, and the bytes stay unwritten."""

    def __init__(self, free: int) -> None:
        self.free = free

    def __call__(self, path, mode="r", *args, **kwargs):
        handle = open(path, mode, *args, **kwargs)
        return _MeteredFile(handle, self) if "w" in mode else handle


class _MeteredFile(io.RawIOBase):
    def __init__(self, handle, disk: FullDisk) -> None:
        self._handle, self._disk = handle, disk

    def write(self, data) -> int:
        if len(data) > self._disk.free:
            raise OSError(errno.ENOSPC, "No space left on device")
        self._disk.free -= len(data)
        return self._handle.write(data)

    def __getattr__(self, name):
        return getattr(self._handle, name)

    def fileno(self) -> int:
        return self._handle.fileno()

    def flush(self) -> None:
        self._handle.flush()

    def tell(self) -> int:
        return self._handle.tell()

    def writable(self) -> bool:
        return True

    def close(self) -> None:
        if not self.closed:
            super().close()  # flushes through this wrapper first
            self._handle.close()


def written_in_order(reference: dict[str, bytes]) -> list[tuple[str, int]]:
    """The files a build writes, in the order it writes them (workers 1), with their sizes."""
    shards = sorted(name for name in reference if name.endswith(".tar"))
    order = [n for shard in shards for n in (shard, f"{RECORDS_DIR}/{shard}.json")]
    return [(name, len(reference[name])) for name in [*order, REJECTS_NAME, MANIFEST_NAME]]


def kept_by_a_rerun(split_dir: Path) -> set[str]:
    """Shards with their records in place, and those records: a rerun does not write them."""
    shards = [p.name.removesuffix(".json") for p in (split_dir / RECORDS_DIR).glob("*.json")]
    return {name for shard in shards for name in (shard, f"{RECORDS_DIR}/{shard}.json")}


def free_space_failing_in(
    reference: dict[str, bytes], name: str, fraction: float, skip: set[str]
) -> int:
    """Free bytes such that a build that keeps `skip` runs out `fraction` into writing `name`."""
    free = 0
    for written, size in written_in_order(reference):
        if written in skip:
            continue
        if written == name:
            return free + int(size * fraction)
        free += size
    raise AssertionError(name)


def run_on_full_disk(monkeypatch, capsys, out: Path, free: int | None) -> tuple[int, str]:
    if free is not None:
        monkeypatch.setattr(writer, "open", FullDisk(free), raising=False)
    try:
        status = builder_main(builder_args(out))
    finally:
        monkeypatch.undo()
    return status, capsys.readouterr().err


def test_disk_full_stops_cleanly_and_a_rerun_completes(reference, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    split_dir = out / SPLIT
    for name, fraction, meaning in [
        ("shard-000001.tar", 0.5, "in the middle of a shard"),
        (f"{RECORDS_DIR}/shard-000002.tar.json", 0.5, "writing a shard's record"),
        (MANIFEST_NAME, 0.5, "writing the manifest"),
    ]:
        free = free_space_failing_in(reference, name, fraction, skip=kept_by_a_rerun(split_dir))
        status, stderr = run_on_full_disk(monkeypatch, capsys, out, free)
        assert status == 2, f"disk full {meaning}: exit {status}\n{stderr[-2000:]}"
        assert "error: disk full while writing" in stderr, stderr[-2000:]
        assert_every_final_file_is_whole(split_dir, reference, f"disk full {meaning}")
        assert temporaries(split_dir) == [], f"disk full {meaning}: temporaries left behind"
        assert name not in final_files(split_dir)
    status, stderr = run_on_full_disk(monkeypatch, capsys, out, None)
    assert status == 0, stderr[-3000:]
    assert_identical_and_checked(split_dir, reference)
