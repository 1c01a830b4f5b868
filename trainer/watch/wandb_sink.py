"""Weights & Biases as a third sink beside TensorBoard and metrics.jsonl (rank 0 only).

Optional (`log.wandb`, the `wandb` extra). The W&B run gets the resolved configuration, every
scalar RunLogger writes (under the same `kind/name` keys as TensorBoard), each evaluation's
worst hypotheses as a table, and the trainer's warnings as W&B alerts, so a run can be watched
from a phone. Project, entity and run name come from the config, else from WANDB_PROJECT,
WANDB_ENTITY and WANDB_NAME (read by wandb itself); WANDB_MODE=offline writes the run under
RUN/wandb/ only, for `wandb sync` later.

A resumed training run continues the same W&B run: its id is kept in RUN/wandb-run-id. The
trainer's step is logged as the metric `step` and every chart is drawn against it rather than
against W&B's own counter: after a resume the trainer repeats the steps since the last
checkpoint, which W&B would drop as going backwards if they were its own step.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from pathlib import Path
from typing import Any

RUN_ID_FILE = "wandb-run-id"
DEFAULT_PROJECT = "whisper-german-trainer"


class WandbSink:
    def __init__(self, run_dir: Path, config, run_config: dict[str, Any]) -> None:
        """`config` is the LogConfig; `run_config` the resolved TrainConfig as a dict."""
        try:
            import wandb
        except ImportError:
            raise ValueError(
                "log.wandb is on but wandb is not installed: pip install -e '.[wandb]' "
                "(or turn it off with --wandb false)"
            ) from None
        self.wandb = wandb
        run_id = read_run_id(run_dir) or os.environ.get("WANDB_RUN_ID") or uuid.uuid4().hex[:12]
        try:
            self.run = wandb.init(
                project=config.wandb_project or os.environ.get("WANDB_PROJECT") or DEFAULT_PROJECT,
                entity=config.wandb_entity or None,
                name=config.wandb_name or os.environ.get("WANDB_NAME") or run_dir.name,
                id=run_id,
                resume="allow",  # the same id continues the run, a new one starts it
                dir=os.environ.get("WANDB_DIR") or str(run_dir),
                config=run_config,
                allow_val_change=True,  # a resume may change settings (max_steps, ...)
            )
        except Exception as error:  # no API key, no network, a bad entity, ...
            raise ValueError(
                f"W&B could not start: {error}. Log in (`wandb login` or WANDB_API_KEY), set "
                "WANDB_MODE=offline to write the run locally, or turn it off with --wandb false"
            ) from error
        write_run_id(run_dir, self.run.id)
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")

    def scalars(self, step: int, values: dict[str, float]) -> None:
        self.run.log({"step": step, **values})

    def table(self, step: int, name: str, rows: list[dict[str, Any]]) -> None:
        if not rows:
            return
        columns = list(rows[0])
        data = [[row[c] for c in columns] for row in rows]
        self.run.log({"step": step, name: self.wandb.Table(columns=columns, data=data)})

    def alert(self, text: str) -> None:
        # An alert that cannot be sent must not stop training.
        with contextlib.suppress(Exception):
            self.run.alert(title="whisper-german-trainer", text=text[:1000])

    def close(self) -> None:
        self.run.finish()


def read_run_id(run_dir: Path) -> str | None:
    path = run_dir / RUN_ID_FILE
    return path.read_text().strip() or None if path.exists() else None


def write_run_id(run_dir: Path, run_id: str) -> None:
    temporary = run_dir / f".{RUN_ID_FILE}.tmp"
    temporary.write_text(run_id + "\n")
    os.replace(temporary, run_dir / RUN_ID_FILE)
