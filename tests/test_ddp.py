"""Real DDP: two gloo ranks on the CPU through torchrun, the tiny preset and the demo shards.

One reference run (6 steps, an inf gradient forced on rank 0 at step 3) serves three tests;
a second run is SIGKILLed at step 5 and resumed, and must end bit-identical to the reference.
"""

from __future__ import annotations

import pytest
import torch

from tests._trainer_run import last_step, metrics, run_trainer, sample_log, weights
from trainer import checkpoint as ckpt

pytestmark = pytest.mark.slow

STEPS = 6
INF_STEP = 3
KILL_STEP = 5
RUN_ARGS = (
    "--max-steps",
    str(STEPS),
    "--save-every",
    "2",
    "--eval-every",
    "3",
    "--keep-last",
    "2",
    "--dropout",
    "0.1",
)  # dropout: resume must restore RNG
HOOKS = {"TRAINER_DEBUG_INF_AT_STEP": str(INF_STEP)}


@pytest.fixture(scope="module")
def reference_run(demo_shards, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("ddp-reference")
    result = run_trainer(2, demo_shards, run_dir, *RUN_ARGS, env=HOOKS)
    assert result.returncode == 0, result.stdout[-4000:]
    return run_dir


def test_two_ranks_train_evaluate_and_checkpoint(reference_run):
    losses = [row["loss"] for row in metrics(reference_run)]
    assert len(losses) == STEPS
    # the loss goes down on the demo data (mean per target token over both ranks)
    assert losses[-1] < losses[0] - 0.3, losses
    evals = metrics(reference_run, "eval")
    assert [row["step"] for row in evals] == [3, 6]
    assert all(row["wer_normalised"] >= 0.0 for row in evals)
    # keep_last 2; the best (evaluated at step 3, no checkpoint there) lives in RUN/best
    assert [step for step, _ in ckpt.list_checkpoints(reference_run)] == [4, 6]
    newest = ckpt.latest_checkpoint(reference_run)
    training, optimizer, rng = ckpt.load_training_files(newest)  # weights_only=True inside
    assert training["step"] == STEPS and training["world_size"] == 2
    assert len(rng) == 2, "one RNG state per rank"
    assert (reference_run / "config.json").is_file()
    from transformers import WhisperForConditionalGeneration

    WhisperForConditionalGeneration.from_pretrained(reference_run / "best")


def test_inf_gradient_skips_exactly_that_step_on_both_ranks(reference_run):
    for rank in (0, 1):
        skipped = [
            step for step, entry in sample_log(reference_run, rank).items() if entry["skipped"]
        ]
        assert skipped == [INF_STEP], (rank, skipped)
    assert [row["skipped_steps"] for row in metrics(reference_run)] == [0, 0, 1, 1, 1, 1]
    # the two ranks consumed disjoint samples every step
    for step in range(1, STEPS + 1):
        keys0 = sample_log(reference_run, 0)[step]["keys"]
        keys1 = sample_log(reference_run, 1)[step]["keys"]
        assert not set(keys0) & set(keys1)


def test_sigkill_then_resume_matches_uninterrupted_run(reference_run, demo_shards, tmp_path):
    run_dir = tmp_path / "killed"
    killed = run_trainer(
        2,
        demo_shards,
        run_dir,
        *RUN_ARGS,
        env={**HOOKS, "TRAINER_DEBUG_KILL_AT_STEP": str(KILL_STEP)},
    )
    assert killed.returncode != 0, "the kill hook did not fire"
    assert last_step(run_dir, 0) == KILL_STEP - 1
    assert ckpt.latest_checkpoint(run_dir).name == "step-4"

    resumed = run_trainer(2, demo_shards, run_dir, *RUN_ARGS, env=HOOKS)
    assert resumed.returncode == 0, resumed.stdout[-4000:]
    log = (run_dir / "training.log").read_text()
    assert "resuming from" in log and "step-4" in log

    # the same samples, step by step, on both ranks
    for rank in (0, 1):
        ours, theirs = sample_log(run_dir, rank), sample_log(reference_run, rank)
        assert sorted(ours) == list(range(1, STEPS + 1))
        for step in range(1, STEPS + 1):
            assert ours[step]["keys"] == theirs[step]["keys"], (rank, step)
    # and bit-identical final weights
    final, reference = (
        weights(run_dir / "checkpoints" / f"step-{STEPS}"),
        weights(reference_run / "checkpoints" / f"step-{STEPS}"),
    )
    assert final.keys() == reference.keys()
    for name in final:
        assert torch.equal(final[name], reference[name]), name


@pytest.mark.parametrize("precision", ["fp16"])  # bf16 passes too (the same path less the scaler)
def test_half_precision_with_zero1_resumes_exactly(precision, demo_shards, tmp_path):
    """The GPU settings on gloo: autocast (CPU kernels here), the GradScaler for fp16, AdamW
    state sharded by ZeroRedundancyOptimizer; a SIGKILLed run resumes bit-identical."""
    args = ("--max-steps", "4", "--save-every", "2", "--eval-every", "0")
    args += ("--precision", precision, "--zero1", "true")
    hooks = {"TRAINER_DEBUG_INF_AT_STEP": "2"}
    reference = run_trainer(2, demo_shards, tmp_path / "reference", *args, env=hooks)
    assert reference.returncode == 0, reference.stdout[-4000:]
    rows = metrics(tmp_path / "reference")
    assert [row["skipped_steps"] for row in rows] == [0, 1, 1, 1]
    if precision == "fp16":  # the scaler halved its scale at the inf step
        assert rows[1]["loss_scale"] == rows[0]["loss_scale"] / 2

    killed = run_trainer(
        2,
        demo_shards,
        tmp_path / "killed",
        *args,
        env={**hooks, "TRAINER_DEBUG_KILL_AT_STEP": "3"},
    )
    assert killed.returncode != 0, "the kill hook did not fire"
    resumed = run_trainer(2, demo_shards, tmp_path / "killed", *args, env=hooks)
    assert resumed.returncode == 0, resumed.stdout[-4000:]
    final = weights(tmp_path / "killed" / "checkpoints" / "step-4")
    expected = weights(tmp_path / "reference" / "checkpoints" / "step-4")
    assert final.keys() == expected.keys()
    for name in final:
        assert torch.equal(final[name], expected[name]), name


def test_packed_windows_resume_exactly_after_sigkill(demo_shards, tmp_path):
    """Packed mode keeps the guarantees: disjoint utterances per rank, equal steps, and a
    SIGKILLed run resumes bit-identical (prompts and timestamp choices included)."""
    args = ("--max-steps", "4", "--save-every", "2", "--eval-every", "0", "--pack", "true")
    args += ("--prompt-probability", "0.5", "--dropout", "0.1")
    reference = run_trainer(2, demo_shards, tmp_path / "reference", *args)
    assert reference.returncode == 0, reference.stdout[-4000:]
    for step in range(1, 5):
        keys0 = sample_log(tmp_path / "reference", 0)[step]["keys"]
        keys1 = sample_log(tmp_path / "reference", 1)[step]["keys"]
        assert keys0 and keys1 and not set(keys0) & set(keys1)
    killed = run_trainer(
        2, demo_shards, tmp_path / "killed", *args, env={"TRAINER_DEBUG_KILL_AT_STEP": "3"}
    )
    assert killed.returncode != 0, "the kill hook did not fire"
    resumed = run_trainer(2, demo_shards, tmp_path / "killed", *args)
    assert resumed.returncode == 0, resumed.stdout[-4000:]
    for rank in (0, 1):
        ours, theirs = (
            sample_log(tmp_path / "killed", rank),
            sample_log(tmp_path / "reference", rank),
        )
        assert [ours[s]["keys"] for s in range(1, 5)] == [theirs[s]["keys"] for s in range(1, 5)]
    final = weights(tmp_path / "killed" / "checkpoints" / "step-4")
    expected = weights(tmp_path / "reference" / "checkpoints" / "step-4")
    for name in final:
        assert torch.equal(final[name], expected[name]), name
