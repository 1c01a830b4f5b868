"""`python -m shard_builder.inspect DATASET_OR_SHARDS`: look at the data before and after the build.

It reads what the builder reads (a hub dataset id, a local parquet folder laid out like the hub
repo, a folder written by `datasets`' save_to_disk) or what it writes (a shard split: a folder
with manifest.json, or the output folder holding one per split), and prints per split the
columns and their types, a few rows, the rows per source, and histograms of durations and
target token counts, with how many rows are longer than the model's window (the builder's own
rule, `contract.exceeds_window`): those the builder splits at pauses (`--long-audio split`, the
default), rejects as `too_long_unaligned` when the split is not confident, or rejects as
`too_long` (`--long-audio reject`). `--json` prints the same as JSON (`too_long` counts them).

Only a sample of rows is read (`--sample-rows`): parquet row groups spread over the split,
chosen from the footers, so a hub dataset answers without being downloaded. Row
counts come from the footers and are exact; per-source counts and histograms are of the sample.
Durations are read from each clip's header (`soundfile.info`), not by decoding it.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shard_builder.config import load_dotenv_file
from shard_builder.contract import (
    HOP_LENGTH,
    MANIFEST_NAME,
    MAX_TARGET_POSITIONS,
    MEL_MEMBER,
    MEMBERS,
    META_MEMBER,
    SAMPLING_RATE,
    TOKENS_MEMBER,
    ContractError,
    exceeds_window,
    load_manifest,
    max_frames_of,
)

EXAMPLE_ROWS = 3
TOKEN_EDGES = (0, 16, 32, 64, 128, 224, MAX_TARGET_POSITIONS)  # 224: a prompt's budget
DURATION_BINS = 6  # at most this many bins up to the window, then one for "longer than it"
BIN_WIDTHS = (0.5, 1.0, 2.0, 2.5, 5.0, 10.0)  # seconds: round bin edges
BAR_WIDTH = 40


@dataclass
class SampledRow:
    duration: float | None  # seconds; None when the audio header cannot be read
    num_samples: int | None  # at 16 kHz, as the builder would see it after resampling
    text: str | None
    source: str | None
    tokens: int | None  # the full target sequence, prefix and end token included


@dataclass
class SplitFigures:
    split: str
    num_rows: int  # exact: from parquet footers or the manifest
    columns: dict[str, str]
    rows: list[SampledRow] = field(default_factory=list)
    notes: dict[str, Any] = field(default_factory=dict)  # manifest figures of a built split


# --- datasets (before the build) ----------------------------------------------------------------


def audio_length(data: bytes | None) -> tuple[float | None, int | None]:
    """(seconds, samples at 16 kHz) from the audio header alone; (None, None) if unreadable."""
    import soundfile

    if not data:
        return None, None
    try:
        info = soundfile.info(io.BytesIO(data))
    except Exception:  # soundfile raises several types for undecodable input
        return None, None
    if info.samplerate <= 0:
        return None, None
    # soxr's output length for a whole clip: the input length scaled to 16 kHz, rounded.
    return info.frames / info.samplerate, round(info.frames * SAMPLING_RATE / info.samplerate)


def sample_ranges(groups: list[tuple[int, int]], budget: int) -> list[tuple[int, int]]:
    """Row groups spread evenly over the split until `budget` rows are covered (at least one)."""
    if not groups:
        return []
    total = groups[-1][1]
    if total <= budget:
        return list(groups)
    mean_rows = total / len(groups)
    wanted = max(1, min(len(groups), math.ceil(budget / mean_rows)))
    picked = sorted({round(i * (len(groups) - 1) / max(1, wanted - 1)) for i in range(wanted)})
    return [groups[i] for i in picked]


def column_types(source, split: str) -> dict[str, str]:
    schema = source.schema(split)
    return {name: str(schema.field(name).type) for name in schema.names}


def read_dataset_split(source, split: str, budget: int, count_tokens) -> SplitFigures:
    num_rows = source.num_rows(split)
    if hasattr(source, "row_groups"):
        ranges = sample_ranges(source.row_groups(split), budget)
    else:  # a saved dataset: contiguous chunks spread the same way
        chunk = max(1, min(budget, 1000))
        groups = [(s, min(s + chunk, num_rows)) for s in range(0, num_rows, chunk)]
        ranges = sample_ranges(groups, budget)
    figures = SplitFigures(split, num_rows, column_types(source, split))
    for start, stop in ranges:
        for row in source.rows(split, start, stop):
            seconds, samples = audio_length(row.audio_bytes)
            figures.rows.append(
                SampledRow(seconds, samples, row.text, row.source, count_tokens(row.text))
            )
    return figures


# --- shards (after the build) -------------------------------------------------------------------


def shard_splits(target: Path) -> list[Path]:
    """`target` itself when it is a split, else its subfolders that are."""
    if (target / MANIFEST_NAME).is_file():
        return [target]
    splits = sorted(p for p in target.iterdir() if (p / MANIFEST_NAME).is_file())
    if not splits:
        raise ContractError(
            f"{target} holds no {MANIFEST_NAME}, and no subfolder does: not a shard split "
            "(an unfinished build writes the manifest last)"
        )
    return splits


def read_shard_split(split_dir: Path, budget: int) -> SplitFigures:
    from shard_builder.reader import ShardReader

    manifest = load_manifest(split_dir)
    names = [shard["name"] for shard in manifest["shards"]]
    groups, offset = [], 0
    for shard in manifest["shards"]:
        groups.append((offset, offset + shard["num_samples"]))
        offset += shard["num_samples"]
    picked = {groups.index(r) for r in sample_ranges(groups, budget)}
    figures = SplitFigures(
        manifest["split"],
        manifest["num_samples"],
        {},
        notes={
            key: manifest[key]
            for key in ("num_input_rows", "num_rejected", "rejects_by_reason", "audio_hours")
        }
        | {"max_frames": max_frames_of(manifest), "num_split": manifest.get("num_split", 0)},
    )
    with ShardReader(split_dir, names) as reader:
        for shard in sorted(picked):
            for index in range(len(reader.index(shard))):
                # Every member of the first sample (for the types), then only the small ones.
                wanted = MEMBERS if not figures.columns else (META_MEMBER, TOKENS_MEMBER)
                _, data = reader.read(shard, index, wanted)
                meta = json.loads(data[META_MEMBER])
                if not figures.columns:
                    figures.columns = shard_columns(data, meta)
                duration = float(meta["duration"])
                figures.rows.append(
                    SampledRow(
                        duration,
                        round(duration * SAMPLING_RATE),
                        meta["text"],
                        meta["source"],
                        npy_shape(data[TOKENS_MEMBER])[0],
                    )
                )
    return figures


def npy_shape(data: bytes) -> tuple[int, ...]:
    from shard_builder.reader import npy_header_bytes, parse_npy_header

    return parse_npy_header(npy_header_bytes(io.BytesIO(data).read))[0]


def shard_columns(data: dict[str, bytes], meta: dict[str, Any]) -> dict[str, str]:
    """The members of a sample (arrays: dtype and shape, `n` for the axis that varies) and the
    fields of its json, with their types."""
    from shard_builder.reader import npy_array

    columns = {}
    for suffix in (MEL_MEMBER, TOKENS_MEMBER):
        array = npy_array(data[suffix])
        axes = [str(n) for n in array.shape[:-1]] + ["n"]
        columns[suffix] = f"{array.dtype} [{', '.join(axes)}]"
    for key, value in meta.items():
        columns[f"{META_MEMBER}.{key}"] = type(value).__name__
    return columns


# --- figures --------------------------------------------------------------------------------


def histogram(values: list[float], edges: list[float]) -> list[dict[str, Any]]:
    """Counts in [edges[i], edges[i+1]); the last bin takes everything from its left edge on."""
    counts = [0] * (len(edges) - 1)
    for value in values:
        for i in range(len(counts) - 1, -1, -1):
            if value >= edges[i]:
                counts[i] += 1
                break
    return [
        {"from": edges[i], "to": None if math.isinf(edges[i + 1]) else edges[i + 1], "count": n}
        for i, n in enumerate(counts)
    ]


def summary(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    ordered = sorted(values)
    return {
        "min": ordered[0],
        "median": ordered[len(ordered) // 2],
        "mean": sum(ordered) / len(ordered),
        "max": ordered[-1],
    }


def split_report(figures: SplitFigures, max_frames: int) -> dict[str, Any]:
    window = max_frames * HOP_LENGTH / SAMPLING_RATE
    durations = [r.duration for r in figures.rows if r.duration is not None]
    tokens = [r.tokens for r in figures.rows if r.tokens is not None]
    inspected = len(figures.rows)
    if "rejects_by_reason" in figures.notes:  # built: the builder counted its rejects exactly
        rejects = figures.notes["rejects_by_reason"]
        too_long = (
            rejects.get("too_long", 0)
            + rejects.get("too_long_unaligned", 0)
            + figures.notes.get("num_split", 0)
        )
        too_long_share = too_long / figures.notes["num_input_rows"]
    else:
        too_long = sum(
            1
            for r in figures.rows
            if r.num_samples is not None and exceeds_window(r.num_samples, max_frames)
        )
        too_long_share = too_long / inspected if inspected else 0.0
    width = next((w for w in BIN_WIDTHS if window / w <= DURATION_BINS), BIN_WIDTHS[-1])
    duration_edges = [*(i * width for i in range(math.ceil(window / width))), window, math.inf]
    return {
        "num_rows": figures.num_rows,
        "rows_inspected": inspected,
        "columns": figures.columns,
        "examples": [
            {"duration": r.duration, "text": r.text, "source": r.source}
            for r in figures.rows[:EXAMPLE_ROWS]
        ],
        "sources": dict(sorted(Counter(r.source for r in figures.rows).items(), key=_by_count)),
        "window_seconds": window,
        "duration_seconds": summary(durations),
        "duration_histogram": histogram(durations, duration_edges),
        "too_long": too_long,
        "too_long_share": too_long_share,
        "unreadable_audio": inspected - len(durations),
        "empty_audio": sum(1 for r in figures.rows if r.num_samples == 0),
        "tokens": summary(tokens),
        "token_histogram": histogram(tokens, [*TOKEN_EDGES, math.inf]) if tokens else [],
        "too_many_tokens": sum(1 for t in tokens if t > MAX_TARGET_POSITIONS),
        **({"manifest": figures.notes} if figures.notes else {}),
    }


def _by_count(item: tuple[Any, int]) -> tuple[int, str]:
    return -item[1], str(item[0])


# --- printing -------------------------------------------------------------------------------


def format_bins(bins: list[dict[str, Any]], unit: str, total: int) -> list[str]:
    peak = max((b["count"] for b in bins), default=0) or 1
    lines = []
    for b in bins:
        right = "..." if b["to"] is None else f"{b['to']:g}"
        label = f"{b['from']:g}-{right} {unit}"
        bar = "#" * round(BAR_WIDTH * b["count"] / peak)
        share = 100 * b["count"] / total if total else 0.0
        lines.append(f"    {label:>12s} |{bar:<{BAR_WIDTH}s} {b['count']:7d} ({share:5.1f} %)")
    return lines


def format_report(report: dict[str, Any]) -> str:
    lines = [f"{report['target']} ({report['kind']}), read in {report['seconds']:.1f} s"]
    for split, figures in report["splits"].items():
        inspected = figures["rows_inspected"]
        scope = "all" if inspected == figures["num_rows"] else "a sample"
        lines += ["", f"[{split}] {figures['num_rows']} rows; {inspected} inspected ({scope})"]
        lines.append("  columns:")
        lines += [f"    {name}: {kind}" for name, kind in figures["columns"].items()]
        lines.append("  rows:")
        for example in figures["examples"]:
            seconds = "?" if example["duration"] is None else f"{example['duration']:.2f} s"
            lines.append(f"    {seconds:>8s}  {example['source']}  {example['text']!r}")
        lines.append("  rows per source:")
        lines += [f"    {name}: {count}" for name, count in figures["sources"].items()]
        if figures["duration_seconds"]:
            d = figures["duration_seconds"]
            lines.append(
                f"  duration: min {d['min']:.2f} s, median {d['median']:.2f} s, mean "
                f"{d['mean']:.2f} s, max {d['max']:.2f} s"
            )
            lines += format_bins(figures["duration_histogram"], "s", inspected)
        lines.append(
            f"  longer than the model's {figures['window_seconds']:g} s window (split at pauses, "
            f"or rejected: --long-audio): {figures['too_long']} "
            f"({100 * figures['too_long_share']:.2f} %)"
        )
        if figures["unreadable_audio"] or figures["empty_audio"]:
            lines.append(
                f"  audio header unreadable: {figures['unreadable_audio']}, no audio frames: "
                f"{figures['empty_audio']} (the builder rejects both)"
            )
        if figures["tokens"]:
            t = figures["tokens"]
            lines.append(
                f"  target tokens (prefix and end token included): min {t['min']}, median "
                f"{t['median']}, max {t['max']}; over {MAX_TARGET_POSITIONS}: "
                f"{figures['too_many_tokens']}"
            )
            counted = sum(b["count"] for b in figures["token_histogram"])
            lines += format_bins(figures["token_histogram"], "tok", counted)
        if "manifest" in figures:
            m = figures["manifest"]
            reasons = ", ".join(f"{k} {v}" for k, v in m["rejects_by_reason"].items()) or "none"
            lines.append(
                f"  manifest: {m['num_input_rows']} input rows, {m['num_rejected']} rejected "
                f"({reasons}), {m['audio_hours']:.3f} h of audio"
            )
    return "\n".join(lines)


# --- entry point ----------------------------------------------------------------------------


def target_tokenizer(model: str, language: str, task: str):
    """count(text) -> target length, with the builder's TargetEncoder; None for what it rejects."""
    from transformers import AutoTokenizer  # the builder's choice (build.py says why)

    from shard_builder.audio import RejectedRow
    from shard_builder.tokens import TargetEncoder

    encoder = TargetEncoder(AutoTokenizer.from_pretrained(model), language, task)
    tokenizer = encoder.tokenizer

    def count(text: str | None) -> int | None:
        if text is None or not text.strip():
            return None
        try:
            return len(encoder(text))
        except RejectedRow:  # too many tokens for the decoder: count them all the same
            return len(tokenizer(text.strip()).input_ids)

    return count


def model_window(model: str) -> int:
    from transformers import WhisperFeatureExtractor

    from shard_builder.build import window_frames

    return window_frames(WhisperFeatureExtractor.from_pretrained(model))


def inspect(args: argparse.Namespace, source=None) -> dict[str, Any]:
    """The report of `args.target`; `source` replaces the dataset source opened from it (tests
    hand in a ParquetSource over another file system to follow the hub's code path)."""
    started = time.perf_counter()
    target = Path(args.target).expanduser()
    report: dict[str, Any] = {"target": args.target, "splits": {}}
    if source is None and target.is_dir() and _is_shards(target):
        report["kind"] = "shards"
        for split_dir in shard_splits(target):
            if args.splits and split_dir.name not in args.splits:
                continue  # the builder names each split's folder after it
            figures = read_shard_split(split_dir, args.sample_rows)
            report["splits"][figures.split] = split_report(figures, figures.notes["max_frames"])
    else:
        from shard_builder.source import Columns, open_source

        # The builder's own sources: a hub id is read through HfFileSystem, as it reads it.
        columns = Columns(args.audio_column, args.text_column, args.source_column)
        source = source or open_source(args.target, args.revision, columns)
        report["kind"] = source.identity.get("kind", "dataset")
        splits = args.splits or ["train", "test"]
        for split in splits:  # a missing split fails before the model is loaded
            source.num_rows(split)
        count_tokens = target_tokenizer(args.model, args.language, args.task)
        max_frames = model_window(args.model)
        for split in splits:
            figures = read_dataset_split(source, split, args.sample_rows, count_tokens)
            report["splits"][split] = split_report(figures, max_frames)
    report["seconds"] = time.perf_counter() - started
    return report


def _is_shards(target: Path) -> bool:
    return (target / MANIFEST_NAME).is_file() or any(
        (p / MANIFEST_NAME).is_file() for p in target.iterdir() if p.is_dir()
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from shard_builder.config import BuilderConfig

    defaults = BuilderConfig.__dataclass_fields__
    parser = argparse.ArgumentParser(
        prog="python -m shard_builder.inspect",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "target",
        help="hub dataset id, local parquet folder, save_to_disk folder, or a shard split "
        "(a folder with manifest.json, or the builder's output folder)",
    )
    parser.add_argument(
        "--splits", nargs="+", default=None, help="splits to read (default: train test)"
    )
    parser.add_argument(
        "--sample-rows",
        type=int,
        default=2000,
        help="rows to inspect per split, as whole row groups (or shards) spread over the split",
    )
    parser.add_argument(
        "--model",
        default=defaults["model"].default,
        help="Whisper model (hub id or folder) whose tokenizer counts the target tokens and whose "
        "window decides `too_long`, as in the builder (default: %(default)s)",
    )
    for name in ("revision", "language", "task", "audio_column", "text_column", "source_column"):
        spec = defaults[name]
        parser.add_argument(
            "--" + name.replace("_", "-"), default=spec.default, help=spec.metadata["help"]
        )
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    if args.sample_rows < 1:
        parser.error("--sample-rows must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    load_dotenv_file()  # HF_HOME and HF_TOKEN, as the builder reads them
    args = parse_args(argv)
    try:
        report = inspect(args)
    except (ContractError, FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # transformers cannot find the model, e.g. offline
        print(f"error: {error}\n(pass --model with a local Whisper folder)", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2, ensure_ascii=False) if args.json else format_report(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
