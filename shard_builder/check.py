"""Prove a shard folder is whole before hours of GPU time depend on it.

A truncated tar often reads back without any error, just with fewer samples (a cut between
members or inside a header is silent to most readers), so "it opens" proves nothing. Every
shard is compared with what the manifest recorded when it was written.

- fast (default): the split's files against the manifest (no shard missing, none extra, bytes,
  sha256), every tar header walked (structure, checksums, no member cut short, three members per
  key, no duplicate key) and the counts (per shard, per split, rejects) adding up.
- deep (`--deep`): additionally reads and decodes every sample (dtypes, shapes, finite values,
  token ranges, prefix and end token, metadata fields).

Shards are read by `shard_builder.reader`, the trainer's reader too. Only the standard
library, numpy, tqdm and `shard_builder`'s contract and reader are imported, so the trainer can
run the fast check at start-up without the builder's audio and dataset packages.
docs/checking.md lists what each mode catches.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from shard_builder import storage
from shard_builder.contract import (
    MANIFEST_NAME,
    MAX_TARGET_POSITIONS,
    MEL_MEMBER,
    META_MEMBER,
    REJECTS_NAME,
    REQUIRED_META_FIELDS,
    SHARD_SUFFIX,
    TOKENS_MEMBER,
    ContractError,
    count_pieces,
    load_manifest,
    max_frames_of,
    sample_key,
)
from shard_builder.reader import (
    Member,
    TarDamage,
    group_samples,
    npy_array,
    read_members,
    tar_members,
)
from shard_builder.writer import file_sha256

# Whisper puts <|0.00|> .. <|30.00|> (1501 ids) right after <|notimestamps|>, the highest prefix
# id; the tokenizer's len() may not count them, the model's embedding table always does.
NUM_TIMESTAMP_TOKENS = 1501
SHARD_ENTRY_FIELDS = (("name", str), ("num_samples", int), ("bytes", int), ("sha256", str))
MAX_PROBLEMS_PER_SHARD = 20  # a shard with a systematic fault would otherwise flood the report


# --- the report -----------------------------------------------------------------------------


@dataclass
class Problem:
    split: str
    where: str  # a shard's file name, manifest.json, rejects.jsonl, or "split" for the folder
    what: str

    def __str__(self) -> str:
        return f"{self.split}/{self.where}: {self.what}"


@dataclass
class SplitSummary:
    split: str
    path: str
    num_shards: int = 0
    num_samples: int = 0  # samples found in the shards (counted from tar headers)


@dataclass
class Report:
    deep: bool
    splits: list[SplitSummary] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems and bool(self.splits)

    def broken(self) -> list[str]:
        """`split/where` for everything broken, each named once, in report order."""
        return list(dict.fromkeys(f"{p.split}/{p.where}" for p in self.problems))

    def extend(self, other: Report) -> None:
        self.splits += other.splits
        self.problems += other.problems

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "mode": "deep" if self.deep else "fast",
            "broken": self.broken(),
            "splits": [asdict(s) for s in self.splits],
            "problems": [asdict(p) for p in self.problems],
        }

    def text(self) -> str:
        mode = "deep" if self.deep else "fast"
        lines = []
        for summary in self.splits:
            problems = [p for p in self.problems if p.split == summary.split]
            status = "OK  " if not problems else "FAIL"
            lines.append(
                f"{status} {summary.split}: {summary.num_shards} shards, "
                f"{summary.num_samples} samples ({mode} check) in {summary.path}"
            )
            lines += [f"     {p}" for p in problems]
        known = {s.split for s in self.splits}
        lines += [f"FAIL {p}" for p in self.problems if p.split not in known]
        if not self.splits:
            lines.append("FAIL no split checked")
        verdict = "all shards whole" if self.ok else f"{len(self.broken())} broken: DO NOT TRAIN"
        lines.append(f"{verdict} ({mode} check)")
        return "\n".join(lines)


# --- one shard (runs in a worker process) -------------------------------------------------------


@dataclass(frozen=True)
class SampleRules:
    """What every sample of a split must look like, read from its manifest."""

    split: str
    n_mels: int
    max_frames: int
    prefix_tokens: tuple[int, ...]
    eot_id: int
    token_id_limit: int


@dataclass(frozen=True)
class ShardJob:
    path: Path
    expected: dict[str, Any] | None  # the manifest's entry; None for a tar it does not list
    rules: SampleRules | None  # None for the fast check
    verify_sha256: bool = True


@dataclass
class ShardResult:
    name: str
    problems: list[str]
    keys: list[str]


def check_shard(job: ShardJob) -> ShardResult:
    name = job.path.name
    if not job.path.is_file():
        return ShardResult(name, ["listed in the manifest but missing"], [])
    if job.expected is None:
        return ShardResult(name, ["not listed in the manifest (left over from another build?)"], [])
    problems = file_problems(job.path, job.expected, job.verify_sha256)
    try:
        with open(job.path, "rb") as handle:
            members = tar_members(handle)
    except TarDamage as damage:
        return ShardResult(name, [*problems, str(damage)], [])
    samples, structure = group_samples(members)
    problems += structure
    if len(samples) != job.expected["num_samples"]:
        problems.append(
            f"holds {len(samples)} samples, the manifest says {job.expected['num_samples']}"
        )
    if job.rules is not None:
        problems += deep_problems(job.path, samples, job.rules)
    return ShardResult(name, capped(problems), [key for key, _ in samples])


def file_problems(path: Path, expected: dict[str, Any], verify_sha256: bool) -> list[str]:
    size = path.stat().st_size
    if size != expected["bytes"]:
        # a different size already proves damage; hashing a truncated file adds nothing
        return [f"is {size} bytes, the manifest says {expected['bytes']} (truncated or replaced)"]
    if verify_sha256 and file_sha256(path) != expected["sha256"]:
        return ["sha256 differs from the manifest (bytes changed in place: bit rot, bad copy)"]
    return []


def capped(problems: list[str]) -> list[str]:
    if len(problems) <= MAX_PROBLEMS_PER_SHARD:
        return problems
    more = len(problems) - MAX_PROBLEMS_PER_SHARD
    return [*problems[:MAX_PROBLEMS_PER_SHARD], f"... and {more} more problems"]


# --- deep: every sample decoded ---------------------------------------------------------------


def deep_problems(
    path: Path, samples: list[tuple[str, dict[str, Member]]], rules: SampleRules
) -> list[str]:
    problems = []
    with open(path, "rb") as handle:
        for key, parts in samples:
            data = read_members(handle, parts, parts)
            problems += [f"sample {key}: {p}" for p in sample_problems(key, data, rules)]
            if len(problems) > MAX_PROBLEMS_PER_SHARD:
                break  # the cap hides the rest anyway; stop decoding a hopeless shard
    return problems


def sample_problems(key: str, data: dict[str, bytes], rules: SampleRules) -> list[str]:
    problems = []
    if MEL_MEMBER in data:
        problems += mel_problems(data[MEL_MEMBER], rules)
    if TOKENS_MEMBER in data:
        problems += token_problems(data[TOKENS_MEMBER], rules)
    if META_MEMBER in data:
        problems += meta_problems(key, data[META_MEMBER], rules)
    return problems


def load_npy(data: bytes, member: str) -> tuple[np.ndarray | None, list[str]]:
    try:
        return npy_array(data), []
    except Exception as error:  # any decoding failure means the member is unreadable
        return None, [f"{member} is not a readable .npy ({type(error).__name__}: {error})"]


def mel_problems(data: bytes, rules: SampleRules) -> list[str]:
    mel, problems = load_npy(data, MEL_MEMBER)
    if mel is None:
        return problems
    if mel.dtype != np.float16:
        return [f"mel is {mel.dtype}, expected float16"]
    if mel.ndim != 2 or mel.shape[0] != rules.n_mels:
        return [f"mel has shape {list(mel.shape)}, expected [{rules.n_mels}, frames]"]
    if not 1 <= mel.shape[1] <= rules.max_frames:
        problems.append(f"mel has {mel.shape[1]} frames, expected 1..{rules.max_frames}")
    if not np.isfinite(mel).all():
        problems.append(f"mel holds {np.count_nonzero(~np.isfinite(mel))} NaN/inf values")
    return problems


def token_problems(data: bytes, rules: SampleRules) -> list[str]:
    tokens, problems = load_npy(data, TOKENS_MEMBER)
    if tokens is None:
        return problems
    if tokens.dtype != np.int32 or tokens.ndim != 1:
        return [f"tokens are {tokens.dtype} of shape {list(tokens.shape)}, expected 1-d int32"]
    ids = tokens.tolist()
    prefix = list(rules.prefix_tokens)
    if len(ids) > MAX_TARGET_POSITIONS:
        problems.append(f"{len(ids)} tokens, the decoder takes at most {MAX_TARGET_POSITIONS}")
    if ids[: len(prefix)] != prefix:
        problems.append(f"tokens start {ids[: len(prefix)]}, expected the prefix {prefix}")
    if not ids or ids[-1] != rules.eot_id or ids.count(rules.eot_id) != 1:
        problems.append(f"tokens must end with the end token {rules.eot_id}, and hold it once")
    if len(ids) <= len(prefix) + 1:
        problems.append("tokens hold no text between the prefix and the end token")
    out_of_range = [i for i in ids if not 0 <= i < rules.token_id_limit]
    if out_of_range:
        problems.append(f"token ids {out_of_range[:5]} outside 0..{rules.token_id_limit - 1}")
    return problems


def meta_problems(key: str, data: bytes, rules: SampleRules) -> list[str]:
    try:
        meta = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        return [f"json does not parse ({error})"]
    if not isinstance(meta, dict):
        return [f"json is a {type(meta).__name__}, expected an object"]
    missing = [f for f in REQUIRED_META_FIELDS if f not in meta]
    if missing:
        return [f"json lacks {', '.join(missing)}"]
    problems = []
    row_id, piece = meta["id"], meta.get("piece")
    if (
        not isinstance(row_id, int)
        or not isinstance(piece, (int, type(None)))
        or sample_key(rules.split, row_id, piece) != key
    ):
        problems.append(f"json id {row_id!r} (piece {piece!r}) does not match the key")
    pad = meta["pad_value"]
    if not isinstance(pad, (int, float)) or not math.isfinite(pad):
        problems.append(f"json pad_value {pad!r} is not a finite number")
    return problems


# --- one split --------------------------------------------------------------------------------


def check_split(
    split_dir: str | Path,
    deep: bool = False,
    workers: int = 1,
    progress: bool = True,
    sha256: bool = True,
    name: str | None = None,
    shown_as: str | None = None,
) -> Report:
    """Check one split folder (holding manifest.json) against its manifest.

    `name` and `shown_as` name the split and its location in the report when the folder is a
    local mirror of a URL.

    `sha256=False` skips hashing (the one step that reads every byte in the fast check): sizes,
    tar headers and counts still catch truncation and missing or extra shards, but not a
    changed byte inside member data.
    """
    split_dir = Path(split_dir)
    split = name or split_dir.name
    report = Report(deep, [SplitSummary(split, shown_as or str(split_dir))])
    try:
        manifest = load_manifest(split_dir)
        manifest_problems = count_problems(manifest)
    except KeyError as error:
        report.problems.append(Problem(split, MANIFEST_NAME, f"unusable: no field {error}"))
        return report
    except (ContractError, ValueError, TypeError) as error:
        report.problems.append(Problem(split, MANIFEST_NAME, f"unusable: {error}"))
        return report
    report.problems += [Problem(split, MANIFEST_NAME, p) for p in manifest_problems]
    rejects = reject_problems(split_dir, manifest)
    report.problems += [Problem(split, REJECTS_NAME, p) for p in rejects]
    rules = None
    if deep:
        try:
            rules = sample_rules(manifest, split)
        except (KeyError, TypeError, ValueError) as error:
            report.problems.append(Problem(split, MANIFEST_NAME, f"no sample rules: {error!r}"))
    jobs = shard_jobs(split_dir, manifest, rules, sha256)
    results = run_jobs(jobs, workers, progress, split)
    report.splits[0].num_shards = len(manifest["shards"])
    report.splits[0].num_samples = sum(len(r.keys) for r in results)
    for result in results:
        report.problems += [Problem(split, result.name, p) for p in result.problems]
    report.problems += [Problem(split, n, p) for n, p in duplicate_keys_across(results)]
    report.problems += [Problem(split, MANIFEST_NAME, p) for p in piece_problems(manifest, results)]
    return report


def piece_problems(manifest: dict[str, Any], results: list[ShardResult]) -> list[str]:
    """The pieces of split rows found in the shards are the ones the manifest counts."""
    rows, pieces = count_pieces([key for result in results for key in result.keys])
    expected = manifest.get("num_split", 0), manifest.get("num_split_pieces", 0)
    if (rows, pieces) == expected:
        return []
    return [
        f"the shards hold {pieces} pieces of {rows} split rows, the manifest counts "
        f"{expected[1]} pieces of {expected[0]}"
    ]


def count_problems(manifest: dict[str, Any]) -> list[str]:
    """The manifest's own arithmetic: raises on a manifest too broken to check shards against."""
    shards = manifest["shards"]
    for entry in shards:
        for field_name, kind in SHARD_ENTRY_FIELDS:
            if not isinstance(entry.get(field_name), kind):
                raise TypeError(f"shard entry {entry!r}: {field_name} is not a {kind.__name__}")
    problems = []
    names = [entry["name"] for entry in shards]
    if len(set(names)) != len(names):
        problems.append("lists a shard name twice")
    samples, rejected = manifest["num_samples"], manifest["num_rejected"]
    rows = manifest["num_input_rows"]
    # a long row split at pauses is one input row in several samples (its pieces)
    split, pieces = manifest.get("num_split", 0), manifest.get("num_split_pieces", 0)
    if samples - pieces + split + rejected != rows:
        problems.append(
            f"num_samples {samples} - num_split_pieces {pieces} + num_split {split} + "
            f"num_rejected {rejected} != num_input_rows {rows}"
        )
    listed = sum(entry["num_samples"] for entry in shards)
    if listed != samples:
        problems.append(f"its shards hold {listed} samples in all, num_samples says {samples}")
    return problems


def reject_problems(split_dir: Path, manifest: dict[str, Any]) -> list[str]:
    path = split_dir / REJECTS_NAME
    if not path.is_file():
        return [f"missing (the manifest counts {manifest['num_rejected']} rejected rows)"]
    # undecodable bytes become U+FFFD, so such a line fails as JSON instead of the checker
    lines = path.read_bytes().decode("utf-8", errors="replace").splitlines()
    problems = []
    for number, line in enumerate(lines, 1):
        try:
            json.loads(line)
        except json.JSONDecodeError:
            problems.append(f"line {number} is not JSON")
            break
    if len(lines) != manifest["num_rejected"]:
        problems.append(f"{len(lines)} lines, the manifest counts {manifest['num_rejected']}")
    return problems


def sample_rules(manifest: dict[str, Any], split: str) -> SampleRules:
    tokenizer = manifest["tokenizer"]
    prefix = tuple(int(t) for t in manifest["prefix_tokens"])
    return SampleRules(
        split=manifest.get("split", split),
        n_mels=int(manifest["features"]["n_mels"]),
        max_frames=max_frames_of(manifest),
        prefix_tokens=prefix,
        eot_id=int(tokenizer["eot_id"]),
        token_id_limit=token_id_limit(int(tokenizer["vocab_size"]), prefix),
    )


def token_id_limit(vocab_size: int, prefix_tokens: tuple[int, ...]) -> int:
    """One past the highest id a Whisper target may hold.

    `len(tokenizer)` (the manifest's vocab_size) can leave out the timestamp ids that follow
    <|notimestamps|>, which the model's embedding table has. For every released Whisper this
    bound equals the model's vocab_size (51865 for base, 51866 for large-v3).
    """
    return max(vocab_size, max(prefix_tokens, default=0) + 1 + NUM_TIMESTAMP_TOKENS)


def shard_jobs(
    split_dir: Path, manifest: dict[str, Any], rules: SampleRules | None, sha256: bool
) -> list[ShardJob]:
    listed = {entry["name"]: entry for entry in manifest["shards"]}
    jobs = [ShardJob(split_dir / name, entry, rules, sha256) for name, entry in listed.items()]
    # dot-files are the builder's temporaries; .build/ holds its records, not shards
    present = sorted(p.name for p in split_dir.glob(f"*{SHARD_SUFFIX}") if p.is_file())
    jobs += [ShardJob(split_dir / n, None, rules, sha256) for n in present if n not in listed]
    return jobs


def run_jobs(jobs: list[ShardJob], workers: int, progress: bool, split: str) -> list[ShardResult]:
    """Check shards in worker processes; results in job order, whatever order they finish in."""
    bar = tqdm(total=len(jobs), unit="shard", desc=f"checking {split}", disable=not progress)
    results: dict[str, ShardResult] = {}
    try:
        if workers <= 1 or len(jobs) <= 1:
            for job in jobs:
                results[job.path.name] = check_shard(job)
                bar.update()
        else:
            # spawn: the trainer may call this with CUDA or threads live, where fork is unsafe
            context = multiprocessing.get_context("spawn")
            with context.Pool(min(workers, len(jobs))) as pool:
                for result in pool.imap_unordered(check_shard, jobs):
                    results[result.name] = result
                    bar.update()
    finally:
        bar.close()
    return [results[job.path.name] for job in jobs]


def duplicate_keys_across(results: list[ShardResult]) -> Iterator[tuple[str, str]]:
    """Keys found in more than one shard; the later shard (manifest order) is named."""
    first_seen: dict[str, str] = {}
    for result in results:
        for key in dict.fromkeys(result.keys):  # repeats within a shard are reported already
            if key in first_seen:
                yield result.name, f"duplicate key {key}, also in {first_seen[key]}"
            else:
                first_seen[key] = result.name


# --- a folder of splits -------------------------------------------------------------------------


def find_splits(root: Path) -> tuple[list[Path], list[Problem]]:
    """`root` itself when it holds a manifest, else its subfolders that hold one.

    A subfolder with shards or build records but no manifest is an unfinished build, and is
    reported rather than skipped: training must not start on it.
    """
    if (root / MANIFEST_NAME).is_file():
        return [root], []
    splits, problems = [], []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if (folder / MANIFEST_NAME).is_file():
            splits.append(folder)
        elif any(folder.glob(f"*{SHARD_SUFFIX}")) or (folder / ".build").is_dir():
            problems.append(
                Problem(
                    folder.name,
                    MANIFEST_NAME,
                    "missing: the build of this split never "
                    "finished (the manifest is written last); run the builder again",
                )
            )
    return splits, problems


def check_folder(
    root: str | Path,
    deep: bool = False,
    workers: int = 1,
    progress: bool = True,
    sha256: bool = True,
) -> Report:
    """Check a split folder, or every split folder (subfolder holding manifest.json) in `root`."""
    root = Path(root)
    report = Report(deep)
    if not root.is_dir():
        report.problems.append(Problem(root.name, "split", f"{root} is not a folder"))
        return report
    splits, report.problems = find_splits(root)
    if not splits and not report.problems:
        report.problems.append(
            Problem(root.name, "split", f"no {MANIFEST_NAME} in {root} or its subfolders")
        )
    for split_dir in splits:
        report.extend(check_split(split_dir, deep, workers, progress, sha256))
    return report


def check_location(
    location: str,
    deep: bool = False,
    workers: int = 1,
    progress: bool = True,
    sha256: bool = True,
    cache_dir: str | None = None,
) -> Report:
    """A local folder as `check_folder`; a URL's splits are fetched into the local cache
    (every shard verified against the manifest's sha256 on the way) and then checked there."""
    if not storage.is_url(location):
        return check_folder(storage.local_path(location), deep, workers, progress, sha256)
    report = Report(deep)
    label = location.rstrip("/").rsplit("/", 1)[-1]
    try:
        split_urls = storage.find_split_urls(location)
    except OSError as error:
        report.problems.append(Problem(label, "split", f"cannot read {location}: {error}"))
        return report
    if not split_urls:
        report.problems.append(
            Problem(label, "split", f"no {MANIFEST_NAME} at {location} or in its subfolders")
        )
    for url in split_urls:
        split = url.rsplit("/", 1)[-1]
        try:
            mirror = storage.local_split(url, cache_dir, progress)
        except (ContractError, OSError) as error:
            report.splits.append(SplitSummary(split, url))
            report.problems.append(Problem(split, "fetch", str(error)))
            continue
        report.extend(check_split(mirror, deep, workers, progress, sha256, split, url))
        for name in storage.unlisted_shards(url, load_manifest(mirror)):
            report.problems.append(
                Problem(split, name, "not listed in the manifest (left over from another build?)")
            )
    return report


# --- command line -------------------------------------------------------------------------------


def default_workers() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python scripts/check_shards.py",
        description="Check shard folders against their manifests; exit 0 only if all is whole.",
    )
    parser.add_argument(
        "folders",
        nargs="+",
        help="a split folder (holding manifest.json) or a folder of split folders; either may "
        "be a URL (s3://, gs://, hf://, https://), fetched into --shard-cache and checked there",
    )
    parser.add_argument(
        "--shard-cache",
        default=None,
        help="local folder for splits read from a URL (default: $SHARD_CACHE_DIR, else "
        "~/.cache/whisper-german-trainer/shards)",
    )
    parser.add_argument(
        "--deep",
        action="store_true",
        help="also decode every sample: members, dtypes, shapes, finite mels, token ids, json",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=default_workers(),
        help="processes checking shards in parallel (default: the usable CPU cores)",
    )
    parser.add_argument("--json", type=Path, help="also write the report as JSON to this file")
    parser.add_argument(
        "--no-sha256",
        action="store_true",
        help="skip hashing: faster, still catches cuts and missing or extra shards, but not a "
        "changed byte inside member data (use for repeated start-up checks, not the first)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    report = Report(args.deep)
    for folder in args.folders:
        report.extend(
            check_location(
                folder,
                args.deep,
                args.workers,
                not args.no_progress,
                not args.no_sha256,
                args.shard_cache,
            )
        )
    print(report.text())
    if args.json:
        args.json.write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
