"""A stopped run loses nothing: signals, the stop agreed at a step boundary, the clock.

In-process: the handlers (first signal recorded, second Ctrl-C interrupts, old handlers back),
the torchrun grace-period warning, and loader workers that outlive a Ctrl-C. Through torchrun
with two gloo ranks: SIGTERM to the launcher and SIGINT to one worker each stop the run with a
checkpoint at that step and exit code 75, and the resumed run ends bit-identical to an
uninterrupted one; checkpoints by the clock come on schedule.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from datetime import datetime
from pathlib import Path

import pytest
import torch

from tests._trainer_run import REPO, run_trainer, sample_log, trainer_command, weights
from trainer.data.loader import DataConfig, TrainData
from trainer.runtime import checkpoint as ckpt
from trainer.runtime import preemption
from trainer.runtime.checkpoint import CheckpointConfig
from trainer.runtime.distributed import Dist

STEPS = 6
RUN_ARGS = ("--max-steps", str(STEPS), "--save-every", "2", "--eval-every", "0", "--keep-last", "9")
MODES = {"packed": ("--pack", "true"), "unpacked": ("--pack", "false")}


class _Log:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def warning(self, message: str, *args) -> None:
        self.lines.append(message % args)

    info = warning


# --- in-process -------------------------------------------------------------------------------


def _handlers() -> dict:
    return {number: signal.getsignal(number) for number in preemption.SIGNALS}


def test_first_signal_asks_second_ctrl_c_interrupts_and_old_handlers_come_back(tmp_path):
    before = _handlers()
    untouched = preemption.Stopper(CheckpointConfig(), Dist(), _Log(), tmp_path)
    assert _handlers() != before
    untouched.restore()
    assert _handlers() == before, "no stop: the handlers found at start come back"

    stop = preemption.Stopper(CheckpointConfig(), Dist(), _Log(), tmp_path)
    try:
        assert not stop.agree(1, found_inf=False) and not stop.stopping
        os.kill(os.getpid(), signal.SIGTERM)  # recorded, nothing raised
        os.kill(os.getpid(), signal.SIGINT)  # the first Ctrl-C: recorded too
        assert stop.received == signal.SIGTERM, "the first signal is the one reported"
        assert stop.agree(2, found_inf=True), "the inf/NaN flag rides on the same all-reduce"
        assert stop.stopping and stop.checkpoint_due
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
        stop.restore()
        # stopping: a late SIGTERM (torchrun's, once another worker has exited) cannot kill
        # the exit; Ctrl-C works as before
        assert signal.getsignal(signal.SIGTERM) == signal.getsignal(signal.SIGUSR1)
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN
        assert signal.getsignal(signal.SIGINT) == before[signal.SIGINT]
    finally:
        for number, handler in before.items():
            signal.signal(number, handler)

    # torchrun forwards a first Ctrl-C as SIGINT and answers a second by SIGTERMing its workers
    twice = preemption.Stopper(CheckpointConfig(), Dist(), _Log(), tmp_path)
    try:
        os.kill(os.getpid(), signal.SIGINT)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)
    finally:
        twice.restore()
    assert _handlers() == before


def test_clock_makes_a_checkpoint_due_and_a_write_restarts_it(tmp_path):
    stop = preemption.Stopper(
        CheckpointConfig(save_every_minutes=0.5 / 60), Dist(), _Log(), tmp_path
    )
    try:
        stop.agree(1, False)
        assert not stop.clock_due
        time.sleep(0.6)
        stop.agree(2, False)
        assert stop.clock_due and stop.checkpoint_due and not stop.stopping
        with stop.checkpointing(step_seconds=0.1):
            pass
        stop.agree(3, False)
        assert not stop.clock_due
    finally:
        stop.restore()
    off = preemption.Stopper(CheckpointConfig(save_every_minutes=0), Dist(), _Log(), tmp_path)
    off.last_checkpoint -= 1e6
    off.agree(1, False)
    off.restore()
    assert not off.clock_due
    with pytest.raises(ValueError, match="save_every_minutes"):
        CheckpointConfig(save_every_minutes=-1).validate()


def test_grace_warning_names_the_variable_to_raise():
    torchrun = {"TORCHELASTIC_RUN_ID": "x"}
    assert preemption.grace_warning(13.0, 10.0, torchrun) is None  # 23 s fit in 30 s
    warning = preemption.grace_warning(13.0, 25.0, torchrun)
    assert "TORCH_ELASTIC_SHUTDOWN_TIMEOUT" in warning and "38.0 s" in warning, warning
    raised = {**torchrun, preemption.GRACE_VARIABLE: "60"}
    assert preemption.grace_warning(13.0, 25.0, raised) is None
    assert preemption.grace_warning(13.0, 25.0, {}) is None  # no torchrun, no grace period


def test_loader_workers_survive_the_stop_signals(demo_shards):
    """A terminal's Ctrl-C reaches the loader workers too; they must keep serving the step."""
    config = DataConfig(batch_size=2, bucket_buffer=8, num_workers=1, pin_memory=False)
    data = TrainData(demo_shards / "train", config, 0, 1)
    iterator = iter(data.batches(epoch=0))
    count = len([next(iterator)])
    (worker,) = iterator._workers
    for number in preemption.SIGNALS:  # sent by another process, as a terminal or SLURM would
        subprocess.run(["kill", f"-{signal.Signals(number).name[3:]}", str(worker.pid)], check=True)
    time.sleep(0.5)  # a worker that dies of it is gone by now
    assert worker.is_alive()
    count += sum(1 for _ in iterator)  # without the fix: "DataLoader worker exited unexpectedly"
    assert count == data.batches_per_epoch()


# --- two gloo ranks through torchrun ----------------------------------------------------------


def _run(shards, run_dir, mode, hook=None):
    env = {preemption.SIGNAL_HOOK: hook} if hook else {}
    return run_trainer(2, shards, run_dir, *RUN_ARGS, *MODES[mode], env=env, timeout=240)


@pytest.fixture(scope="module")
def reference(demo_shards, module_tmp):
    """One uninterrupted run per mode, made when a test first asks for it."""
    runs = {}

    def get(mode: str) -> Path:
        if mode not in runs:
            run_dir = module_tmp(f"reference-{mode}")
            result = _run(demo_shards, run_dir, mode)
            assert result.returncode == 0, result.stdout[-4000:]
            runs[mode] = run_dir
        return runs[mode]

    return get


def _assert_stopped_at(run_dir: Path, step: int, stopped_by: dict[str, str]) -> None:
    """A checkpoint at the step it stopped on, no rank past it, RUN/stopped.json, the log."""
    steps = [number for number, _ in ckpt.list_checkpoints(run_dir)]
    assert steps[-1] == step, steps  # not the last save_every (every 2 steps)
    record = json.loads((run_dir / preemption.STOPPED_FILE).read_text())
    assert record["step"] == step and record["exit_code"] == preemption.EXIT_STOPPED
    for rank, name in stopped_by.items():
        assert record["signals"][rank] == name, record
    log = (run_dir / "training.log").read_text()
    assert f"stopped at step {step}" in log and "run the same command again" in log
    assert max(sample_log(run_dir, 0)) == step, "no rank went on past the agreed step"
    assert max(sample_log(run_dir, 1)) == step


def _assert_resumes_bit_identical(demo_shards, run_dir: Path, reference: Path, mode: str):
    resumed = _run(demo_shards, run_dir, mode)
    assert resumed.returncode == 0, resumed.stdout[-4000:]
    assert not (run_dir / preemption.STOPPED_FILE).exists(), "a finished run leaves no marker"
    for rank in (0, 1):
        ours, theirs = sample_log(run_dir, rank), sample_log(reference, rank)
        assert sorted(ours) == sorted(theirs) == list(range(1, STEPS + 1))
        for iteration in ours:
            assert ours[iteration]["keys"] == theirs[iteration]["keys"], (rank, iteration)
    final = weights(run_dir / "checkpoints" / f"step-{STEPS}")
    expected = weights(reference / "checkpoints" / f"step-{STEPS}")
    assert final.keys() == expected.keys()
    for name in final:
        assert torch.equal(final[name], expected[name]), name


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["packed", "unpacked"])
def test_sigterm_to_torchrun_stops_with_a_checkpoint_and_resumes_exactly(
    mode, reference, demo_shards, tmp_path
):
    run_dir = tmp_path / "stopped"
    # rank 0 sends SIGTERM to its parent, the launcher, at step 3; torchrun forwards it to both
    stopped = _run(demo_shards, run_dir, mode, hook="3:0:SIGTERM:parent")
    assert "Received 15 death signal" in stopped.stdout, stopped.stdout[-3000:]
    # torchrun raises on a signal of its own: exit code 1, the workers' codes unreported
    assert stopped.returncode == 1, stopped.stdout[-3000:]
    _assert_stopped_at(run_dir, 3, {"rank 0": "SIGTERM"})
    assert [number for number, _ in ckpt.list_checkpoints(run_dir)] == [2, 3]
    _assert_resumes_bit_identical(demo_shards, run_dir, reference(mode), mode)


@pytest.mark.slow
def test_ctrl_c_to_one_worker_stops_every_rank_with_a_checkpoint(reference, demo_shards, tmp_path):
    run_dir = tmp_path / "stopped"
    stopped = _run(demo_shards, run_dir, "packed", hook="3:1:SIGINT")  # rank 1 alone
    # both workers exit 75; torchrun reports each and returns 1 (any worker's non-zero exit)
    assert stopped.returncode == 1, stopped.stdout[-3000:]
    codes = re.findall(r"^\s+exitcode\s*:\s*(-?\d+)", stopped.stdout, flags=re.MULTILINE)
    assert codes == [str(preemption.EXIT_STOPPED)] * 2, (codes, stopped.stdout[-3000:])
    _assert_stopped_at(run_dir, 3, {"rank 1": "SIGINT"})
    _assert_resumes_bit_identical(demo_shards, run_dir, reference("packed"), "packed")


def _log_times(log: str, marker: str) -> list[tuple[datetime, str]]:
    found = []
    for line in log.splitlines():
        if marker in line and line[:1].isdigit():  # a log line, not a report's
            found.append((datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f"), line))
    return found


@pytest.mark.slow
def test_checkpoints_by_the_clock_come_on_schedule(demo_shards, tmp_path):
    # seconds; a tiny-preset step takes 0.05-0.4 s (idle to loaded 2-core machine), so 40 steps
    # outlast several intervals on any machine (checked below, so the test cannot pass vacuously)
    interval = 0.5
    args = ("--max-steps", "40", "--save-every", "0", "--eval-every", "0", "--keep-last", "1000")
    minutes = ("--save-every-minutes", str(interval / 60), "--pack", "false")
    # no grace at all: the first checkpoint must warn that a step plus a write outlast it
    env = {preemption.GRACE_VARIABLE: "0"}
    result = run_trainer(2, demo_shards, tmp_path, *args, *minutes, env=env, timeout=240)
    assert result.returncode == 0, result.stdout[-4000:]
    steps = [number for number, _ in ckpt.list_checkpoints(tmp_path)]
    log = (tmp_path / "training.log").read_text()
    first, last = _log_times(log, " INFO step 1:")[0][0], _log_times(log, " INFO step 40:")[0][0]
    assert (last - first).total_seconds() >= 2 * interval, "the run was too fast to test the clock"
    assert len(steps) >= 2 and steps[-1] == 40, steps  # save_every 0: only the end, but the clock
    assert log.count(f"Set {preemption.GRACE_VARIABLE}=") == 1, "warned at the first one only"
    step_time = {
        int(line.split("step ")[1].split(":")[0]): when
        for when, line in _log_times(log, " INFO step ")
    }
    start = _log_times(log, "starting a new run")[0][0]
    # The clock restarts when train() begins (after "starting a new run") and after each write
    # (after its "checkpoint written" line); a step's agreement comes before its log line.
    restarted, previous = start, 0
    for step in steps[:-1]:
        # due: the agreement at this step came a whole interval after the restart
        assert (step_time[step] - restarted).total_seconds() >= interval, (step, steps)
        # not late: at the step before, the interval had not passed; the step line two steps
        # back precedes that agreement, the first step line after a restart follows the restart
        if step - 2 >= previous + 1:
            waited = (step_time[step - 2] - step_time[previous + 1]).total_seconds()
            assert waited < interval, (step, steps)
        written = [
            when
            for when, line in _log_times(log, "checkpoint written")
            if line.endswith(f"-{step}")
        ]
        restarted, previous = written[0], step


def _ctrl_c(demo_shards, run_dir: Path, presses: int) -> tuple[int, str]:
    """A single-process run and a terminal's Ctrl-C: SIGINT to its whole process group (the
    loader workers included), `presses` times, each once the previous one was acknowledged."""
    args = ("--max-steps", "200", "--save-every", "100", "--eval-every", "0", "--num-workers", "2")
    process = subprocess.Popen(
        trainer_command(1, demo_shards, run_dir, *args),
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    lines, sent = [], 0
    try:
        for line in process.stdout:
            lines.append(line)
            first = "INFO step 2:" in line and sent == 0
            if first or ("SIGINT received" in line and 0 < sent < presses):
                os.killpg(process.pid, signal.SIGINT)
                sent += 1
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        raise AssertionError(f"no exit within 60 s of Ctrl-C:\n{''.join(lines)[-3000:]}") from None
    return process.returncode, "".join(lines)


@pytest.mark.slow
def test_ctrl_c_in_a_terminal_stops_with_75_and_twice_stops_at_once(demo_shards, tmp_path):
    code, output = _ctrl_c(demo_shards, tmp_path / "once", presses=1)
    assert code == preemption.EXIT_STOPPED, output[-3000:]
    stopped_at = json.loads((tmp_path / "once" / preemption.STOPPED_FILE).read_text())["step"]
    assert ckpt.latest_checkpoint(tmp_path / "once").name == f"step-{stopped_at}"

    code, output = _ctrl_c(demo_shards, tmp_path / "twice", presses=2)
    assert code == -signal.SIGINT, output[-3000:]  # KeyboardInterrupt: what a shell shows as 130
    assert "KeyboardInterrupt" in output and "stopped at step" not in output
