"""Plan shards by row index, build them in worker processes, and finish each split's manifest.

A shard is a pure function of its row range and the build settings, so shards can be built in
any order, by any number of processes or machines (`--part`), and a killed build resumes by
skipping the shards whose tar and record are both in place. The manifest is written last, once
every shard of the split is recorded.
"""

from __future__ import annotations

import errno
import json
import multiprocessing
import queue
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from shard_builder.align import Aligner, Unaligned, sentence_split, split_clip
from shard_builder.audio import RejectedRow, decode_audio
from shard_builder.config import BuilderConfig
from shard_builder.contract import (
    FORMAT_VERSION,
    HOP_LENGTH,
    MANIFEST_NAME,
    MAX_FRAMES,
    MEL_MEMBER,
    META_MEMBER,
    N_FFT,
    REJECTS_NAME,
    SAMPLING_RATE,
    TOKENS_MEMBER,
    exceeds_window,
    meta_bytes,
    npy_bytes,
    piece_of_key,
    sample_key,
    shard_name,
)
from shard_builder.features import LogMelExtractor
from shard_builder.source import Columns, Row, check_columns, open_source
from shard_builder.tokens import TargetEncoder
from shard_builder.writer import ShardWriter, atomic_write_bytes, atomic_write_json

RECORDS_DIR = ".build"  # per-shard records, merged into the manifest when the split is complete


@dataclass(frozen=True)
class ShardTask:
    split: str
    index: int
    start: int
    stop: int


class BuildError(RuntimeError):
    pass


# --- per-process state: each worker loads the model's tokenizer and mel filters once ----------

_worker: dict[str, Any] = {}


def init_worker(config: BuilderConfig, progress: Any = None) -> None:
    import torch
    from transformers import AutoTokenizer, WhisperFeatureExtractor

    torch.set_num_threads(1)  # one process per core scales; threads inside each do not
    feature_extractor = WhisperFeatureExtractor.from_pretrained(config.model)
    # Not WhisperTokenizer: in transformers 4.x that is the slow tokenizer, which needs the
    # vocab.json and merges.txt that folders saved by transformers 5 (and the tiny preset) lack.
    tokenizer = AutoTokenizer.from_pretrained(config.model)
    _worker.update(
        config=config,
        source=open_source(config.dataset, config.revision, columns_of(config)),
        extractor=LogMelExtractor(feature_extractor.mel_filters, window_frames(feature_extractor)),
        encoder=TargetEncoder(tokenizer, config.language, config.task),
        progress=progress,
    )


def window_frames(feature_extractor: Any) -> int:
    """The model's input window in frames: 3000 (30 s) for every released Whisper.

    Read from the processor rather than assumed, so a small model with a shorter window (the
    demo preset) gets features its encoder accepts and clips it cannot hear are rejected here.
    """
    frames = int(feature_extractor.nb_max_frames)
    if frames < 1 or frames > MAX_FRAMES or feature_extractor.hop_length != HOP_LENGTH:
        raise BuildError(
            f"unsupported feature extractor window: nb_max_frames={frames}, hop_length="
            f"{feature_extractor.hop_length} (Whisper uses at most {MAX_FRAMES} frames of "
            f"{HOP_LENGTH} samples)"
        )
    return frames


def columns_of(config: BuilderConfig) -> Columns:
    return Columns(config.audio_column, config.text_column, config.source_column)


def make_samples(row: Row, split: str) -> list[tuple[str, dict[str, bytes], float]]:
    """One input row to its sample (or, split at pauses, its pieces' samples), each as key,
    members and duration; or `RejectedRow` saying why not."""
    config: BuilderConfig = _worker["config"]
    try:
        tokens = _worker["encoder"](row.text)
    except RejectedRow as rejected:
        # a long clip's text may be too long for one decoder but not for its pieces
        if rejected.reason != "too_many_tokens" or config.long_audio != "split":
            raise
        tokens = rejected
    waveform = decode_audio(row.audio_bytes)
    duration = waveform.size / SAMPLING_RATE
    extractor = _worker["extractor"]
    if exceeds_window(waveform.size, extractor.max_frames):
        if config.long_audio == "split":
            return split_samples(row, split, waveform)
        raise RejectedRow(
            "too_long",
            f"{duration:.2f} s, the model's window is {extractor.max_samples / SAMPLING_RATE:g} s",
        )
    if isinstance(tokens, RejectedRow):
        raise tokens
    meta = {"id": row.row_id, "text": row.text.strip()}
    return [(sample_key(split, row.row_id), sample_members(row, waveform, tokens, meta), duration)]


def sample_members(row: Row, waveform, tokens, meta: dict[str, Any]) -> dict[str, bytes]:
    mel = _worker["extractor"](waveform)
    meta = {
        **meta,
        "source": row.source,
        "duration": round(waveform.size / SAMPLING_RATE, 4),
        "pad_value": mel.pad_value,
        "audio_path": row.audio_path,
    }
    return {
        MEL_MEMBER: npy_bytes(mel.features),
        TOKENS_MEMBER: npy_bytes(tokens),
        META_MEMBER: meta_bytes(meta),
    }


def split_samples(row: Row, split: str, waveform) -> list[tuple[str, dict[str, bytes], float]]:
    """A clip longer than the window, cut at pauses into pieces with their own text (align.py);
    rejected as `too_long_unaligned` when the cut is not confident."""
    config: BuilderConfig = _worker["config"]
    max_samples = _worker["extractor"].max_samples
    try:
        if config.align_method == "sentences":
            pieces = sentence_split(
                waveform, row.text, max_samples, config.min_pause, config.align_max_error
            )
        else:
            pieces = split_clip(
                waveform,
                row.text,
                aligner(),
                max_samples,
                config.min_pause,
                config.align_min_margin,
                config.align_min_logprob,
            )
    except Unaligned as unaligned:
        raise RejectedRow(
            "too_long_unaligned", f"{waveform.size / SAMPLING_RATE:.2f} s: {unaligned}"
        ) from None
    samples = []
    for index, piece in enumerate(pieces):
        audio = waveform[piece.start : piece.stop]
        meta = {
            "id": row.row_id,
            "text": piece.text,
            "piece": index,
            "num_pieces": len(pieces),
            "offset": round(piece.start / SAMPLING_RATE, 4),
        }
        members = sample_members(row, audio, _worker["encoder"](piece.text), meta)
        samples.append((sample_key(split, row.row_id, index), members, audio.size / SAMPLING_RATE))
    return samples


def aligner() -> Aligner:
    """The worker's aligner, loaded the first time a long clip needs it."""
    if "aligner" not in _worker:
        config: BuilderConfig = _worker["config"]
        _worker["aligner"] = Aligner(config.aligner_name, config.language, config.task)
    return _worker["aligner"]


def check_aligner_window(config: BuilderConfig) -> None:
    """Before any work: the aligner must hear a whole piece, i.e. at least the model's window."""
    from transformers import WhisperFeatureExtractor

    if config.long_audio != "split" or config.align_method == "sentences":
        return  # no aligner model is loaded
    heard = window_frames(WhisperFeatureExtractor.from_pretrained(config.aligner_name))
    if heard < _worker["extractor"].max_frames:
        raise BuildError(
            f"--align-model {config.aligner_name} hears {heard / 100:g} s, less than the "
            f"{_worker['extractor'].max_frames / 100:g} s window of --model {config.model}: "
            "the pieces would not fit the aligner (name another --align-model, or "
            "--long-audio reject)"
        )


def build_shard(task: ShardTask) -> dict[str, Any]:
    """Write one shard and then its record; returns the record."""
    config: BuilderConfig = _worker["config"]
    split_dir = Path(config.out) / task.split
    writer = ShardWriter(split_dir / shard_name(task.index))
    rejects, seconds, rows_read, split_rows, split_pieces = [], 0.0, 0, 0, 0
    try:
        for row in _worker["source"].rows(task.split, task.start, task.stop):
            rows_read += 1
            try:
                samples = make_samples(row, task.split)
            except RejectedRow as rejected:
                rejects.append(
                    {
                        "id": row.row_id,
                        "reason": rejected.reason,
                        "detail": rejected.detail,
                        "source": row.source,
                        "audio_path": row.audio_path,
                    }
                )
            else:
                for key, members, duration in samples:
                    writer.add(key, members)
                    seconds += duration
                if piece_of_key(samples[0][0]) is not None:
                    split_rows, split_pieces = split_rows + 1, split_pieces + len(samples)
            report_progress(1)
        if rows_read != task.stop - task.start:
            raise BuildError(f"{task.split} rows {task.start}..{task.stop}: read {rows_read} rows")
        entry = writer.close()
    except BaseException:
        writer.abort()
        raise
    record = {
        **entry,
        "split": task.split,
        "start": task.start,
        "stop": task.stop,
        "audio_seconds": round(seconds, 4),
        "num_split": split_rows,
        "num_split_pieces": split_pieces,
        "rejects": rejects,
        "settings": settings_fingerprint(config, task.split),
    }
    atomic_write_json(split_dir / RECORDS_DIR / f"{entry['name']}.json", record)
    return record


def report_progress(rows: int) -> None:
    progress = _worker.get("progress")
    if progress is not None:
        progress(rows) if callable(progress) else progress.put(rows)


# --- planning -------------------------------------------------------------------------------


def settings_fingerprint(config: BuilderConfig, split: str) -> dict[str, Any]:
    """What makes a shard's bytes: a shard built under other settings must not be reused."""
    return {
        "format_version": FORMAT_VERSION,
        "source": _worker["source"].identity,
        "split": split,
        "tokenizer": _worker["encoder"].identity()["fingerprint"],
        "n_mels": _worker["extractor"].n_mels,
        "max_frames": _worker["extractor"].max_frames,
        "language": config.language,
        "task": config.task,
        "shard_size": config.shard_size,
        "limit": config.limit,
        "columns": asdict(columns_of(config)),
        # absent when long clips are rejected, so such shards keep their earlier settings
        **({"long_audio": long_audio_settings(config)} if config.long_audio == "split" else {}),
    }


def long_audio_settings(config: BuilderConfig) -> dict[str, Any]:
    if config.align_method == "sentences":
        return {
            "align_method": "sentences",
            "min_pause": config.min_pause,
            "align_max_error": config.align_max_error,
        }
    return {
        "align_model": config.aligner_name,
        "min_pause": config.min_pause,
        "align_min_margin": config.align_min_margin,
        "align_min_logprob": config.align_min_logprob,
    }


def plan_split(split: str, num_rows: int, shard_size: int) -> list[ShardTask]:
    return [
        ShardTask(split, i, start, min(start + shard_size, num_rows))
        for i, start in enumerate(range(0, num_rows, shard_size))
    ]


def read_record(split_dir: Path, task: ShardTask) -> dict[str, Any] | None:
    """The record of a finished shard, or None when the shard must be (re)built."""
    record_path = split_dir / RECORDS_DIR / f"{shard_name(task.index)}.json"
    shard_path = split_dir / shard_name(task.index)
    if not record_path.is_file() or not shard_path.is_file():
        return None
    record = json.loads(record_path.read_text())
    if record["bytes"] != shard_path.stat().st_size:
        return None
    return record


def remove_stale_temporaries(split_dir: Path, config: BuilderConfig) -> None:
    """Delete what killed runs left behind; with --part, only this part's own leftovers, since
    other machines sharing the folder may be writing theirs right now."""
    for stale in [*split_dir.glob(".shard-*.tmp-*"), *split_dir.glob(f"{RECORDS_DIR}/.*.tmp-*")]:
        if shard_index(stale.name.lstrip(".")) % config.part_count == config.part_index:
            stale.unlink(missing_ok=True)
    if config.part_count == 1:
        for name in (MANIFEST_NAME, REJECTS_NAME):
            for stale in split_dir.glob(f".{name}.tmp-*"):
                stale.unlink(missing_ok=True)


# --- the build ------------------------------------------------------------------------------


def build(config: BuilderConfig) -> dict[str, dict[str, Any]]:
    """Build every requested split; returns per-split summaries."""
    started = time.perf_counter()
    init_worker(config)  # the main process validates the source and model before any work
    check_aligner_window(config)
    source = _worker["source"]
    tasks, total_rows, records = [], {}, {}
    for split in config.splits:
        check_columns(source.column_names(split), columns_of(config), f"{config.dataset}[{split}]")
        rows = source.num_rows(split)
        total_rows[split] = min(rows, config.limit) if config.limit else rows
        split_dir = Path(config.out) / split
        (split_dir / RECORDS_DIR).mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(split_dir, config)
        records[split] = {}
        for task in plan_split(split, total_rows[split], config.shard_size):
            record = read_record(split_dir, task)
            if record is not None:
                if record["settings"] != settings_fingerprint(config, split):
                    raise BuildError(
                        f"{split_dir} holds shards built with other settings "
                        f"({record['settings']}); use a new --out folder"
                    )
                records[split][task.index] = record
            elif task.index % config.part_count == config.part_index:
                tasks.append(task)
    skipped = sum(len(r) for r in records.values())
    if skipped:
        print(f"resuming: {skipped} complete shard(s) kept, {len(tasks)} to build")
    for record in run_tasks(config, tasks):
        records[record["split"]][shard_index(record["name"])] = record
    summaries = {}
    for split in config.splits:
        plan = plan_split(split, total_rows[split], config.shard_size)
        summaries[split] = finish_split(config, split, plan, records[split], total_rows[split])
    print_summary(summaries, time.perf_counter() - started, sum(t.stop - t.start for t in tasks))
    return summaries


def shard_index(name: str) -> int:
    return int(name.split("-")[1].split(".")[0])


def run_tasks(config: BuilderConfig, tasks: list[ShardTask]):
    rows = sum(task.stop - task.start for task in tasks)
    bar = tqdm(total=rows, unit="ex", desc="building shards", smoothing=0.05, dynamic_ncols=True)
    try:
        if config.workers <= 1:
            _worker["progress"] = bar.update
            for task in tasks:
                yield guard_disk_full(build_shard, task, config)
            return
        context = multiprocessing.get_context("spawn")  # no forked torch thread pools
        progress = context.Queue()
        listener = threading.Thread(target=drain_progress, args=(progress, bar), daemon=True)
        listener.start()
        with context.Pool(config.workers, init_worker, (config, progress)) as pool:
            yield from pool.imap_unordered(_guarded_build_shard, tasks)
        progress.put(None)
        listener.join()
    finally:
        bar.close()


def _guarded_build_shard(task: ShardTask) -> dict[str, Any]:
    return guard_disk_full(build_shard, task, _worker["config"])


def guard_disk_full(function, task: ShardTask, config: BuilderConfig):
    try:
        return function(task)
    except OSError as error:
        if error.errno == errno.ENOSPC:
            raise BuildError(
                f"disk full while writing {task.split}/{shard_name(task.index)} under "
                f"{config.out}: no partial shard was left; free space and run the same command "
                "again, finished shards are kept"
            ) from None
        raise


def drain_progress(progress: Any, bar: tqdm) -> None:
    while True:
        try:
            rows = progress.get(timeout=0.5)
        except queue.Empty:
            continue
        if rows is None:
            return
        bar.update(rows)


def finish_split(
    config: BuilderConfig,
    split: str,
    plan: list[ShardTask],
    records: dict[int, dict[str, Any]],
    num_rows: int,
) -> dict[str, Any]:
    split_dir = Path(config.out) / split
    missing = [task.index for task in plan if task.index not in records]
    if missing:
        print(
            f"{split}: {len(plan) - len(missing)}/{len(plan)} shards done; the manifest is "
            "written once every part has finished (run again without --part to finish it)"
        )
        return {"complete": False, "num_input_rows": num_rows}
    ordered = [records[task.index] for task in plan]
    rejects = [{"split": split, **reject} for record in ordered for reject in record["rejects"]]
    num_samples = sum(record["num_samples"] for record in ordered)
    split_rows = sum(record.get("num_split", 0) for record in ordered)
    split_pieces = sum(record.get("num_split_pieces", 0) for record in ordered)
    if num_samples - split_pieces + split_rows + len(rejects) != num_rows:
        raise BuildError(
            f"{split}: {num_samples} samples ({split_pieces} pieces of {split_rows} split rows) "
            f"+ {len(rejects)} rejects do not account for {num_rows} rows"
        )
    reject_lines = "".join(
        json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rejects
    )
    try:
        atomic_write_bytes(split_dir / REJECTS_NAME, reject_lines.encode())
        manifest = make_manifest(config, split, ordered, rejects, num_rows)
        atomic_write_json(split_dir / MANIFEST_NAME, manifest)  # last: its presence means complete
    except OSError as error:
        if error.errno != errno.ENOSPC:
            raise
        raise BuildError(
            f"disk full while writing {split}/{MANIFEST_NAME} under {config.out}: every shard is "
            "complete and kept; free space and run the same command again"
        ) from None
    return {
        "complete": True,
        **{
            k: manifest[k]
            for k in (
                "num_input_rows",
                "num_samples",
                "num_split",
                "num_split_pieces",
                "num_rejected",
                "rejects_by_reason",
                "audio_hours",
            )
        },
        "bytes": sum(record["bytes"] for record in ordered),
        "num_shards": len(ordered),
    }


def make_manifest(config, split, records, rejects, num_rows) -> dict[str, Any]:
    encoder: TargetEncoder = _worker["encoder"]
    return {
        "format_version": FORMAT_VERSION,
        "split": split,
        "num_input_rows": num_rows,
        "num_samples": sum(record["num_samples"] for record in records),
        # rows split at pauses into several samples: num_samples - num_split_pieces + num_split
        # + num_rejected == num_input_rows
        "num_split": sum(record.get("num_split", 0) for record in records),
        "num_split_pieces": sum(record.get("num_split_pieces", 0) for record in records),
        "num_rejected": len(rejects),
        "rejects_by_reason": dict(sorted(Counter(r["reason"] for r in rejects).items())),
        "audio_hours": round(sum(record["audio_seconds"] for record in records) / 3600, 6),
        "features": {
            "n_mels": _worker["extractor"].n_mels,
            "sampling_rate": SAMPLING_RATE,
            "n_fft": N_FFT,
            "hop_length": HOP_LENGTH,
            "dtype": "float16",
            "max_frames": _worker["extractor"].max_frames,
        },
        "tokenizer": {**encoder.identity(), "language": config.language, "task": config.task},
        "prefix_tokens": encoder.prefix_tokens,
        "model": config.model,
        "source": {
            **_worker["source"].identity,
            "split": split,
            "limit": config.limit,
            "columns": asdict(columns_of(config)),
        },
        "shard_size": config.shard_size,
        "long_audio": config.long_audio,
        **(
            {"long_audio_settings": long_audio_settings(config)}
            if config.long_audio == "split"
            else {}
        ),
        "shards": [
            {key: record[key] for key in ("name", "num_samples", "bytes", "sha256")}
            for record in records
        ],
    }


def print_summary(summaries: dict[str, dict[str, Any]], seconds: float, rows_built: int) -> None:
    print(
        f"\nshard build summary ({seconds:.1f} s, {rows_built / max(seconds, 1e-9):.1f} rows/s "
        f"over {rows_built} rows built this run)"
    )
    for split, summary in summaries.items():
        if not summary["complete"]:
            print(f"  {split}: incomplete (other parts still to build)")
            continue
        reasons = ", ".join(f"{k} {v}" for k, v in summary["rejects_by_reason"].items()) or "none"
        print(
            f"  {split}: {summary['num_input_rows']} rows in, {summary['num_samples']} samples "
            f"in {summary['num_shards']} shards ({summary['num_split']} long rows split into "
            f"{summary['num_split_pieces']}), {summary['num_rejected']} rejected ({reasons}), "
            f"{summary['bytes'] / 1e6:.1f} MB, {summary['audio_hours']:.3f} h of audio"
        )
