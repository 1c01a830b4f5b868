"""A CTranslate2 export decoded the way RealtimeSTT calls faster-whisper, with WER per mode.

The shards hold log-mel features, but faster-whisper takes audio: it computes its own
features, cuts long audio with its VAD and its 30 s windows, and runs its own beam search. So
these modes read each test sample's audio from the dataset the split was built from
(`--audio-source`): the sample key `{split}-{row id}` names the row, the manifest names the
split and columns, and every row's transcript must equal the shard's, else the folder given is
not the split's source and the evaluation stops.

RealtimeSTT 1.1.2 (`AudioToTextRecorder`) defaults: `batch_size=16`, `beam_size=5`,
`faster_whisper_vad_filter=True`, `suppress_tokens=[-1]`, no `initial_prompt`. With
`batch_size > 0` it wraps the model in faster-whisper's `BatchedInferencePipeline`, whose
`transcribe()` decodes without timestamps; with `batch_size=0` it calls
`WhisperModel.transcribe()`, which predicts timestamps. The modes:

| mode | call | timestamps | prompt |
|---|---|---|---|
| `batched` (RealtimeSTT's default) | `BatchedInferencePipeline`, batch 16 | no | none |
| `batched-prompt` | same | no | `initial_prompt` |
| `sequential` (`batch_size=0`) | `WhisperModel.transcribe()` | yes | none |
| `sequential-prompt` | same | yes | `initial_prompt` |

All four with VAD on and beam 5, the rest faster-whisper's defaults (temperature fallback,
previous text as prompt in long audio). The prompt is the reference transcript of the utterance
before (in stored order), the context a caller passing recent text would give; the first
utterance of the split gets none.

Each mode runs on single utterances and on long files: consecutive test utterances joined with
`gap_seconds` of silence into files of at least `long_seconds`
(trainer.decoding.longform.join_clips). WER (orthographic and normalised) for each, and for long
files decoded with timestamps how far the predicted segment starts lie from the true ones
(trainer.decoding.longform.match_starts; a single utterance has no true start to compare with
but its own leading silence).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from shard_builder import contract
from trainer.decoding.longform import SAMPLING_RATE, join_clips, match_starts, start_error_summary
from trainer.watch.metrics import wer_report

REALTIMESTT_BATCH_SIZE = 16
REALTIMESTT_BEAM_SIZE = 5
REALTIMESTT_SUPPRESS_TOKENS = [-1]


@dataclass(frozen=True)
class Mode:
    name: str
    batched: bool  # BatchedInferencePipeline (no timestamps) or WhisperModel.transcribe
    prompted: bool

    @property
    def timestamps(self) -> bool:
        return not self.batched


MODES = {
    mode.name: mode
    for mode in (
        Mode("batched", batched=True, prompted=False),
        Mode("batched-prompt", batched=True, prompted=True),
        Mode("sequential", batched=False, prompted=False),
        Mode("sequential-prompt", batched=False, prompted=True),
    )
}
DEFAULT_MODE = "batched"  # what RealtimeSTT does out of the box


def parse_modes(text: str) -> list[Mode]:
    """`all` or a comma-separated list of mode names."""
    if text.strip() == "all":
        return list(MODES.values())
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in MODES]
    if unknown or not names:
        choices = ", ".join(MODES)
        raise ValueError(f"unknown mode(s) {unknown or text!r}; choose from all, {choices}")
    return [MODES[name] for name in names]


@dataclass
class Clip:
    key: str
    text: str
    audio: np.ndarray  # float32, 16 kHz mono


@dataclass
class LongFile:
    audio: np.ndarray
    starts: list[float]  # true start of each utterance, seconds
    texts: list[str]
    prompt: str | None  # the reference of the utterance before the file's first


# --- audio of a split, from its source dataset ------------------------------------------------


def split_clips(split_dir: str | Path, audio_source: str, limit: int | None = None) -> list[Clip]:
    """The split's samples in stored order (the first `limit`), each with its audio decoded
    from `audio_source`, the dataset the split was built from (a local parquet or saved
    `datasets` folder, or the hub id; read at the revision the manifest pins)."""
    from shard_builder.audio import decode_audio
    from shard_builder.source import Columns, open_source
    from trainer.data.loader import iter_split_samples

    manifest = contract.load_manifest(split_dir)
    origin = manifest["source"]
    samples = []
    for sample in iter_split_samples(split_dir):
        if limit is not None and len(samples) >= limit:
            break
        samples.append((sample["key"], sample["text"]))
    if not samples:
        return []
    split = origin["split"]
    ids = [row_id_of(key, split) for key, _ in samples]
    source = open_source(audio_source, origin.get("revision"), Columns(**origin["columns"]))
    rows = {row.row_id: row for row in source.rows(split, min(ids), max(ids) + 1)}
    clips = []
    for (key, text), row_id in zip(samples, ids, strict=True):
        row = rows.get(row_id)
        if row is None or (row.text or "").strip() != text:
            found = "no such row" if row is None else f"{(row.text or '').strip()!r}"
            raise ValueError(
                f"--audio-source {audio_source}: row {row_id} of split {split!r} reads {found}, "
                f"but sample {key} of {split_dir} says {text!r}; give the dataset this split "
                f"was built from (its manifest names {origin.get('dataset')!r})"
            )
        clips.append(Clip(key, text, decode_audio(row.audio_bytes)))
    return clips


def row_id_of(key: str, split: str) -> int:
    prefix, _, number = key.rpartition("-")
    if prefix != split or not number.isdigit():
        raise ValueError(f"sample key {key!r} is not {split}-<row id>")
    return int(number)


def long_files(clips: list[Clip], long_seconds: float, gap_seconds: float) -> list[LongFile]:
    """Consecutive clips joined (gap_seconds of silence between) into files of at least
    `long_seconds`; the last file holds what is left, however short."""
    files, group, seconds, previous = [], [], 0.0, None
    for clip in clips:
        if not group:
            prompt = previous
        group.append(clip)
        seconds += clip.audio.size / SAMPLING_RATE + gap_seconds
        previous = clip.text
        if seconds >= long_seconds:
            files.append(_joined(group, gap_seconds, prompt))
            group, seconds = [], 0.0
    if group:
        files.append(_joined(group, gap_seconds, prompt))
    return files


def _joined(group: list[Clip], gap_seconds: float, prompt: str | None) -> LongFile:
    audio, starts = join_clips([c.audio for c in group], gap_seconds, SAMPLING_RATE)
    return LongFile(audio, starts, [c.text for c in group], prompt)


# --- decoding ---------------------------------------------------------------------------------


class RealtimeTranscriber:
    """One faster-whisper model of an export, called as RealtimeSTT calls it."""

    def __init__(
        self,
        folder: str | Path,
        device: str = "cpu",
        compute_type: str = "default",
        language: str = "de",
        task: str = "transcribe",
        max_new_tokens: int | None = None,
    ) -> None:
        from faster_whisper import BatchedInferencePipeline, WhisperModel

        self.model = WhisperModel(str(folder), device=device, compute_type=compute_type)
        self.pipeline = BatchedInferencePipeline(model=self.model)
        self.language, self.task, self.max_new_tokens = language, task, max_new_tokens

    def __call__(self, audio: np.ndarray, mode: Mode, prompt: str | None) -> list[dict[str, Any]]:
        """Segments (start, end, text) of one audio; starts are None without timestamps."""
        options = dict(
            language=self.language,
            task=self.task,
            beam_size=REALTIMESTT_BEAM_SIZE,
            initial_prompt=prompt if mode.prompted else None,
            suppress_tokens=list(REALTIMESTT_SUPPRESS_TOKENS),
            vad_filter=True,
            max_new_tokens=self.max_new_tokens,
        )
        if mode.batched:
            segments, _ = self.pipeline.transcribe(
                audio, batch_size=REALTIMESTT_BATCH_SIZE, **options
            )
        else:
            segments, _ = self.model.transcribe(audio, **options)
        return [
            {
                "start": round(s.start, 2) if mode.timestamps else None,
                "end": round(s.end, 2) if mode.timestamps else None,
                "text": s.text.strip(),
            }
            for s in segments
        ]


def evaluate_modes(
    transcriber: RealtimeTranscriber,
    clips: list[Clip],
    modes: Iterable[Mode],
    long_seconds: float = 45.0,
    gap_seconds: float = 0.7,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(report, details): per mode, figures on single utterances and on long files
    (`long_seconds` 0 = none); details hold every hypothesis and segment."""
    files = long_files(clips, long_seconds, gap_seconds) if long_seconds > 0 else []
    prompts = [None] + [c.text for c in clips[:-1]]
    report, details = {}, {}
    for mode in modes:
        started = time.perf_counter()
        utterances = [transcriber(c.audio, mode, p) for c, p in zip(clips, prompts, strict=True)]
        report[mode.name] = {
            "utterances": _figures(
                mode,
                [c.text for c in clips],
                utterances,
                None,
                sum(c.audio.size for c in clips),
                time.perf_counter() - started,
            )
        }
        details[mode.name] = {"utterances": utterances}
        if files:
            started = time.perf_counter()
            decoded = [transcriber(f.audio, mode, f.prompt) for f in files]
            report[mode.name]["long_form"] = _figures(
                mode,
                [" ".join(f.texts) for f in files],
                decoded,
                [f.starts for f in files],
                sum(f.audio.size for f in files),
                time.perf_counter() - started,
            )
            details[mode.name]["long_form"] = decoded
    return report, details


def _figures(
    mode: Mode,
    references: list[str],
    decoded: list[list[dict[str, Any]]],
    true_starts: list[list[float]] | None,
    samples: int,
    wall_seconds: float,
) -> dict[str, Any]:
    hypotheses = [" ".join(s["text"] for s in segments).strip() for segments in decoded]
    wer = wer_report(references, hypotheses, [mode.name] * len(references))
    seconds = samples / SAMPLING_RATE
    figures = {
        "items": len(references),
        "audio_seconds": seconds,
        "wer_normalised": wer["wer_normalised"],
        "wer_orthographic": wer["wer_orthographic"],
        "segments": sum(len(segments) for segments in decoded),
        "real_time_factor": wall_seconds / seconds if seconds else float("nan"),
    }
    if mode.timestamps and true_starts is not None:
        errors = [
            error
            for starts, segments in zip(true_starts, decoded, strict=True)
            for error in match_starts(starts, [s["start"] for s in segments])
        ]
        figures.update(start_error_summary(errors))
    return figures


def format_modes(report: dict[str, Any]) -> str:
    """One line per mode and input: WER and, with timestamps, the segment-start figures."""
    lines = ["faster-whisper as RealtimeSTT calls it (VAD on, beam 5):"]
    for name, parts in report.items():
        mode = MODES[name]
        call = (
            f"BatchedInferencePipeline batch {REALTIMESTT_BATCH_SIZE}, no timestamps"
            if mode.batched
            else "WhisperModel.transcribe, timestamps"
        )
        prompt = ", initial_prompt" if mode.prompted else ""
        default = "  (RealtimeSTT's default)" if name == DEFAULT_MODE else ""
        lines.append(f"  {name}: {call}{prompt}{default}")
        for kind, figures in parts.items():
            line = (
                f"    {kind:<10} {figures['items']:4d} x  WER normalised "
                f"{100 * figures['wer_normalised']:6.2f} %  orthographic "
                f"{100 * figures['wer_orthographic']:6.2f} %  RTF {figures['real_time_factor']:.3f}"
            )
            if "segment_start_error_median_s" in figures:
                line += (
                    f"  start error median {figures['segment_start_error_median_s']:.2f} s, "
                    f"within 0.5 s {100 * figures['segment_start_within_0_5s']:.0f} %"
                )
            lines.append(line)
    return "\n".join(lines)
