"""Metrics: WER/CER (pure functions) and where training metrics go (rank 0 only).

A WER means nothing without its normaliser (docs/design.md: the same model scored 4.77 % and
2.63 % under two normalisations), so every report carries both the orthographic WER (text as
written, only surrounding whitespace trimmed) and the normalised one, and names the normaliser.
jiwer is imported inside the functions: the GPU machines that train do not all have it.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

NORMALISER = (
    "transformers BasicTextNormalizer (lower case, punctuation and symbols to spaces, "
    "whitespace collapsed; umlauts and ß kept)"
)


def _help(text: str, **kwargs: Any):
    return field(metadata={"help": text}, **kwargs)


@dataclass
class LogConfig:
    log_every: int = _help("log training metrics every N optimiser steps", default=25)
    tensorboard: bool = _help("write TensorBoard events to RUN/tensorboard", default=True)
    progress: bool = _help("show a tqdm progress bar on rank 0", default=True)
    sample_log: bool = _help(
        "debug: write the sample keys of every step to RUN/debug/samples-rank<R>.jsonl",
        default=False,
    )
    wandb: bool = _help(
        "also log to Weights & Biases (the wandb extra); WANDB_MODE=offline writes RUN/wandb/ only",
        default=False,
    )
    wandb_project: str = _help(
        "W&B project (default: $WANDB_PROJECT, else whisper-german-trainer)", default=""
    )
    wandb_entity: str = _help("W&B user or team (default: $WANDB_ENTITY, else yours)", default="")
    wandb_name: str = _help(
        "W&B run name (default: $WANDB_NAME, else the run folder's name)", default=""
    )
    wandb_worst: int = _help(
        "log the N worst hypotheses of each evaluation to W&B as a table (0: none)", default=20
    )


# --- WER and CER ------------------------------------------------------------------------------


def normalise(text: str) -> str:
    from transformers.models.whisper.english_normalizer import BasicTextNormalizer

    return " ".join(BasicTextNormalizer()(text).split())


def _rates(references: list[str], hypotheses: list[str]) -> dict[str, float | int]:
    import jiwer

    if not references:
        return {"wer": float("nan"), "cer": float("nan"), "words": 0}
    words = jiwer.process_words(references, hypotheses)
    errors = words.substitutions + words.deletions + words.insertions
    total = words.substitutions + words.deletions + words.hits
    return {
        "wer": errors / total,
        "cer": jiwer.cer(references, hypotheses),
        "words": total,
    }


def wer_report(references: list[str], hypotheses: list[str], sources: list[str]) -> dict[str, Any]:
    """Orthographic and normalised WER, CER, per source; references that normalise to empty
    are dropped from the normalised figures and counted."""
    if not len(references) == len(hypotheses) == len(sources):
        raise ValueError("references, hypotheses and sources differ in length")
    ortho_refs = [r.strip() for r in references]
    ortho_hyps = [h.strip() for h in hypotheses]
    norm_refs = [normalise(r) for r in references]
    norm_hyps = [normalise(h) for h in hypotheses]

    def figures(indices: list[int]) -> dict[str, Any]:
        ortho = [i for i in indices if ortho_refs[i]]
        norm = [i for i in indices if norm_refs[i]]
        o = _rates([ortho_refs[i] for i in ortho], [ortho_hyps[i] for i in ortho])
        n = _rates([norm_refs[i] for i in norm], [norm_hyps[i] for i in norm])
        return {
            "num_utterances": len(indices),
            "wer_orthographic": o["wer"],
            "wer_normalised": n["wer"],
            "cer_orthographic": o["cer"],
            "cer_normalised": n["cer"],
            "reference_words_normalised": n["words"],
            "dropped_empty_after_normalisation": len(indices) - len(norm),
        }

    report = {"normaliser": NORMALISER, **figures(list(range(len(references))))}
    by_source: dict[str, list[int]] = defaultdict(list)
    for i, source in enumerate(sources):
        by_source[source].append(i)
    report["per_source"] = {name: figures(idx) for name, idx in sorted(by_source.items())}
    return report


def utterance_wer(reference: str, hypothesis: str) -> float:
    import jiwer

    reference, hypothesis = normalise(reference), normalise(hypothesis)
    if not reference:
        return float("nan")
    return jiwer.wer(reference, hypothesis)


def format_report(report: dict[str, Any]) -> str:
    def pct(value: float) -> str:
        return f"{100 * value:6.2f} %"

    lines = [
        f"utterances: {report['num_utterances']}"
        + (
            f"   audio: {report['audio_seconds']:.1f} s   real-time factor: "
            f"{report['real_time_factor']:.4f}"
            if "real_time_factor" in report
            else ""
        ),
        f"WER orthographic (as written):     {pct(report['wer_orthographic'])}",
        f"WER normalised:                    {pct(report['wer_normalised'])}",
        f"CER orthographic / normalised:     {pct(report['cer_orthographic'])} / "
        f"{pct(report['cer_normalised'])}",
        f"normaliser: {report['normaliser']}",
        f"references empty after normalising (dropped): "
        f"{report['dropped_empty_after_normalisation']}",
    ]
    if "packed_wer_normalised" in report:
        lines += [
            f"packed windows: {report['packed_windows']} ({report['packed_utterances']} "
            f"utterances, {report['packed_gap_seconds']:g} s silence between, timestamps on, "
            "no prompt)",
            f"packed WER orthographic / normalised: {pct(report['packed_wer_orthographic'])} / "
            f"{pct(report['packed_wer_normalised'])}",
            f"segment starts: median error {report['segment_start_error_median_s']:.2f} s, "
            f"within 0.5 s {pct(report['segment_start_within_0_5s'])}, missed "
            f"{pct(report['segment_start_missed'])}, predicted segments per utterance "
            f"{report['packed_segments_per_utterance']:.2f}",
        ]
    if report.get("per_source"):
        lines.append(f"{'source':32s} {'utts':>6s} {'WER orth':>10s} {'WER norm':>10s}")
        for name, figures in report["per_source"].items():
            lines.append(
                f"{name:32s} {figures['num_utterances']:6d} "
                f"{pct(figures['wer_orthographic']):>10s} {pct(figures['wer_normalised']):>10s}"
            )
    return "\n".join(lines)


# --- where training metrics go ----------------------------------------------------------------


class RunLogger:
    """Rank-0 side effects in one place: training.log, metrics.jsonl, TensorBoard, W&B (with
    log.wandb), and the run's summary files (trainer/watch/summary.py).

    On other ranks every method is a no-op except warnings, which go to stderr with the rank.
    """

    def __init__(
        self,
        run_dir: Path,
        rank: int,
        config: LogConfig,
        run_config: dict[str, Any] | None = None,
    ) -> None:
        self.rank, self.is_main = rank, rank == 0
        self.run_dir, self.config = run_dir, config
        self.logger = logging.getLogger("trainer")
        self.logger.setLevel(logging.INFO)
        self.logger.propagate = False
        self.logger.handlers.clear()
        stream = logging.StreamHandler(sys.stderr)
        stream.setFormatter(logging.Formatter(f"[rank {rank}] %(levelname)s %(message)s"))
        stream.setLevel(logging.INFO if self.is_main else logging.WARNING)
        self.logger.addHandler(stream)
        # Per-step lines go to training.log only while the progress bar owns the terminal.
        self.file_logger = logging.getLogger("trainer.file")
        self.file_logger.setLevel(logging.INFO)
        self.file_logger.propagate = False
        self.file_logger.handlers.clear()
        self.writer = None
        self.jsonl = None
        self.wandb = None
        if self.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            handler = logging.FileHandler(run_dir / "training.log")
            handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
            self.logger.addHandler(handler)
            self.file_logger.addHandler(handler)
            self.jsonl = open(run_dir / "metrics.jsonl", "a", buffering=1)
            if config.tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(run_dir / "tensorboard"))
            if config.wandb:
                from trainer.watch.wandb_sink import WandbSink

                self.wandb = WandbSink(run_dir, config, run_config or {})

    def info(self, message: str, *args: Any) -> None:
        self.logger.info(message, *args)

    def warning(self, message: str, *args: Any) -> None:
        self.logger.warning(message, *args)
        if self.wandb is not None:
            self.wandb.alert(message % args if args else message)

    def step_line(self, message: str, *args: Any, console: bool) -> None:
        """A per-step line: always in training.log, on the terminal only when asked."""
        (self.logger if console else self.file_logger).info(message, *args)

    def scalars(self, step: int, values: dict[str, float], kind: str = "train") -> None:
        if not self.is_main:
            return
        if self.writer is not None:
            for name, value in values.items():
                if value is not None:
                    self.writer.add_scalar(f"{kind}/{name}", value, step)
        if self.wandb is not None:
            self.wandb.scalars(step, {f"{kind}/{k}": v for k, v in values.items() if v is not None})
        self.jsonl.write(json.dumps({"kind": kind, "step": step, **values}) + "\n")

    def evaluation(
        self,
        step: int,
        report: dict[str, Any] | None,
        utterances: list[dict[str, Any]],
        metric: str,
        best_value: float | None,
        best_step: int,
    ) -> None:
        """After an evaluation (rank 0 holds the report): the summary files, W&B's table."""
        if not self.is_main or report is None:
            return
        from trainer.watch.summary import write_summary

        write_summary(self.run_dir, step, report, metric, best_value, best_step)
        if self.wandb is not None and self.config.wandb_worst > 0:
            self.wandb.table(
                step, "eval/worst_hypotheses", worst(utterances, self.config.wandb_worst)
            )

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.jsonl is not None:
            self.jsonl.close()
        if self.wandb is not None:
            self.wandb.close()
        for handler in list(self.logger.handlers):
            handler.close()
            self.logger.removeHandler(handler)
        for handler in list(self.file_logger.handlers):
            self.file_logger.removeHandler(handler)


def worst(utterances: list[dict[str, Any]], count: int) -> list[dict[str, Any]]:
    """The `count` utterances with the highest normalised WER (empty references last)."""
    scored = [(utterance_wer(u["reference"], u["hypothesis"]), u) for u in utterances]
    scored.sort(key=lambda pair: -1.0 if math.isnan(pair[0]) else -pair[0])
    return [
        {
            "wer_normalised": wer,
            "key": u["key"],
            "source": u["source"],
            "reference": u["reference"],
            "hypothesis": u["hypothesis"],
        }
        for wer, u in scored[:count]
    ]
