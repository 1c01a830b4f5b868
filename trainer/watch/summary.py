"""The run's figures at a glance, as the original project left them in its log folder:

    RUN/best_wer.txt   one line: the best figure, its metric and its step
    RUN/metrics.json   the latest and the best evaluation in one file

Both are rewritten at every evaluation, each through a temporary file and a rename, so a reader
(a phone polling the folder, a script) never sees half a file. The best evaluation's figures are
read back from RUN/eval/step-N.json, which every evaluation writes, so a resumed run keeps them
without a state of its own.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

BEST_FILE = "best_wer.txt"
METRICS_FILE = "metrics.json"
# What an evaluation's file holds besides the figures: large, and not what a glance wants.
BULK = ("utterances", "packed")


def figures(report: dict[str, Any], step: int) -> dict[str, Any]:
    return {"step": step, **{k: v for k, v in report.items() if k not in BULK}}


def evaluation_file(run_dir: Path, step: int) -> Path:
    return run_dir / "eval" / f"step-{step}.json"


def write_summary(
    run_dir: Path,
    step: int,
    report: dict[str, Any],
    metric: str,
    best_value: float | None,
    best_step: int,
) -> None:
    """Rewrite RUN/metrics.json and (once there is a best step) RUN/best_wer.txt."""
    best = None
    if best_step == step:
        best = figures(report, step)
    elif best_step >= 0 and evaluation_file(run_dir, best_step).exists():
        best = figures(json.loads(evaluation_file(run_dir, best_step).read_text()), best_step)
    summary = {
        "best_metric": metric,
        "normaliser": report.get("normaliser"),
        "latest": figures(report, step),
        "best": best,
    }
    _write_atomically(run_dir / METRICS_FILE, json.dumps(summary, indent=1, ensure_ascii=False))
    if best_value is not None and best_step >= 0:
        line = f"{100 * best_value:.2f} % {metric} at step {best_step}\n"
        _write_atomically(run_dir / BEST_FILE, line)


def _write_atomically(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text + ("" if text.endswith("\n") else "\n"), encoding="utf-8")
    os.replace(temporary, path)
