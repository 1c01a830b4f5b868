"""trainer.publish and trainer.model_card on a real one-step demo run and its CTranslate2 export.

The hub cannot be reached here: the upload is tested against tests/hub_server.py, a local
stand-in that answers and records the calls huggingface_hub makes (through HF_ENDPOINT), and
the cards are checked by parsing them back with huggingface_hub's ModelCard.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from huggingface_hub import ModelCard

from tests._trainer_run import run_trainer
from tests.conftest import REPO
from tests.hub_server import recording_hub
from trainer.publish import PublishConfig, PublishError, publish
from trainer.watch.metrics import NORMALISER, wer_report

REPO_ID = "demo-user/whisper-tiny-de"
CT2_REPO_ID = f"{REPO_ID}-ct2"


@pytest.fixture(scope="module")
def demo_run(demo_shards, module_tmp) -> Path:
    """One optimiser step of the tiny preset, evaluated (4 utterances) and checkpointed."""
    run_dir = module_tmp("publish") / "run"
    short = ["--max-steps", "1", "--grad-accum", "1", "--eval-limit", "4", "--packed-eval", "false"]
    result = run_trainer(1, demo_shards, run_dir, *short)
    assert result.returncode == 0, result.stdout[-3000:]
    return run_dir


@pytest.fixture(scope="module")
def ct2_export(demo_run) -> Path:
    pytest.importorskip("ctranslate2")
    from trainer.export import ExportConfig, export

    out = demo_run.parent / "ct2"
    export(
        ExportConfig(model=str(demo_run / "best"), out=str(out), quantization="int8", verify=False)
    )
    return out


@pytest.fixture
def copies(demo_run, ct2_export, tmp_path) -> tuple[Path, Path]:
    """Copies of the run and the export: publishing writes README.md into them."""
    run, ct2 = tmp_path / "run", tmp_path / "ct2"
    shutil.copytree(demo_run, run)
    shutil.copytree(ct2_export, ct2)
    return run, ct2


def publish_command(run: Path, ct2: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "trainer.publish", "--model", str(run / "best"), "--ct2", str(ct2),
        "--repo-id", REPO_ID, *extra,
    ]  # fmt: skip


def hub_env(endpoint: str, hf_home: Path) -> dict[str, str]:
    """The stand-in's endpoint and token; HF_HOME apart (huggingface_hub caches there)."""
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    return {
        **env,
        "HF_ENDPOINT": endpoint,
        "HF_TOKEN": "hf_stand-in-token",
        "HF_HOME": str(hf_home),
    }


def wer_table(card: ModelCard) -> dict[tuple[str | None, str], float]:
    """(source or None for all, metric name) -> value, from the parsed model-index."""
    return {(r.dataset_config, r.metric_name): r.metric_value for r in card.data.eval_results}


def expected_table(report: dict) -> dict[tuple[str | None, str], float]:
    rows = [(None, report)] + list(report["per_source"].items())
    table = {}
    for source, figures in rows:
        table[(source, "WER orthographic (%)")] = round(100 * figures["wer_orthographic"], 2)
        table[(source, "WER normalised (%)")] = round(100 * figures["wer_normalised"], 2)
    return table


def test_export_writes_the_card_into_the_ct2_folder(ct2_export, demo_run):
    card = ModelCard.load(ct2_export / "README.md")
    assert card.data.library_name == "ctranslate2" and card.data.language == "de"
    report = json.loads((demo_run / "eval" / "step-1.json").read_text())
    assert wer_table(card) == expected_table(report)
    assert f'WhisperModel("{ct2_export}"' in card.text


def test_dry_run_writes_cards_that_huggingface_hub_parses(copies, tmp_path):
    run, ct2 = copies
    # A dead endpoint: any network call would fail the command.
    result = subprocess.run(
        publish_command(run, ct2, "--dry-run"),
        cwd=REPO,
        env=hub_env("http://127.0.0.1:9", tmp_path / "hf-home"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "dry run: cards written, nothing uploaded" in result.stdout
    assert f"{REPO_ID}: 8 files" in result.stdout and f"{CT2_REPO_ID}: 7 files" in result.stdout
    assert "  model.safetensors\n" in result.stdout and "  model.bin\n" in result.stdout

    card = ModelCard.load(run / "best" / "README.md")
    data = card.data
    assert (data.language, data.pipeline_tag, data.license) == (
        "de",
        "automatic-speech-recognition",
        "apache-2.0",
    )
    assert data.library_name == "transformers"
    report = json.loads((run / "eval" / "step-1.json").read_text())
    assert wer_table(card) == expected_table(report)  # 3 sources + all, two metrics each
    normalisers = {r.metric_name: r.metric_args["normaliser"] for r in data.eval_results}
    assert normalisers["WER normalised (%)"] == NORMALISER
    assert {r.dataset_split for r in data.eval_results} == {"test"}
    assert data.base_model is None  # the run started from a local folder, not a hub id
    text = card.text
    assert "| **all** | 4 |" in text and "in 1 session(s)" in text
    assert "at step 1 (only the split's first 4 samples: --eval-limit)" in text
    trained = json.loads((run / "config.json").read_text())
    assert '"max_steps": 1' in text  # the resolved configuration, without the machine's paths
    assert trained["output_dir"] not in text and trained["data"]["shards"] not in text
    assert f'pipeline("automatic-speech-recognition", model="{REPO_ID}")' in text
    assert f'AudioToTextRecorder(model="{CT2_REPO_ID}", language="de")' in text
    ct2_card = ModelCard.load(ct2 / "README.md")
    assert ct2_card.data.library_name == "ctranslate2"
    assert wer_table(ct2_card) == wer_table(card)
    assert f'WhisperModel("{CT2_REPO_ID}", device="cuda", compute_type="int8")' in ct2_card.text


def test_an_evaluation_report_replaces_the_training_time_figures(copies, demo_shards):
    run, ct2 = copies
    report = wer_report(
        ["Guten Morgen.", "Wie geht es dir?", "Das ist gut."],
        ["guten morgen", "Wie geht es Dir?", "Das ist gut."],
        ["a", "b", "b"],
    )
    report.update(model=str(run / "best"), backend="ct2", shards=str(demo_shards / "test"))
    path = run / "report.json"
    path.write_text(json.dumps(report))
    config = PublishConfig(
        model=str(run / "checkpoints" / "step-1"),
        repo_id=REPO_ID,
        eval_report=str(path),
        base_model="openai/whisper-tiny",
        dataset=["flozi00/asr-german-mixed"],
        dry_run=True,
    )
    (target,) = publish(config)
    card = ModelCard.load(target.card)
    assert wer_table(card) == expected_table(report)
    assert wer_table(card)[(None, "WER normalised (%)")] == 0.0
    assert card.data.base_model == "openai/whisper-tiny"
    assert card.data.datasets == ["flozi00/asr-german-mixed"]
    assert "`python -m trainer.evaluate` (ct2 backend)" in card.text
    # A checkpoint is published without what only resuming needs.
    assert "model.safetensors" in target.files
    assert not {"optimizer.pt", "training.pt", "rng.pt", "state.json"} & set(target.files)


def test_upload_against_a_recording_hub(copies, tmp_path):
    run, ct2 = copies
    with recording_hub() as hub:
        result = subprocess.run(
            publish_command(run, ct2, "--private"),
            cwd=REPO,
            env=hub_env(hub.url, tmp_path / "hf-home"),
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert result.returncode == 0, result.stderr[-3000:]
    for repo in (REPO_ID, CT2_REPO_ID):
        assert f"POST /api/models/{repo}/preupload/main" in hub.paths()
        assert f"POST /api/models/{repo}/commit/main" in hub.paths()
        assert hub.repos[repo]["visibility"] == "private"
    assert hub.paths().count("POST /api/repos/create") == 2
    assert {call.authorization for call in hub.api_calls()} == {"Bearer hf_stand-in-token"}
    assert hub.unknown == []  # no call the stand-in does not know
    uploaded = hub.files[REPO_ID]
    assert uploaded["model.safetensors"] == (run / "best" / "model.safetensors").read_bytes()
    assert uploaded["README.md"] == (run / "best" / "README.md").read_bytes()
    assert set(hub.files[CT2_REPO_ID]) == {p.name for p in ct2.iterdir()}
    assert hub.files[CT2_REPO_ID]["config.json"] == (ct2 / "config.json").read_bytes()
    assert f"uploaded: {hub.url}/{CT2_REPO_ID}/commit/" in result.stdout


def test_bad_requests_are_named(copies, tmp_path):
    run, ct2 = copies
    with pytest.raises(PublishError, match="must differ"):
        publish(
            PublishConfig(
                model=str(run / "best"), repo_id=REPO_ID, ct2=str(ct2), ct2_repo_id=REPO_ID
            )
        )
    with pytest.raises(PublishError, match="USER/NAME"):
        publish(PublishConfig(model=str(run / "best"), repo_id="no-namespace"))
    with pytest.raises(PublishError, match="has no model.bin"):
        publish(PublishConfig(model=str(run / "best"), repo_id=REPO_ID, ct2=str(run / "best")))
    assert not (run / "best" / "README.md").exists()  # nothing written on a refused request
