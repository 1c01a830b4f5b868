"""Real DDP: two gloo ranks on the CPU through torchrun, the tiny preset and the demo shards.

One reference run (6 steps, an inf gradient forced on rank 0 at step 3) serves three tests;
a second run is SIGKILLed at step 5 and resumed, and must end bit-identical to the reference.
The skipped attempt at step 3 is an iteration of its own: 7 iterations make the 6 steps.
Two more ranks are spawned in-process to look at what DDP and ZeRO-1 hold in memory.
"""

from __future__ import annotations

import gc
import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.distributed.optim import ZeroRedundancyOptimizer

from tests._trainer_run import (
    TINY_MODEL,
    last_step,
    metrics,
    run_trainer,
    sample_log,
    spawn_ranks,
    weights,
)
from trainer import plan
from trainer.loop import wrap_for_ddp, zero_gradients
from trainer.model import (
    ModelConfig,
    decoder_inputs_and_labels,
    load_model,
    token_loss,
    window_frames,
)
from trainer.runtime import checkpoint as ckpt
from trainer.runtime.distributed import Dist
from trainer.runtime.optim import (
    OptimConfig,
    build_scheduler,
    lr_factor,
    optimizer_checkpoint_state,
    parameter_names,
    restore_optimizer,
)

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
def reference_run(demo_shards, module_tmp):
    run_dir = module_tmp("ddp-reference")
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
    training, rng = ckpt.load_training_files(newest)  # weights_only=True inside
    assert training["step"] == STEPS and training["world_size"] == 2
    # without ZeRO-1 every rank holds the same AdamW state: rank 0 writes it once
    assert (newest / "optimizer.pt").is_file() and not list(newest.glob("optimizer-rank*"))
    optimizer, is_shard = ckpt.load_optimizer_state(newest, 1, 2)
    assert not is_shard and optimizer["state"]
    assert len(rng) == 2, "one RNG state per rank"
    assert (reference_run / "config.json").is_file()
    from transformers import WhisperForConditionalGeneration

    WhisperForConditionalGeneration.from_pretrained(reference_run / "best")


def test_inf_gradient_skips_exactly_that_step_on_both_ranks(reference_run):
    for rank in (0, 1):
        log = sample_log(reference_run, rank)
        assert sorted(log) == list(range(1, STEPS + 2)), "6 steps and one skipped attempt"
        skipped = [iteration for iteration, entry in log.items() if entry["skipped"]]
        assert skipped == [INF_STEP], (rank, skipped)
        # the skipped attempt left the step counter where it was; the next batches made step 3
        assert [log[i]["step"] for i in range(1, STEPS + 2)] == [1, 2, 2, 3, 4, 5, 6]
    rows = metrics(reference_run)
    assert [row["step"] for row in rows] == list(range(1, STEPS + 1))
    assert [row["skipped_steps"] for row in rows] == [0, 0, 1, 1, 1, 1]
    # nor did the schedule move: the lr after step k is the schedule's k-th value
    # (FAST: lr 3e-3, no warm-up, linear decay over the 6 steps)
    for row in rows:
        expected = 3e-3 * lr_factor(row["step"], 0, STEPS, "linear")
        assert row["lr"] == pytest.approx(expected, rel=1e-12, abs=1e-15), row
    # the two ranks consumed disjoint samples every iteration
    for iteration in range(1, STEPS + 2):
        keys0 = sample_log(reference_run, 0)[iteration]["keys"]
        keys1 = sample_log(reference_run, 1)[iteration]["keys"]
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

    # the same samples, iteration by iteration (the skipped one included), on both ranks
    for rank in (0, 1):
        ours, theirs = sample_log(run_dir, rank), sample_log(reference_run, rank)
        assert sorted(ours) == list(range(1, STEPS + 2))
        for iteration in range(1, STEPS + 2):
            assert ours[iteration]["keys"] == theirs[iteration]["keys"], (rank, iteration)
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
    state sharded by ZeroRedundancyOptimizer, gradient checkpointing; every rank writes its own
    share of the AdamW state, and a SIGKILLed run resumes from them bit-identical."""
    args = ("--max-steps", "4", "--save-every", "2", "--eval-every", "0")
    args += ("--precision", precision, "--zero1", "true", "--gradient-checkpointing", "true")
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
    assert ckpt.latest_checkpoint(tmp_path / "killed").name == "step-2"
    _assert_two_disjoint_shards(ckpt.latest_checkpoint(tmp_path / "killed"))
    resumed = run_trainer(2, demo_shards, tmp_path / "killed", *args, env=hooks)
    assert resumed.returncode == 0, resumed.stdout[-4000:]
    assert "resuming from" in resumed.stdout and "step-2" in resumed.stdout
    _assert_two_disjoint_shards(tmp_path / "killed" / "checkpoints" / "step-4")
    final = weights(tmp_path / "killed" / "checkpoints" / "step-4")
    expected = weights(tmp_path / "reference" / "checkpoints" / "step-4")
    assert final.keys() == expected.keys()
    for name in final:
        assert torch.equal(final[name], expected[name]), name


def _assert_two_disjoint_shards(folder) -> None:
    """A ZeRO-1 checkpoint of two ranks: one file per rank, no consolidated state, and the
    shares together cover every trainable parameter once."""
    names = sorted(path.name for path in folder.glob("optimizer*.pt"))
    assert names == ["optimizer-rank0-of-2.pt", "optimizer-rank1-of-2.pt"], names
    shares = [ckpt.load_optimizer_state(folder, rank, 2) for rank in (0, 1)]
    assert all(is_shard for _, is_shard in shares)
    sizes = [sum(s["exp_avg"].numel() for s in state["state"].values()) for state, _ in shares]
    model, _ = load_model(ModelConfig(name_or_path=str(TINY_MODEL)))
    assert min(sizes) > 0
    assert sum(sizes) == sum(p.numel() for p in model.parameters() if p.requires_grad)


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


# --- what DDP and ZeRO-1 hold, in memory, on two spawned gloo ranks ---------------------------


def _micro_batch(ddp, seed: int) -> None:
    """One forward and backward of the trainer's loss on a random batch of the model's shape."""
    config = ddp.module.config
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(2, config.num_mel_bins, window_frames(config), generator=generator)
    tokens = torch.randint(0, config.vocab_size, (2, 10), generator=generator)
    inputs, labels = decoder_inputs_and_labels(tokens, config.pad_token_id)
    torch.manual_seed(seed)  # dropout draws the same masks in the runs compared
    logits = ddp(input_features=features, decoder_input_ids=inputs).logits
    summed, count = token_loss(logits, labels)
    (summed / count).backward()


def _storages(tensors) -> dict[int, int]:
    """data pointer -> bytes of every distinct storage behind the tensors."""
    return {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}


def _tensors_in(obj) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for value in obj.values() for t in _tensors_in(value)]
    if isinstance(obj, list | tuple):
        return [t for value in obj for t in _tensors_in(value)]
    return []


def _optimizer_bytes(optimizer) -> int:
    """Bytes of every tensor reachable from ZeRO: the wrapper's own state, the inner
    optimiser's state and the buffers consolidate_state_dict would fill."""
    reachable = _tensors_in(dict(optimizer.state)) + _tensors_in(dict(optimizer.optim.state))
    reachable += _tensors_in(optimizer._all_state_dicts)
    return sum(_storages(reachable).values())


def _trainer_pieces(rank: int):
    """Model (gradient checkpointing on), DDP and ZeRO-1 AdamW as loop.setup builds them on
    CUDA, fused kernel included (torch has a fused AdamW for the CPU too)."""
    model, processor = load_model(ModelConfig(name_or_path=str(TINY_MODEL)))  # seeded init
    info = Dist(rank, 2, 0, torch.device("cpu"))
    model.train()
    ddp = wrap_for_ddp(model, info)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = ZeroRedundancyOptimizer(
        trainable, optimizer_class=torch.optim.AdamW, lr=1e-3, fused=True
    )
    scheduler = build_scheduler(optimizer, OptimConfig(lr=1e-3, warmup_steps=0), total_steps=4)
    return info, model, processor, ddp, optimizer, scheduler


def _resume_rank(rank: int, init_file: str, run_dir: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        info, model, processor, ddp, optimizer, scheduler = _trainer_pieces(rank)
        trainable = [p for p in model.parameters() if p.requires_grad]
        exist = all(p.grad is not None for p in trainable)
        built = _storages(p.grad for p in trainable if p.grad is not None)  # before backward
        with ddp.no_sync():
            _micro_batch(ddp, seed=rank)
        after_no_sync = _storages(p.grad for p in trainable)
        _micro_batch(ddp, seed=10 + rank)
        optimizer.step()
        zero_gradients(optimizer, under_ddp=True)
        scheduler.step()  # the lr of step 2 is in ZeRO's wrapper, not yet in its inner optimiser
        folder = ckpt.save_checkpoint(
            info, run_dir, 1, model, processor, optimizer_checkpoint_state(optimizer, model), True,
            {"step": 1}, [], {},
        )  # fmt: skip

        # a resumed rank: weights and this rank's shard from the checkpoint
        _, resumed_model, _, resumed_ddp, resumed, resumed_scheduler = _trainer_pieces(rank)
        ckpt.load_model_weights(resumed_model, folder)
        restore_optimizer(resumed, *ckpt.load_optimizer_state(folder, rank, 2))
        resumed_scheduler.load_state_dict(scheduler.state_dict())
        same_lr = resumed.param_groups[0]["lr"] == optimizer.param_groups[0]["lr"]
        pairs = [
            (param, resumed.optim.state[param], optimizer.optim.state[original])
            for group, original_group in zip(
                resumed.optim.param_groups, optimizer.optim.param_groups, strict=True
            )
            for param, original in zip(group["params"], original_group["params"], strict=True)
        ]
        placement_ok = all(
            value.device == param.device
            and value.dtype == (torch.float32 if name == "step" else param.dtype)
            for param, state, _ in pairs
            for name, value in state.items()
        )
        values_equal = all(
            torch.equal(state[name], saved[name]) for _, state, saved in pairs for name in state
        )
        resumed_bytes = _optimizer_bytes(resumed)
        # one more step from both: the resumed rank must stay bit-identical
        for target_ddp, target_optimizer in ((ddp, optimizer), (resumed_ddp, resumed)):
            _micro_batch(target_ddp, seed=20 + rank)
            target_optimizer.step()
        same_after_step = all(
            torch.equal(a, b)
            for a, b in zip(
                model.state_dict().values(), resumed_model.state_dict().values(), strict=True
            )
        )

        # zero1 switched on over a checkpoint with one whole AdamW state (or an older one)
        switched = _trainer_pieces(rank)[4]
        whole = torch.optim.AdamW(trainable, lr=1e-3)
        for param in trainable:
            param.grad = torch.ones_like(param)
        whole.step()
        restore_optimizer(switched, whole.state_dict(), is_shard=False)
        Path(out_dir, f"rank{rank}.json").write_text(
            json.dumps(
                {
                    "grads_exist_before_backward": exist,
                    "built": list(built.values()),
                    "no_sync_same_storages": after_no_sync == built,
                    "optimizer_bytes": resumed_bytes,
                    "wrapper_state": len(resumed.state),
                    "placement_ok": placement_ok,
                    "values_equal": values_equal,
                    "same_lr": same_lr,
                    "same_after_step": same_after_step,
                    "switched_bytes": _optimizer_bytes(switched),
                    "switched_wrapper_state": len(switched.state),
                }
            )
        )
        dist.barrier()  # torn down in order, as tests/test_plan.py explains
        del ddp, resumed_ddp, optimizer, resumed, switched
        gc.collect()
    finally:
        dist.destroy_process_group()


def test_zero1_resume_holds_exactly_the_plans_share_and_gradients_start_in_buckets(tmp_path):
    """After a resume each rank's optimiser holds its ZeRO share and nothing more (no copy in
    ZeRO's wrapper, none consolidated); every state tensor sits on its parameter's device and
    dtype; and the first no_sync micro-batch of a fresh run already writes into DDP's buckets."""
    run_dir = tmp_path / "run"
    spawn_ranks(_resume_rank, (str(tmp_path / "init"), str(run_dir), str(tmp_path)))
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    model, _ = load_model(ModelConfig(name_or_path=str(TINY_MODEL)))
    predicted = plan.model_state_bytes(model, world_size=2, zero1=True)
    folder = run_dir / "checkpoints" / "step-1"
    assert sorted(p.name for p in folder.glob("optimizer*")) == [
        "optimizer-rank0-of-2.pt",
        "optimizer-rank1-of-2.pt",
    ]
    for rank, held in enumerate(ranks):
        assert held["grads_exist_before_backward"]
        assert len(held["built"]) <= 4, "gradients are not bucket views from the start"
        assert sum(held["built"]) == predicted["gradients"]
        assert held["no_sync_same_storages"], "the first no_sync backward allocated new grads"
        assert held["optimizer_bytes"] == predicted["optimizer_per_rank"][rank], rank
        assert held["wrapper_state"] == 0
        assert held["placement_ok"] and held["values_equal"]
        assert held["same_lr"] and held["same_after_step"]
        assert held["switched_bytes"] == predicted["optimizer_per_rank"][rank], rank
        assert held["switched_wrapper_state"] == 0
    _assert_shards_merge_by_name_on_one_rank(folder, model)


def _assert_shards_merge_by_name_on_one_rank(folder, model) -> None:
    """On another world size (here one process, no ZeRO) the two shares, merged by parameter
    name, give every trainable parameter exactly the state its owner saved."""
    saved = {}
    for path in sorted(folder.glob("optimizer-rank*")):
        share = torch.load(path, weights_only=True)
        for names, group in zip(share["param_names"], share["param_groups"], strict=True):
            saved.update(
                {n: share["state"][i] for n, i in zip(names, group["params"], strict=True)}
            )
    params = dict(model.named_parameters())
    assert sorted(saved) == sorted(n for n, p in params.items() if p.requires_grad)
    single = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1.0)
    wanted = parameter_names(single, model)
    state, is_shard = ckpt.load_optimizer_state(folder, 0, 1, sharded=False, wanted=wanted)
    restore_optimizer(single, state, is_shard)
    for name, expected in saved.items():
        loaded = single.state[params[name]]
        assert loaded.keys() == expected.keys(), name
        assert all(torch.equal(loaded[k], expected[k]) for k in expected), name
    assert single.param_groups[0]["lr"] == share["param_groups"][0]["lr"] != 1.0
