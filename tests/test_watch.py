"""Watching a run: W&B (offline), TensorBoard's event files, the system metrics and their
warnings, RUN/best_wer.txt and RUN/metrics.json, per-step lines in training.log, and .env read by
trainer.evaluate and trainer.export.

One short 2-rank run (2 steps, W&B offline, TensorBoard and the progress bar on) and its resume
to step 4 serve the end-to-end tests; the rest are pure functions.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from collections import namedtuple
from pathlib import Path

import pytest
import torch

from tests._trainer_run import REPO, metrics, run_trainer
from trainer.runtime.distributed import Dist
from trainer.watch import summary, sysmetrics
from trainer.watch.wandb_sink import RUN_ID_FILE

FIRST_STEPS, RESUMED_STEPS = 2, 4
WATCH_ARGS = (
    "--eval-every",
    "2",
    "--save-every",
    "2",
    "--packed-eval",
    "false",
    "--wandb",
    "true",
    "--wandb-project",
    "watch-test",
    "--tensorboard",
    "true",
    "--progress",
    "true",
    # Any wait is above 0 %: the bottleneck warning must fire after two log steps.
    "--loader-wait-warning",
    "0",
    "--loader-wait-log-steps",
    "2",
)
OFFLINE = {"WANDB_MODE": "offline", "WANDB_SILENT": "true"}


@pytest.fixture(scope="module")
def watched_run(demo_shards, module_tmp):
    pytest.importorskip("wandb")
    run_dir = module_tmp("watch")
    for steps in (FIRST_STEPS, RESUMED_STEPS):
        result = run_trainer(
            2, demo_shards, run_dir, "--max-steps", str(steps), *WATCH_ARGS, env=OFFLINE
        )
        assert result.returncode == 0, result.stdout[-4000:]
    return run_dir


def wandb_sessions(run_dir: Path) -> list[list[dict]]:
    """The records of each offline W&B session in RUN/wandb/, oldest first, as the wandb
    library's own reader of .wandb transaction logs prints them."""
    files = sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    sessions = []
    for path in files:
        printed = subprocess.run(
            [sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(path)],
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        ).stdout
        sessions.append([json.loads(line) for line in printed.splitlines() if line.strip()])
    return sessions


def history(records: list[dict]) -> list[dict]:
    return [r["history"]["item"] for r in records if r["type"] == "history"]


def by_step(rows: list[dict], key: str) -> dict[int, float]:
    return {int(row["step"]): row[key] for row in rows if key in row}


@pytest.mark.slow
def test_wandb_offline_holds_the_scalars_and_config_of_rank_0_only(watched_run):
    sessions = wandb_sessions(watched_run)
    # One W&B session per training session: rank 1 never starts one.
    assert len(sessions) == 2, [p.name for p in (watched_run / "wandb").iterdir()]
    first = sessions[0]
    (run_record,) = [r["run"] for r in first if r["type"] == "run"]
    assert run_record["project"] == "watch-test"
    config = run_record["config"]["update"]
    written = json.loads((watched_run / "config.json").read_text())  # the resumed session's
    assert config["optim"] == {**written["optim"], "max_steps": FIRST_STEPS}
    assert config["log"]["wandb"] is True
    assert config["data"]["batch_size"] == 2 and config["output_dir"] == str(watched_run)

    rows = history(first)
    jsonl = {row["step"]: row for row in metrics(watched_run) if row["step"] <= FIRST_STEPS}
    assert by_step(rows, "train/loss") == {s: row["loss"] for s, row in jsonl.items()}
    assert sorted(by_step(rows, "eval/wer_normalised")) == [2]
    for rank in (0, 1):  # gathered from both ranks, logged by rank 0
        assert sorted(by_step(rows, f"system/rank{rank}/rss_gb")) == [1, 2]
    assert all(
        row["system/rank0/ram_free_gb"] > 0
        for row in rows
        if "step" in row and "system/rank0/ram_free_gb" in row
    )
    tables = [row for row in rows if row.get("eval/worst_hypotheses._type") == "table-file"]
    assert [int(t["step"]) for t in tables] == [2]
    folder = sorted((watched_run / "wandb").glob("offline-run-*"))[0] / "files"
    table = json.loads(
        sorted(folder.glob("media/table/eval/worst_hypotheses_*.table.json"))[0].read_text()
    )
    assert table["columns"] == ["wer_normalised", "key", "source", "reference", "hypothesis"]
    assert len(table["data"]) == 8  # --eval-limit 8: all of them, worst first
    wers = [row[0] for row in table["data"]]
    assert wers == sorted(wers, reverse=True)
    alerts = [r["alert"]["text"] for r in first if r["type"] == "alert"]
    assert any("--num-workers" in text for text in alerts), alerts


@pytest.mark.slow
def test_a_resumed_run_continues_the_same_wandb_run(watched_run):
    run_id = (watched_run / RUN_ID_FILE).read_text().strip()
    sessions = wandb_sessions(watched_run)
    ids = [next(r["run"]["run_id"] for r in s if r["type"] == "run") for s in sessions]
    assert ids == [run_id, run_id]
    resumed = by_step(history(sessions[1]), "train/loss")
    assert sorted(resumed) == [3, 4]  # from the step-2 checkpoint on


@pytest.mark.slow
def test_tensorboard_event_files_hold_what_metrics_jsonl_holds(watched_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(watched_run / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/lr", "eval/wer_normalised", "system/rank1/rss_gb"} <= tags
    losses = {e.step: e.value for e in events.Scalars("train/loss")}
    expected = {row["step"]: row["loss"] for row in metrics(watched_run)}
    assert sorted(losses) == list(range(1, RESUMED_STEPS + 1))
    assert losses == pytest.approx(expected, rel=1e-6)  # stored as float32
    assert [e.step for e in events.Scalars("eval/wer_normalised")] == [2, 4]


@pytest.mark.slow
def test_system_metrics_go_to_metrics_jsonl_and_the_bottleneck_warning_is_logged(watched_run):
    rows = metrics(watched_run, "system")
    assert [row["step"] for row in rows] == list(range(1, RESUMED_STEPS + 1))
    train = {row["step"]: row for row in metrics(watched_run)}
    for row in rows:
        assert row["loader_wait_share"] == train[row["step"]]["data_wait_fraction"]
        assert row["rank0/rss_gb"] > 0.05 and row["rank1/rss_gb"] > 0.05
        assert row["disk_free_run_gb"] > 0 and row["disk_free_shards_gb"] > 0
        assert not any(k.endswith("gpu_utilisation_pct") for k in row)  # CPU: NVML skipped
    log = (watched_run / "training.log").read_text()
    # Once per stretch: each session's stretch starts over.
    assert log.count("data loading is the bottleneck") == 2


@pytest.mark.slow
def test_training_log_gets_per_step_lines_with_the_progress_bar_on(watched_run):
    log = (watched_run / "training.log").read_text()
    for step in range(1, RESUMED_STEPS + 1):
        assert f"step {step}: loss=" in log


@pytest.mark.slow
def test_best_wer_txt_and_metrics_json_follow_the_evaluations(watched_run):
    evals = {row["step"]: row["wer_normalised"] for row in metrics(watched_run, "eval")}
    best_step = min(evals, key=lambda step: (evals[step], step))  # the first of equal ones
    figures = json.loads((watched_run / "metrics.json").read_text())
    assert figures["latest"]["step"] == RESUMED_STEPS
    assert figures["latest"]["wer_normalised"] == evals[RESUMED_STEPS]
    assert figures["best"]["step"] == best_step
    assert figures["best"]["wer_normalised"] == evals[best_step]
    assert "utterances" not in figures["latest"] and figures["best_metric"] == "wer_normalised"
    line = (watched_run / "best_wer.txt").read_text()
    assert line == f"{100 * evals[best_step]:.2f} % wer_normalised at step {best_step}\n"
    assert not list(watched_run.glob(".*.tmp"))


# --- pure functions ---------------------------------------------------------------------------


def test_the_loader_warning_needs_a_stretch_and_comes_once_per_stretch():
    watch = sysmetrics.LoaderWatch(threshold=0.3, log_steps=3, num_workers=2)
    said = [watch.update(share) for share in (0.5, 0.6, 0.1, 0.5, 0.5, 0.5, 0.9, 0.9, 0.2)]
    assert [i for i, text in enumerate(said) if text] == [5]
    assert "--num-workers (now 2)" in said[5] and "local disk" in said[5]
    assert watch.update(0.5) is None  # a new stretch starts counting again


def test_checkpoint_size_comes_from_the_last_checkpoint_or_the_parameters(tmp_path):
    model = torch.nn.Linear(10, 10)  # 110 fp32 parameters
    model.bias.requires_grad_(False)
    assert sysmetrics.checkpoint_bytes(tmp_path, model) == 110 * 4 + 100 * 8
    folder = tmp_path / "checkpoints" / "step-3"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.bin").write_bytes(b"x" * 1000)
    (folder / "sub" / "b.bin").write_bytes(b"x" * 500)
    assert sysmetrics.checkpoint_bytes(tmp_path, model) == 1500


def test_a_disk_too_small_for_one_more_checkpoint_is_named(tmp_path, monkeypatch):
    model = torch.nn.Linear(1000, 1000)  # ~12 MB to save with AdamW's moments
    assert sysmetrics.checkpoint_space_warning(tmp_path, model) is None  # this disk has room
    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(sysmetrics.shutil, "disk_usage", lambda path: Usage(10**9, 0, 10**6))
    warning = sysmetrics.checkpoint_space_warning(tmp_path, model)
    assert warning and "0.00 GiB free" in warning and "--keep-last" in warning


def test_rank_figures_on_the_cpu_skip_the_gpu_silently():
    nvml = sysmetrics.open_nvml(torch.device("cpu"))
    assert nvml is None
    figures = sysmetrics.rank_figures(torch.device("cpu"), nvml)
    assert set(figures) == {"rss_gb", "ram_free_gb"}
    assert 0.01 < figures["rss_gb"] < figures["ram_free_gb"] + figures["rss_gb"]


def test_nvml_figures_are_converted_and_a_missing_one_is_skipped(monkeypatch):
    """What NVML returns on a GPU, through a stand-in module (no NVIDIA driver here)."""

    class NVMLError(Exception):
        pass

    def no_power(handle):
        raise NVMLError("not supported")

    fake = types.SimpleNamespace(
        NVMLError=NVMLError,
        nvmlDeviceGetUtilizationRates=lambda handle: types.SimpleNamespace(gpu=87, memory=40),
        nvmlDeviceGetPowerUsage=lambda handle: 215_500,  # milliwatts
    )
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    assert sysmetrics._nvml_figures("handle") == {
        "gpu_utilisation_pct": 87.0,
        "gpu_power_w": 215.5,
    }
    fake.nvmlDeviceGetPowerUsage = no_power
    assert sysmetrics._nvml_figures("handle") == {"gpu_utilisation_pct": 87.0}


def test_wandb_that_cannot_start_or_is_missing_is_a_clear_error(tmp_path, monkeypatch):
    from trainer.watch.metrics import LogConfig
    from trainer.watch.wandb_sink import WandbSink

    wandb = pytest.importorskip("wandb")

    def refuse(**kwargs):
        raise RuntimeError("No API key configured")

    monkeypatch.setattr(wandb, "init", refuse)
    with pytest.raises(ValueError, match="W&B could not start: No API key.*WANDB_MODE=offline"):
        WandbSink(tmp_path, LogConfig(wandb=True), {})
    assert not (tmp_path / RUN_ID_FILE).exists()
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed
    with pytest.raises(ValueError, match=r"wandb is not installed: pip install -e '\.\[wandb\]'"):
        WandbSink(tmp_path, LogConfig(wandb=True), {})


def test_the_monitor_adds_disk_and_loader_figures_on_one_process(tmp_path):
    info = Dist(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    monitor = sysmetrics.SystemMonitor(
        sysmetrics.SystemConfig(), info, tmp_path / "run", tmp_path / "missing", 2
    )
    values = monitor.figures(0.25)
    assert values["loader_wait_share"] == 0.25 and "rank0/rss_gb" in values
    assert values["disk_free_run_gb"] > 0 and values["disk_free_shards_gb"] > 0


def test_the_summary_keeps_the_best_evaluation_read_back_from_its_file(tmp_path):
    (tmp_path / "eval").mkdir()
    best = {"wer_normalised": 0.25, "normaliser": "n", "utterances": [1, 2]}
    (tmp_path / "eval" / "step-2.json").write_text(json.dumps({**best, "step": 2}))
    latest = {"wer_normalised": 0.5, "normaliser": "n", "utterances": [3]}
    summary.write_summary(tmp_path, 4, latest, "wer_normalised", 0.25, 2)
    figures = json.loads((tmp_path / "metrics.json").read_text())
    assert figures["latest"] == {"step": 4, "wer_normalised": 0.5, "normaliser": "n"}
    assert figures["best"] == {"step": 2, "wer_normalised": 0.25, "normaliser": "n"}
    assert (tmp_path / "best_wer.txt").read_text() == "25.00 % wer_normalised at step 2\n"
    summary.write_summary(tmp_path, 6, latest, "wer_normalised", None, -1)  # no best yet
    assert json.loads((tmp_path / "metrics.json").read_text())["best"] is None


@pytest.mark.parametrize("module", ["trainer.evaluate", "trainer.export"])
def test_dotenv_is_read_by_evaluate_and_export(tmp_path, module):
    """HF_HOME set in .env must reach huggingface_hub, which reads it when first imported."""
    hf_home = tmp_path / "hf-home"
    (tmp_path / ".env").write_text(f"HF_HOME={hf_home}\n")
    flags = {"trainer.evaluate": "'--shards', 'x'", "trainer.export": "'--out', 'y'"}[module]
    probe = (
        "import sys, runpy\n"
        f"sys.argv = ['{module}', '--model', 'no/such-model', {flags}]\n"
        "import atexit, os\n"
        "atexit.register(lambda: print('HF_HOME=' + os.environ.get('HF_HOME', ''), "
        "'constants=' + __import__('huggingface_hub').constants.HF_HOME))\n"
        f"runpy.run_module('{module}', run_name='__main__')\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HOME", "HF_HUB_CACHE")}
    env.update(HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    result = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert f"HF_HOME={hf_home} constants={hf_home}" in result.stdout, result.stderr[-2000:]
