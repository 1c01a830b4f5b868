"""Resume on another number of GPUs (trainer/runtime/elastic.py): the arithmetic of the settings,
and real runs of the tiny preset on the demo shards in packed mode (the default), 2 gloo ranks.

A 2-rank run (grad_accum 2, ZeRO-1) and a 1-rank run (grad_accum 4) of 6 steps are the
references; each one's checkpoint at step 3 (inside the first epoch) is resumed on the other
world size with the grad_accum of its own command line, which the resume doubles or halves.
Dropout is off and the schedule constant, so the losses of the steps after the resume must
agree with the uninterrupted run's up to the summation order: a lost or mis-merged AdamW
state would show at once.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from tests._trainer_run import metrics, run_trainer, sample_log
from trainer.config import TrainConfig
from trainer.runtime import elastic

STEPS, STOP = 6, 3
ARGS = (
    "--pack",
    "true",
    "--zero1",
    "true",
    "--max-steps",
    str(STEPS),
    "--save-every",
    str(STOP),
    "--eval-every",
    "0",
    "--schedule",
    "constant",
    "--streams",
    "0",  # auto, 8 for 2 ranks x 1 worker (the demo config sets 2)
)
LOG = logging.getLogger("test")


# --- the settings, pure arithmetic -------------------------------------------------------------


def checkpoint(world: int, accum: int, streams: int = 8, **extra) -> dict:
    signature = {"streams": streams, "global_batch": world * accum}
    return {"data_signature": signature, "world_size": world, "batch_in_epoch": 6, **extra}


def settings(accum: int, workers: int = 1, streams: int = 0) -> TrainConfig:
    config = TrainConfig()
    return replace(
        config,
        data=replace(config.data, num_workers=workers, streams=streams),
        optim=replace(config.optim, grad_accum=accum),
    )


def test_a_changed_gpu_count_derives_grad_accum_and_lowers_the_workers():
    resumed = elastic.resume_config(settings(2, 3), checkpoint(2, 2), 1, LOG, Path("ck"))
    assert (resumed.optim.grad_accum, resumed.data.streams, resumed.data.num_workers) == (4, 8, 2)
    resumed = elastic.resume_config(settings(1, 4, 8), checkpoint(4, 1), 2, LOG, Path("ck"))
    assert (resumed.optim.grad_accum, resumed.data.num_workers) == (2, 4)
    resumed = elastic.resume_config(settings(3, 0), checkpoint(2, 3, 12), 3, LOG, Path("ck"))
    assert (resumed.optim.grad_accum, resumed.data.num_workers) == (2, 0)
    # grad_accum set by hand to what keeps the global batch: accepted as given
    resumed = elastic.resume_config(settings(1, 1), checkpoint(1, 2), 2, LOG, Path("ck"))
    assert resumed.optim.grad_accum == 1
    assert elastic.local_batch_in_epoch(checkpoint(2, 2), 1) == 12
    assert elastic.local_batch_in_epoch({**checkpoint(2, 2), "global_batch_in_epoch": 8}, 4) == 2


def test_a_world_size_that_cannot_keep_the_global_batch_is_refused_with_the_numbers():
    with pytest.raises(ValueError) as refused:
        elastic.resume_config(settings(1), checkpoint(2, 1), 3, LOG, Path("ck"))
    message = str(refused.value)
    assert "2 rank(s) x grad_accum 1 = 2 loader batches per optimiser step" in message
    assert "3 rank(s) x grad_accum 1 = 3" in message
    assert "1 GPU(s) with grad_accum 2 and num_workers dividing 8" in message
    assert "2 GPU(s) with grad_accum 1 and num_workers dividing 4" in message
    assert "3 GPU" not in message.split("It resumes on")[1]
    with pytest.raises(ValueError, match="1 rank\\(s\\) x grad_accum 3 = 3"):  # set by hand
        elastic.resume_config(settings(3), checkpoint(2, 2), 1, LOG, Path("ck"))
    with pytest.raises(ValueError, match="set --streams 8"):
        elastic.resume_config(settings(2, streams=16), checkpoint(2, 2), 2, LOG, Path("ck"))
    old = {"data_signature": {"world_size": 2}, "world_size": 2, "batch_in_epoch": 4}
    with pytest.raises(ValueError, match="written before data streams"):
        elastic.resume_config(settings(2), old, 2, LOG, Path("ck"))


def test_gpu_counts_that_work_divide_both_streams_and_global_batch():
    assert elastic.working_gpu_counts(8, 4) == [1, 2, 4]
    assert elastic.working_gpu_counts(12, 8) == [1, 2, 4]
    assert elastic.working_gpu_counts(24, 24) == [1, 2, 3, 4, 6, 8, 12, 24]


# --- real runs ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def references(demo_shards, module_tmp):
    folder = module_tmp("elastic")
    two = run_trainer(2, demo_shards, folder / "two", *ARGS, timeout=180)
    assert two.returncode == 0, two.stdout[-4000:]
    one = run_trainer(1, demo_shards, folder / "one", *ARGS, "--grad-accum", "4", timeout=180)
    assert one.returncode == 0, one.stdout[-4000:]
    return folder / "two", folder / "one"


def step_keys(run_dir: Path, world: int) -> dict[int, set[str]]:
    """step -> the union over ranks of the window keys it trained on."""
    logs = [sample_log(run_dir, rank) for rank in range(world)]
    return {step: {k for log in logs for k in log[step]["keys"]} for step in logs[0]}


def losses(run_dir: Path) -> dict[int, float]:
    return {row["step"]: row["loss"] for row in metrics(run_dir)}


def stopped_at_step(source: Path, target: Path) -> Path:
    """A run folder holding only `source`'s checkpoint at step STOP: a run stopped there."""
    (target / "checkpoints").mkdir(parents=True)
    shutil.copytree(
        source / "checkpoints" / f"step-{STOP}", target / "checkpoints" / f"step-{STOP}"
    )
    return target


@pytest.mark.slow
def test_one_rank_trains_every_step_on_the_windows_of_two(references):
    two, one = references
    expected = step_keys(two, 2)
    assert sorted(expected) == list(range(1, STEPS + 1))
    assert all(len(keys) >= 8 for keys in expected.values())
    assert step_keys(one, 1) == expected
    flat = [k for keys in expected.values() for k in keys]
    assert len(flat) == len(set(flat))  # inside one epoch: no window twice


@pytest.mark.slow
@pytest.mark.parametrize(
    ("stopped_on", "resumed_on", "extra", "message"),
    [
        (2, 1, (), "resuming on 1 rank(s) instead of 2: grad_accum 2 -> 4"),  # FAST's accum 2
        (1, 2, ("--grad-accum", "4"), "resuming on 2 rank(s) instead of 1: grad_accum 4 -> 2"),
    ],
    ids=["two-to-one", "one-to-two"],
)
def test_a_run_resumed_on_another_number_of_ranks_continues_with_the_same_steps(
    references, demo_shards, tmp_path, stopped_on, resumed_on, extra, message
):
    two, one = references
    reference = two if stopped_on == 2 else one
    run_dir = stopped_at_step(reference, tmp_path / "resumed")
    resumed = run_trainer(resumed_on, demo_shards, run_dir, *ARGS, *extra, timeout=120)
    assert resumed.returncode == 0, resumed.stdout[-4000:]
    assert message in resumed.stdout
    ours, theirs = step_keys(run_dir, resumed_on), step_keys(two, 2)
    assert sorted(ours) == list(range(STOP + 1, STEPS + 1))
    for step in ours:
        assert ours[step] == theirs[step], step
    expected = losses(reference)
    for step, loss in losses(run_dir).items():  # from two: the merged ZeRO-1 state is right
        assert loss == pytest.approx(expected[step], rel=1e-5), step


@pytest.mark.slow
def test_a_resume_that_cannot_keep_the_global_batch_is_refused(references, demo_shards, tmp_path):
    two, _ = references
    run_dir = stopped_at_step(two, tmp_path / "refused")
    refused = run_trainer(1, demo_shards, run_dir, *ARGS, "--grad-accum", "3", timeout=120)
    assert refused.returncode == 2, refused.stdout[-4000:]
    assert "1 rank(s) x grad_accum 3 = 3 would train other batches" in refused.stdout
    assert "It resumes on 1 GPU(s) with grad_accum 4" in refused.stdout
    assert not sample_log(run_dir, 0), "a refused resume must not train"
