"""The shard checker names every broken shard and passes an intact folder (guarantee 3 of
docs/design.md).

Faults are injected into copies of real demo shards. Structural faults are made with byte
surgery; content faults rebuild the shard around one damaged sample and fix up the manifest's
bytes and sha256, so that the file-level checks see a whole, correctly recorded shard.
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from shard_builder.check import (
    Report,
    check_folder,
    check_split,
    file_sha256,
    token_id_limit,
)
from shard_builder.contract import MANIFEST_NAME, REJECTS_NAME, npy_bytes, npy_from_bytes
from shard_builder.reader import tar_members
from tests.conftest import REPO

Sample = tuple[str, dict[str, bytes]]
VICTIM = "shard-000001.tar"  # a shard in the middle of train, so its neighbours must stay OK


@pytest.fixture
def shards(demo_shards, tmp_path) -> Path:
    """A private copy of the demo shards (train and test) that a test may damage."""
    return Path(shutil.copytree(demo_shards, tmp_path / "shards"))


def check(root: Path, deep: bool) -> Report:
    return check_folder(root, deep=deep, workers=1, progress=False)


def assert_only_broken(report: Report, *names: str) -> None:
    assert not report.ok
    assert report.broken() == list(names), report.text()


def manifest_of(split_dir: Path) -> dict:
    return json.loads((split_dir / MANIFEST_NAME).read_text())


def write_manifest(split_dir: Path, manifest: dict) -> None:
    (split_dir / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2))


def member_offsets(shard: Path):
    """(header offset, data offset, size) of every member."""
    with open(shard, "rb") as handle:
        return [(m.offset - 512, m.offset, m.size) for m in tar_members(handle)]


def truncate(shard: Path, size: int) -> None:
    with open(shard, "r+b") as handle:
        handle.truncate(size)


# --- content surgery: rebuild a shard, keep the manifest consistent ---------------------------


def read_samples(shard: Path) -> list[Sample]:
    samples: list[Sample] = []
    with tarfile.open(shard) as tar:
        for member in tar.getmembers():
            key, suffix = member.name.split(".", 1)
            if not samples or samples[-1][0] != key:
                samples.append((key, {}))
            samples[-1][1][suffix] = tar.extractfile(member).read()
    return samples


def write_samples(shard: Path, samples: list[Sample]) -> None:
    """Like the builder's writer, but without its guard that every sample is complete."""
    with tarfile.open(shard, "w", format=tarfile.USTAR_FORMAT) as tar:
        for key, members in samples:
            for suffix, data in members.items():
                info = tarfile.TarInfo(f"{key}.{suffix}")
                info.size, info.mtime, info.mode = len(data), 0, 0o644
                tar.addfile(info, io.BytesIO(data))


def rewrite_shard(split_dir: Path, name: str, edit: Callable[[list[Sample]], None]) -> None:
    """Apply `edit` to the shard's samples, rewrite it, and record its new bytes and sha256."""
    shard = split_dir / name
    samples = read_samples(shard)
    edit(samples)
    write_samples(shard, samples)
    manifest = manifest_of(split_dir)
    entry = next(e for e in manifest["shards"] if e["name"] == name)
    entry.update(bytes=shard.stat().st_size, sha256=file_sha256(shard))
    write_manifest(split_dir, manifest)


def nan_in_mel(samples: list[Sample]) -> None:
    mel = npy_from_bytes(samples[3][1]["mel.npy"]).copy()
    mel[0, mel.shape[1] // 2] = np.nan
    samples[3][1]["mel.npy"] = npy_bytes(mel)


def too_many_tokens(samples: list[Sample]) -> None:
    tokens = npy_from_bytes(samples[3][1]["tokens.npy"])
    body = np.resize(tokens[4:-1], 460)  # the text ids repeated, prefix and end token kept
    samples[3][1]["tokens.npy"] = npy_bytes(np.concatenate([tokens[:4], body, tokens[-1:]]))


def no_tokens_member(samples: list[Sample]) -> None:
    del samples[3][1]["tokens.npy"]


def duplicate_key_within(samples: list[Sample]) -> None:
    """Sample 5 takes sample 4's key and json id: a row written twice."""
    key, members = samples[4]
    samples[5] = (key, {**samples[5][1], "json": members["json"]})


def key_of_first_sample(split_dir: Path, name: str) -> tuple[str, bytes]:
    key, members = read_samples(split_dir / name)[0]
    return key, members["json"]


# --- an intact folder passes ------------------------------------------------------------------


def test_intact_folder_passes_through_the_cli(demo_shards, tmp_path):
    report_path = tmp_path / "report.json"
    fast = run_cli("scripts/check_shards.py", demo_shards, "--workers", "2")
    deep = run_cli(
        "-m", "shard_builder.check", demo_shards / "train", "--deep", "--json", report_path
    )
    assert fast.returncode == 0, fast.stdout + fast.stderr
    assert deep.returncode == 0, deep.stdout + deep.stderr
    assert "all shards whole" in fast.stdout
    report = json.loads(report_path.read_text())
    assert report["ok"] and report["mode"] == "deep" and report["problems"] == []
    manifest = manifest_of(demo_shards / "train")
    assert report["splits"][0]["num_samples"] == manifest["num_samples"]


def test_cli_fails_and_writes_the_broken_shard_to_json(shards, tmp_path):
    (shards / "train" / VICTIM).unlink()
    report_path = tmp_path / "report.json"
    result = run_cli("scripts/check_shards.py", shards, "--json", report_path)
    assert result.returncode == 1
    assert f"train/{VICTIM}" in result.stdout
    assert json.loads(report_path.read_text())["broken"] == [f"train/{VICTIM}"]


def run_cli(*args) -> subprocess.CompletedProcess:
    command = [sys.executable, *map(str, args), "--no-progress"]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)


def test_parallel_check_gives_the_same_report(shards):
    rewrite_shard(shards / "train", VICTIM, nan_in_mel)
    (shards / "train" / "shard-000003.tar").unlink()
    serial = check_split(shards / "train", deep=True, workers=1, progress=False)
    parallel = check_split(shards / "train", deep=True, workers=2, progress=False)
    assert parallel.to_dict() == serial.to_dict()
    assert serial.broken() == [f"train/{VICTIM}", "train/shard-000003.tar"]


# --- structural faults: the fast check catches them -------------------------------------------


def cut_between_members(shard: Path) -> None:
    header, _, _ = member_offsets(shard)[10]
    truncate(shard, header)


def cut_inside_header(shard: Path) -> None:
    header, _, _ = member_offsets(shard)[10]
    truncate(shard, header + 100)


def cut_inside_data(shard: Path) -> None:
    _, data, size = max(member_offsets(shard)[:12], key=lambda m: m[2])
    truncate(shard, data + size // 2)


def flip_bit_in_data(shard: Path) -> None:
    _, data, size = member_offsets(shard)[6]
    flip_bit(shard, data + size // 2)


def flip_bit_in_header(shard: Path) -> None:
    header, _, _ = member_offsets(shard)[6]
    flip_bit(shard, header + 3)  # inside the member's name


def flip_bit(path: Path, offset: int) -> None:
    with open(path, "r+b") as handle:
        handle.seek(offset)
        byte = handle.read(1)[0]
        handle.seek(offset)
        handle.write(bytes([byte ^ 0x10]))


@pytest.mark.parametrize(
    "damage, says",
    [
        (cut_between_members, "without the tar's end marker"),
        (cut_inside_header, "cut inside a tar header"),
        (cut_inside_data, "is cut"),
        (flip_bit_in_data, "sha256 differs"),
        (flip_bit_in_header, "bad tar header"),
    ],
)
def test_damaged_bytes_are_caught_by_the_fast_check(shards, damage, says):
    damage(shards / "train" / VICTIM)
    report = check(shards, deep=False)
    assert_only_broken(report, f"train/{VICTIM}")
    assert any(says in p.what for p in report.problems), report.text()


def test_without_sha256_cuts_are_caught_but_a_changed_data_byte_is_not(shards):
    """--no-sha256 trades the bit-flip guarantee for speed; this pins down the documented limit."""
    flip_bit_in_data(shards / "train" / VICTIM)
    assert check_folder(shards, progress=False, sha256=False).ok
    cut_inside_data(shards / "train" / "shard-000002.tar")
    report = check_folder(shards, progress=False, sha256=False)
    assert report.broken() == ["train/shard-000002.tar"]


def test_a_truncated_tar_reads_back_silently_which_is_why_counts_are_compared(shards):
    """The trap the checker exists for: tarfile returns fewer members, and no error."""
    shard = shards / "train" / VICTIM
    cut_between_members(shard)
    with tarfile.open(shard) as tar:
        assert len(tar.getmembers()) == 10


def test_truncation_with_a_fixed_up_manifest_is_still_caught(shards):
    """Even when the manifest is made to agree on bytes and sha, the tar has no end marker."""
    split_dir = shards / "train"
    cut_between_members(split_dir / VICTIM)
    manifest = manifest_of(split_dir)
    entry = next(e for e in manifest["shards"] if e["name"] == VICTIM)
    entry.update(bytes=(split_dir / VICTIM).stat().st_size, sha256=file_sha256(split_dir / VICTIM))
    write_manifest(split_dir, manifest)
    assert_only_broken(check(shards, deep=False), f"train/{VICTIM}")


def test_deleted_shard_is_named(shards):
    (shards / "train" / VICTIM).unlink()
    report = check(shards, deep=False)
    assert_only_broken(report, f"train/{VICTIM}")
    assert "missing" in report.problems[0].what


def test_extra_unlisted_shard_is_named(shards):
    shutil.copy(shards / "train" / VICTIM, shards / "train" / "shard-000099.tar")
    report = check(shards, deep=False)
    assert_only_broken(report, "train/shard-000099.tar")
    assert "not listed" in report.problems[0].what


def test_builder_leftovers_are_not_shards(shards):
    """Dot-files are the builder's temporaries and .build/ holds its records: not extra shards."""
    shutil.copy(shards / "train" / VICTIM, shards / "train" / ".shard-000005.tar.tmp-123")
    shutil.copy(shards / "train" / VICTIM, shards / "train" / ".build" / "stray.tar")
    assert check(shards, deep=True).ok


def test_manifest_whose_counts_do_not_add_up(shards):
    manifest = manifest_of(shards / "train")
    manifest["num_samples"] += 1
    write_manifest(shards / "train", manifest)
    report = check(shards, deep=False)
    assert_only_broken(report, f"train/{MANIFEST_NAME}")
    text = report.text()
    assert "!= num_input_rows" in text and "num_samples says" in text


def test_shard_count_disagreeing_with_the_manifest(shards):
    manifest = manifest_of(shards / "train")
    manifest["shards"][1]["num_samples"] -= 1
    manifest["shards"][2]["num_samples"] += 1  # the totals still add up
    write_manifest(shards / "train", manifest)
    report = check(shards, deep=False)
    assert_only_broken(report, f"train/{VICTIM}", "train/shard-000002.tar")


def test_rejects_file_must_match_the_rejected_count(shards):
    rejects = shards / "train" / REJECTS_NAME
    rejects.write_text("".join(rejects.read_text().splitlines(keepends=True)[1:]))
    assert_only_broken(check(shards, deep=False), f"train/{REJECTS_NAME}")


def test_unfinished_split_without_manifest_fails(shards):
    (shards / "test" / MANIFEST_NAME).unlink()
    report = check(shards, deep=False)
    assert_only_broken(report, f"test/{MANIFEST_NAME}")
    assert [s.split for s in report.splits] == ["train"]


def test_folder_without_any_split_fails(tmp_path):
    assert not check(tmp_path, deep=False).ok


# --- content faults: the shard is whole and recorded; the samples inside are wrong ------------


@pytest.mark.parametrize(
    "edit, fast_catches, says",
    [
        (nan_in_mel, False, "NaN/inf"),
        (too_many_tokens, False, "the decoder takes at most 448"),
        (no_tokens_member, True, "has no tokens.npy member"),
        (duplicate_key_within, True, "duplicate key"),
    ],
)
def test_bad_sample_is_caught_by_the_deep_check(shards, edit, fast_catches, says):
    rewrite_shard(shards / "train", VICTIM, edit)
    fast, deep = check(shards, deep=False), check(shards, deep=True)
    assert_only_broken(deep, f"train/{VICTIM}")
    assert any(says in p.what for p in deep.problems), deep.text()
    # the fast check reads tar headers (names), never member data
    assert fast.ok is not fast_catches, fast.text()
    if fast_catches:
        assert_only_broken(fast, f"train/{VICTIM}")


def test_duplicate_key_across_shards_names_the_later_shard(shards):
    split_dir = shards / "train"
    key, meta = key_of_first_sample(split_dir, "shard-000000.tar")

    def steal_key(samples: list[Sample]) -> None:
        samples[2] = (key, {**samples[2][1], "json": meta})

    rewrite_shard(split_dir, VICTIM, steal_key)
    for deep in (False, True):  # keys are in the tar headers, so the fast check sees it too
        report = check(shards, deep=deep)
        assert_only_broken(report, f"train/{VICTIM}")
        assert f"duplicate key {key}, also in shard-000000.tar" in report.text()


def test_key_not_matching_json_id_is_caught(shards):
    def swap_json(samples: list[Sample]) -> None:
        samples[2][1]["json"], samples[3][1]["json"] = samples[3][1]["json"], samples[2][1]["json"]

    rewrite_shard(shards / "train", VICTIM, swap_json)
    report = check(shards, deep=True)
    assert_only_broken(report, f"train/{VICTIM}")
    assert "does not match the key" in report.text()


@pytest.mark.parametrize(
    "field, value, says",
    [
        ("mel.npy", npy_bytes(np.zeros((80, 5), np.float32)), "expected float16"),
        ("mel.npy", npy_bytes(np.zeros((7, 5), np.float16)), "expected ["),
        # The demo shards are built for the tiny preset's 5 s window: 500 frames at most.
        ("mel.npy", npy_bytes(np.zeros((80, 501), np.float16)), "frames, expected 1..500"),
        ("mel.npy", b"not npy", "not a readable .npy"),
        ("tokens.npy", npy_bytes(np.array([1, 2, 3], np.int64)), "expected 1-d int32"),
        ("json", b"{not json", "json does not parse"),
        ("json", b'{"id": 0}', "json lacks"),
    ],
)
def test_malformed_members_are_caught_by_the_deep_check(shards, field, value, says):
    def damage(samples: list[Sample]) -> None:
        samples[0][1][field] = value

    rewrite_shard(shards / "train", VICTIM, damage)
    report = check(shards, deep=True)
    assert_only_broken(report, f"train/{VICTIM}")
    assert says in report.text()


def test_token_rules(shards):
    """Wrong prefix, missing end token and ids past the embedding table are named."""
    manifest = manifest_of(shards / "train")
    prefix, eot = manifest["prefix_tokens"], manifest["tokenizer"]["eot_id"]
    limit = token_id_limit(manifest["tokenizer"]["vocab_size"], tuple(prefix))
    cases = [
        ([*prefix[:-1], 400, eot], "expected the prefix"),
        ([*prefix, 400, 401], "must end with the end token"),
        ([*prefix, 400, eot, 401, eot], "must end with the end token"),
        ([*prefix, limit, eot], "outside 0.."),
        ([*prefix, -1, eot], "outside 0.."),
    ]
    for number, (ids, says) in enumerate(cases):
        fresh = shards.parent / f"case-{number}"
        shutil.copytree(shards, fresh)

        def damage(samples: list[Sample], ids=ids) -> None:
            samples[0][1]["tokens.npy"] = npy_bytes(np.array(ids, np.int32))

        rewrite_shard(fresh / "train", VICTIM, damage)
        report = check(fresh / "train", deep=True)
        assert report.broken() == [f"train/{VICTIM}"] and says in report.text(), (
            ids,
            report.text(),
        )


def test_token_id_limit_covers_whisper_timestamps():
    # len(tokenizer) and <|notimestamps|> of whisper-base and large-v3; their models' vocab_size
    assert token_id_limit(50364, (50258, 50261, 50359, 50363)) == 51865
    assert token_id_limit(51866, (50258, 50261, 50360, 50364)) == 51866


def test_checker_imports_none_of_the_builders_dependencies():
    code = (
        "import sys, shard_builder.check; "
        "print(sorted(m for m in ('torch','transformers','datasets','pyarrow','soundfile',"
        "'soxr','webdataset') if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert result.stdout.strip() == "[]", result.stdout + result.stderr
