"""The model card (README.md) published beside the weights, built from what the run folder holds.

Its YAML metadata is what the hub indexes: language, licence, base model, datasets, pipeline tag
and a `model-index` with the WER per source and overall, orthographic and normalised, the
normaliser named in each metric's arguments (a WER means nothing without it: docs/design.md).
The body repeats the WER table, says how the model was trained (the run's resolved
configuration, steps, samples, time) and how to use it from transformers, faster-whisper and
RealtimeSTT. Metadata goes through huggingface_hub's `ModelCardData` / `EvalResult` (its
`metadata_eval_result` builds the same `model-index` for a single figure; here are 2 per source),
and the finished card is parsed back with `ModelCard` and compared before anyone uploads it.

Sources, all optional but the model folder itself:
    RUN/config.json                the resolved training configuration (trainer.config)
    RUN/checkpoints/step-N/state.json  steps, samples, tokens, ranks (trainer.runtime.checkpoint)
    RUN/training.log               how long each session ran ("done: ... in N s")
    RUN/eval/step-B.json           the evaluation of RUN/best during training (B = best step),
                                   unless an evaluation report (trainer.evaluate --output) is given
    SHARDS/<split>/manifest.json   which dataset (and commit) the shards were built from
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from trainer.watch.metrics import NORMALISER

PIPELINE_TAG = "automatic-speech-recognition"
DEFAULT_LICENSE = "apache-2.0"
LANGUAGES = {"de": "German", "en": "English"}
CARD_NAME = "README.md"
ORTHOGRAPHIC = "none: text as written, surrounding whitespace trimmed"
SESSION_DONE = re.compile(r"\d+ this session in (\d+) s")
LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)")
# Paths of the training machine say nothing to a reader of the card; only their last part is kept.
PATH_FIELDS = (("output_dir",), ("config",), ("data", "shards"), ("data", "shard_cache"))


class CardError(ValueError):
    """The card cannot be made from these inputs, or did not survive parsing."""


# --- what the run folder says -----------------------------------------------------------------


@dataclass
class RunFacts:
    run_dir: Path | None = None
    config: dict[str, Any] | None = None  # RUN/config.json, the resolved TrainConfig
    state: dict[str, Any] | None = None  # the newest checkpoint's state.json
    session_seconds: list[int] = field(default_factory=list)  # finished sessions, training.log
    wall_seconds: float | None = None  # first to last line of training.log


def read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def find_run(model: Path) -> RunFacts:
    """The run a model folder belongs to: RUN/best, or a checkpoint RUN/checkpoints/step-N."""
    if (model / "run_config.json").is_file():  # a checkpoint carries its own copy
        run_dir = model.parent.parent
        facts = RunFacts(
            run_dir, read_json(model / "run_config.json"), read_json(model / "state.json")
        )
    elif (model.parent / "config.json").is_file() and (model.parent / "checkpoints").is_dir():
        run_dir = model.parent
        states = sorted(
            (run_dir / "checkpoints").glob("step-*/state.json"),
            key=lambda p: int(p.parent.name.split("-")[1]),
        )
        facts = RunFacts(run_dir, read_json(run_dir / "config.json"))
        facts.state = read_json(states[-1]) if states else None
    else:
        return RunFacts()  # a plain Hugging Face folder: the card says less
    facts.session_seconds, facts.wall_seconds = training_time(run_dir / "training.log")
    return facts


def training_time(log: Path) -> tuple[list[int], float | None]:
    """(seconds of each finished session, seconds from the first line to the last)."""
    if not log.is_file():
        return [], None
    lines = log.read_text(errors="replace").splitlines()
    sessions = [int(m.group(1)) for line in lines if (m := SESSION_DONE.search(line))]
    stamps = [datetime.fromisoformat(m.group(1)) for line in lines if (m := LOG_TIME.match(line))]
    wall = (stamps[-1] - stamps[0]).total_seconds() if len(stamps) > 1 else None
    return sessions, wall


def find_eval_report(run: RunFacts, explicit: str | None) -> tuple[dict[str, Any], str] | None:
    """(report, where it came from): the given file, else the training-time evaluation of the
    best step, else None."""
    if explicit:
        path = Path(explicit)
        if not path.is_file():
            raise CardError(f"--eval-report {explicit}: no such file")
        report = json.loads(path.read_text())
        if "wer_normalised" not in report or "per_source" not in report:
            raise CardError(
                f"{explicit} is not an evaluation report (no wer_normalised / per_source): "
                "write one with python -m trainer.evaluate --output FILE"
            )
        return report, f"`python -m trainer.evaluate` ({report.get('backend', 'hf')} backend)"
    if run.run_dir is None or not run.state or run.state.get("best_step", -1) < 0:
        return None
    path = run.run_dir / "eval" / f"step-{run.state['best_step']}.json"
    if not path.is_file():
        return None
    origin = f"the evaluation during training at step {run.state['best_step']}"
    limit = (run.config or {}).get("data", {}).get("eval_limit")
    if limit:
        origin += f" (only the split's first {limit} samples: --eval-limit)"
    return json.loads(path.read_text()), origin


def split_manifest(shards: str | None) -> dict[str, Any] | None:
    if not shards or "://" in shards:
        return None  # shards in a bucket: the card then names only what the flags give
    return read_json(Path(shards) / "manifest.json")


# --- the card's inputs ------------------------------------------------------------------------


@dataclass
class CardInputs:
    repo_id: str  # where this card is published
    kind: str  # "transformers" (the HF folder) or "ctranslate2" (the faster-whisper folder)
    license: str
    run: RunFacts
    report: dict[str, Any] | None = None
    report_origin: str = ""
    eval_dataset: dict[str, Any] | None = None  # manifest "source" of the evaluated split
    train_dataset: dict[str, Any] | None = None  # manifest "source" of the training split
    base_model: str | None = None
    datasets: list[str] = field(default_factory=list)
    hf_repo_id: str | None = None
    ct2_repo_id: str | None = None
    ct2_export: dict[str, Any] | None = None  # the CT2 folder's export_report.json

    @property
    def language(self) -> str:
        return (self.run.config or {}).get("model", {}).get("language", "de")


def gather_inputs(
    repo_id: str,
    kind: str,
    model: Path,
    *,
    license: str = DEFAULT_LICENSE,
    eval_report: str | None = None,
    base_model: str | None = None,
    datasets: list[str] | None = None,
    hf_repo_id: str | None = None,
    ct2_repo_id: str | None = None,
    ct2_folder: Path | None = None,
) -> CardInputs:
    """Everything the card says, read from the model's run folder and the flags."""
    run = find_run(model)
    found = find_eval_report(run, eval_report)
    report, origin = found if found else (None, "")
    data = (run.config or {}).get("data", {})
    eval_shards = (report or {}).get("shards") or (
        str(Path(data["shards"]) / data["eval_split"]) if data.get("shards") else None
    )
    train_shards = str(Path(data["shards"]) / data["train_split"]) if data.get("shards") else None
    eval_manifest, train_manifest = split_manifest(eval_shards), split_manifest(train_shards)
    train_source = train_manifest["source"] if train_manifest else None
    hub_datasets = (
        [train_source["dataset"]] if train_source and train_source["kind"] == "hub" else []
    )
    export = read_json(ct2_folder / "export_report.json") if ct2_folder else None
    return CardInputs(
        repo_id=repo_id,
        kind=kind,
        license=license,
        run=run,
        report=report,
        report_origin=origin,
        eval_dataset=eval_manifest["source"] if eval_manifest else None,
        train_dataset=train_source,
        base_model=base_model or hub_base_model(run),
        datasets=datasets or hub_datasets,
        hf_repo_id=hf_repo_id,
        ct2_repo_id=ct2_repo_id,
        ct2_export=export,
    )


def hub_base_model(run: RunFacts) -> str | None:
    """The run's starting model when it is a hub id; a local folder is no `base_model`."""
    name = (run.config or {}).get("model", {}).get("name_or_path")
    if not name or Path(name).exists() or name.startswith((".", "/", "~")):
        return None
    return name if re.fullmatch(r"[\w.-]+/[\w.-]+", name) else None


# --- metadata ---------------------------------------------------------------------------------


def eval_results(inputs: CardInputs):
    """One EvalResult per (overall or source) x (orthographic, normalised), WER in percent."""
    from huggingface_hub import EvalResult

    report = inputs.report
    if report is None:
        return []
    source = inputs.eval_dataset or {}
    dataset = source.get("dataset") or "unknown"
    split = source.get("split")
    rows = [(None, "all sources", report)] + [
        (name, name, figures) for name, figures in report["per_source"].items()
    ]
    results = []
    for config, label, figures in rows:
        for key, metric_name, normaliser in (
            ("wer_orthographic", "WER orthographic (%)", ORTHOGRAPHIC),
            ("wer_normalised", "WER normalised (%)", report.get("normaliser", NORMALISER)),
        ):
            value = figures.get(key)
            if value is None or math.isnan(value):
                continue  # no reference words here
            results.append(
                EvalResult(
                    task_type=PIPELINE_TAG,
                    task_name="Speech recognition",
                    dataset_type=dataset,
                    dataset_name=f"{dataset} {split or ''} ({label})".replace("  ", " "),
                    dataset_config=config,
                    dataset_split=split,
                    dataset_revision=source.get("revision"),
                    dataset_args={"utterances": figures["num_utterances"]},
                    metric_type="wer",
                    metric_name=metric_name,
                    metric_value=round(100 * value, 2),
                    metric_args={"normaliser": normaliser},
                )
            )
    return results


def card_data(inputs: CardInputs):
    from huggingface_hub import ModelCardData

    tags = ["whisper", "german", "speech-recognition"]
    if inputs.kind == "ctranslate2":
        tags += ["ctranslate2", "faster-whisper"]
    results = eval_results(inputs)
    return ModelCardData(
        language=inputs.language,
        license=inputs.license,
        base_model=inputs.base_model,
        datasets=inputs.datasets or None,
        pipeline_tag=PIPELINE_TAG,
        library_name="ctranslate2" if inputs.kind == "ctranslate2" else "transformers",
        tags=tags,
        metrics=["wer"] if results else None,
        model_name=inputs.repo_id.split("/")[-1],
        eval_results=results or None,
    )


# --- body -------------------------------------------------------------------------------------


def pct(value: float | None) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{100 * value:.2f} %"


def evaluation_section(inputs: CardInputs) -> list[str]:
    report = inputs.report
    if report is None:
        return [
            "## Evaluation",
            "",
            "Not evaluated yet: run `python -m trainer.evaluate --model ... --shards SHARDS/test "
            "--output report.json` and publish again with `--eval-report report.json`.",
        ]
    source = inputs.eval_dataset or {}
    where = f"`{source['dataset']}`, split `{source['split']}`" if source else "the eval split"
    revision = f" at commit `{source['revision']}`" if source.get("revision") else ""
    lines = [
        "## Evaluation",
        "",
        f"Word error rate on {where}{revision}, {report['num_utterances']} utterances, from "
        f"{inputs.report_origin}. Orthographic WER compares the text as written; normalised WER "
        f"first applies {report.get('normaliser', NORMALISER)}. References that normalise to "
        f"nothing are dropped from the normalised figures "
        f"({report.get('dropped_empty_after_normalisation', 0)} here).",
        "",
        "| source | utterances | WER orthographic | WER normalised |",
        "|---|---:|---:|---:|",
    ]
    for name, figures in report["per_source"].items():
        lines.append(
            f"| {name} | {figures['num_utterances']} | {pct(figures['wer_orthographic'])} | "
            f"{pct(figures['wer_normalised'])} |"
        )
    lines.append(
        f"| **all** | {report['num_utterances']} | {pct(report['wer_orthographic'])} | "
        f"{pct(report['wer_normalised'])} |"
    )
    return lines


def duration_text(seconds: float) -> str:
    hours, rest = divmod(round(seconds), 3600)
    return f"{hours} h {rest // 60:02d} min" if hours else f"{rest // 60} min {rest % 60:02d} s"


def training_section(inputs: CardInputs) -> list[str]:
    run = inputs.run
    if run.config is None:
        return ["## Training", "", "Trained outside a run folder of this project: no details."]
    model, data, optim = run.config["model"], run.config["data"], run.config["optim"]
    state = run.state or {}
    ranks = state.get("world_size", 1)
    train = inputs.train_dataset or {}
    packed = data.get("pack")
    window = "packed 30 s windows (timestamps, prompts)" if packed else "one utterance per window"
    unit = "windows" if packed else "samples"
    lines = [
        "## Training",
        "",
        f"- started from: `{model['name_or_path']}`"
        + (", encoder frozen" if model.get("freeze_encoder") else ""),
        f"- data: `{train.get('dataset', data['shards'])}`"
        + (f" at commit `{train['revision']}`" if train.get("revision") else "")
        + f", split `{data['train_split']}`",
        f"- {window}; language `{model['language']}`, task `{model['task']}`",
        f"- {ranks} rank(s) x batch {data['batch_size']} x accumulation {optim['grad_accum']} = "
        f"{ranks * data['batch_size'] * optim['grad_accum']} {unit} per step; "
        f"precision {state.get('precision', optim['precision'])}"
        + (", ZeRO-1" if optim.get("zero1") else ""),
        f"- AdamW, learning rate {optim['lr']:g}, {optim['schedule']} schedule, "
        f"{optim['warmup_steps']} warm-up steps, weight decay {optim['weight_decay']:g}",
    ]
    if state:
        lines.append(
            f"- {state['step']} optimiser steps ({state.get('skipped_steps', 0)} skipped), "
            f"{state.get('samples_seen', 0)} samples, {state.get('tokens_seen', 0)} target tokens; "
            f"best {run.config.get('eval', {}).get('best_metric', 'metric')} at step "
            f"{state.get('best_step')}"
        )
    if run.session_seconds:
        lines.append(
            f"- trained for {duration_text(sum(run.session_seconds))} in "
            f"{len(run.session_seconds)} session(s)"
            + (
                f", {duration_text(run.wall_seconds)} from the first log line to the last"
                if run.wall_seconds
                else ""
            )
        )
    lines += [
        "",
        "<details><summary>The resolved training configuration</summary>",
        "",
        "```json",
        json.dumps(public_config(run.config), indent=2),
        "```",
        "",
        "</details>",
    ]
    return lines


def public_config(config: dict[str, Any]) -> dict[str, Any]:
    """The configuration with the training machine's paths cut to their last part."""
    config = json.loads(json.dumps(config))
    for keys in PATH_FIELDS:
        holder = config
        for key in keys[:-1]:
            holder = holder.get(key, {})
        if holder.get(keys[-1]):
            holder[keys[-1]] = Path(holder[keys[-1]]).name
    return config


def usage_section(inputs: CardInputs) -> list[str]:
    hf_repo = inputs.hf_repo_id or (inputs.repo_id if inputs.kind == "transformers" else None)
    ct2_repo = inputs.ct2_repo_id or (inputs.repo_id if inputs.kind == "ctranslate2" else None)
    language = inputs.language
    lines = ["## Usage", ""]
    if hf_repo:
        lines += [
            "With transformers:",
            "",
            "```python",
            "from transformers import pipeline",
            "",
            f'asr = pipeline("automatic-speech-recognition", model="{hf_repo}")',
            f'print(asr("audio.wav", generate_kwargs={{"language": "{language}", '
            '"task": "transcribe"})["text"])',
            "```",
            "",
        ]
    if ct2_repo:
        compute = (inputs.ct2_export or {}).get("quantization", "int8_float16")
        lines += [
            "With faster-whisper (the CTranslate2 conversion"
            + (f", weights stored as `{compute}`" if inputs.ct2_export else "")
            + "):",
            "",
            "```python",
            "from faster_whisper import WhisperModel",
            "",
            f'model = WhisperModel("{ct2_repo}", device="cuda", compute_type="{compute}")',
            f'segments, info = model.transcribe("audio.wav", language="{language}", beam_size=5)',
            'print(" ".join(segment.text.strip() for segment in segments))',
            "```",
            "",
            "With RealtimeSTT (microphone to text; it loads the model through faster-whisper):",
            "",
            "```python",
            "from RealtimeSTT import AudioToTextRecorder",
            "",
            'if __name__ == "__main__":',
            f'    recorder = AudioToTextRecorder(model="{ct2_repo}", language="{language}")',
            "    while True:",
            "        print(recorder.text())",
            "```",
        ]
    else:
        lines.append(
            "For faster-whisper and RealtimeSTT, convert it first: `python -m trainer.export "
            "--model MODEL --out FOLDER` (docs/conversion.md)."
        )
    return lines


def card_text(inputs: CardInputs, data) -> str:
    counterpart = ""
    if inputs.kind == "ctranslate2" and inputs.hf_repo_id:
        counterpart = f"The transformers weights: {repo_link(inputs.hf_repo_id)}."
    elif inputs.kind == "transformers" and inputs.ct2_repo_id:
        counterpart = f"For faster-whisper and RealtimeSTT: {repo_link(inputs.ct2_repo_id)}."
    fmt = "CTranslate2 (faster-whisper)" if inputs.kind == "ctranslate2" else "transformers"
    language = LANGUAGES.get(inputs.language, f"`{inputs.language}`")
    intro = (
        f"Whisper fine-tuned for {language} speech recognition"
        + (f" from {repo_link(inputs.base_model)}" if inputs.base_model else "")
        + f" with whisper-german-trainer; this repository holds the {fmt} weights. {counterpart}"
    )
    body = [
        f"# {inputs.repo_id.split('/')[-1]}",
        "",
        intro.strip(),
        "",
        *evaluation_section(inputs),
        "",
        *training_section(inputs),
        "",
        *usage_section(inputs),
    ]
    return f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body) + "\n"


def repo_link(repo_id: str) -> str:
    return f"[`{repo_id}`](/{repo_id})"  # relative: resolves on the hub's own host


# --- the card ---------------------------------------------------------------------------------


def make_card(inputs: CardInputs):
    """The card, parsed back by huggingface_hub and checked against what went in."""
    from huggingface_hub import ModelCard

    data = card_data(inputs)
    card = ModelCard(card_text(inputs, data))
    check_card(card, data)
    return card


def check_card(card, data) -> None:
    parsed = card.data.to_dict()
    if parsed != data.to_dict():
        raise CardError("the card's metadata does not read back as it was written")
    read, written = len(card.data.eval_results or []), len(data.eval_results or [])
    if read != written:
        raise CardError(f"model-index reads back {read} results of the {written} written")
    if card.data.pipeline_tag != PIPELINE_TAG or not card.data.language:
        raise CardError("the card lacks its pipeline tag or language")


def write_card(folder: Path, card) -> Path:
    path = Path(folder) / CARD_NAME
    card.save(path)
    return path
