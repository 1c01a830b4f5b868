"""trainer/runtime/fit.py: choosing the micro-batch (with a fake card), splitting a step into
micro-batches, the out-of-memory fallback, and one two-rank run through the real entry point."""

from __future__ import annotations

import shutil
from types import SimpleNamespace

import pytest
import torch

from tests._trainer_run import REPO, run_trainer, sample_log, weights
from trainer.config import load_config
from trainer.runtime import checkpoint as ckpt
from trainer.runtime import fit
from trainer.runtime.distributed import Dist

GIB = 2**30
BASE = ["--shards", "/data/shards", "--output-dir", "runs/x"]


# --- the choice -------------------------------------------------------------------------------


class FakeCard:
    """A card on which a step of b windows takes fixed + b * per_window bytes, and anything
    above `capacity` runs out of memory; it counts the measurements made."""

    def __init__(self, usable_gib, fixed_gib, per_window_gib, capacity_gib=None):
        self.usable_bytes = int(usable_gib * GIB)
        self.fixed, self.per_window = fixed_gib * GIB, per_window_gib * GIB
        self.capacity = (capacity_gib or usable_gib) * GIB
        self.measured: list[int] = []

    def usable(self) -> int:
        return self.usable_bytes

    def allocated(self) -> int:
        return 3 * GIB  # weights and gradients already on the card

    def step_peak(self, size: int, base: int) -> int | None:
        self.measured.append(size)
        peak = self.fixed + size * self.per_window
        return None if peak > self.capacity else int(peak)


def _config(*argv: str):
    return load_config([*BASE, "--grad-accum", "12", "--bucket-buffer", "48", *argv], environ={})


_MODEL = SimpleNamespace(
    config=SimpleNamespace(num_mel_bins=128, max_source_positions=1500, max_target_positions=448)
)


def _choose(card, *argv, resumed=None):
    layer = torch.nn.Linear(1, 1)
    optimizer = torch.optim.AdamW(layer.parameters())
    for param in layer.parameters():
        optimizer.state[param] = {"step": torch.tensor(1.0)}  # a resumed state: nothing to come
    return fit.fit_micro_batch(
        _config(*argv), Dist(), _MODEL, optimizer, "fp16", resumed, memory=card
    )


def test_auto_picks_the_largest_divisor_of_the_step_that_leaves_the_margin():
    # 24 windows per step (reference 2 x accumulation 12); 15 GiB usable, 1 GiB margin:
    # 2 + 1.5 b <= 14 gives b <= 8; 8 divides 24.
    card = FakeCard(usable_gib=15, fixed_gib=2, per_window_gib=1.5)
    choice = _choose(card, "--batch-size", "auto")
    assert (choice.micro_batch, choice.accumulation, choice.windows) == (8, 3, 24)
    assert len(card.measured) <= 4, card.measured  # a line from two sizes, then a check
    assert "8: 14.0 GiB" in choice.reason and "1.0 GiB margin" in choice.reason


def test_a_size_that_does_not_divide_the_step_is_lowered_to_one_that_does():
    # b <= 5.3 fits, 5 does not divide 24: 4, accumulation 6
    card = FakeCard(usable_gib=11, fixed_gib=2, per_window_gib=1.5)
    choice = _choose(card, "--batch-size", "auto")
    assert (choice.micro_batch, choice.accumulation) == (4, 6)


def test_the_margin_and_the_optimiser_state_still_to_come_count():
    card = FakeCard(usable_gib=15, fixed_gib=2, per_window_gib=1.5)
    assert _choose(card, "--batch-size", "auto", "--memory-margin-gib", "4").micro_batch == 6
    # a fresh run: AdamW's two moments of 0.75 Gi float32 elements (6 GiB) are not there yet
    optimizer = SimpleNamespace(param_groups=[{"params": [_Huge()]}], state={})
    assert fit.missing_optimizer_bytes(optimizer) == 6 * GIB
    choice = fit.fit_micro_batch(
        _config("--batch-size", "auto"), Dist(), _MODEL, optimizer, "fp16", None, memory=card
    )
    assert choice.micro_batch == 4  # 2 + 1.5 b + 6 <= 14


class _Huge:
    """A parameter's size without its memory."""

    def numel(self) -> int:
        return 3 * GIB // 4

    def element_size(self) -> int:
        return 4


def test_missing_optimizer_state_is_zero_once_adamw_has_stepped():
    layer = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(layer.parameters())
    assert fit.missing_optimizer_bytes(optimizer) == 2 * 4 * (4 * 3 + 3)
    layer(torch.ones(2, 4)).sum().backward()
    optimizer.step()
    assert fit.missing_optimizer_bytes(optimizer) == 0


def test_real_out_of_memory_in_a_measurement_counts_as_not_fitting():
    # the line predicts 8, but the card runs out above 10 GiB: the search walks down to 4
    card = FakeCard(usable_gib=15, fixed_gib=2, per_window_gib=1.5, capacity_gib=10)
    assert _choose(card, "--batch-size", "auto").micro_batch == 4


def test_a_resumed_run_keeps_its_micro_batch_unless_it_no_longer_fits():
    card = FakeCard(usable_gib=15, fixed_gib=2, per_window_gib=1.5)
    choice = _choose(card, "--batch-size", "auto", resumed=3)
    assert choice.micro_batch == 3 and card.measured == [3]  # 8 would fit, 3 is kept
    small = FakeCard(usable_gib=9, fixed_gib=2, per_window_gib=1.5)  # b <= 4
    assert _choose(small, "--batch-size", "auto", resumed=6).micro_batch == 4
    assert small.measured == [6, 4]


def test_nothing_fits_is_a_clear_error():
    card = FakeCard(usable_gib=3, fixed_gib=2, per_window_gib=1.5)
    with pytest.raises(fit.CannotFit, match="no micro-batch fits.*3000 frames x 448 positions"):
        _choose(card, "--batch-size", "auto")


def test_a_number_is_used_as_given_and_auto_on_the_cpu_is_the_reference_batch():
    card = FakeCard(usable_gib=15, fixed_gib=2, per_window_gib=1.5)
    assert _choose(card, "--batch-size", "3").micro_batch == 3 and card.measured == []
    assert _choose(card, "--batch-size", "2", resumed=1).micro_batch == 1  # after a fallback
    config = _config("--batch-size", "auto", "--reference-batch-size", "4")
    choice = fit.fit_micro_batch(config, Dist(), None, None, "fp32", None)
    assert (choice.micro_batch, choice.accumulation) == (4, 12)
    assert "reference batch, not measured" in choice.reason


def test_search_from_a_line_uses_few_measurements_for_many_candidates():
    calls = []

    def need(size):
        calls.append(size)
        return 1000 + 10 * size

    size, _ = fit.search_micro_batch(720, 1000 + 10 * 100, need)
    assert size == 90 and len(calls) <= 4  # 90 is the largest divisor of 720 up to 100
    assert fit.search_micro_batch(7, 5, lambda s: 10) == (None, {1: 10})


def test_batch_size_auto_parses_from_flags_environment_and_toml(tmp_path):
    assert _config("--batch-size", "auto").data.batch_size == "auto"
    assert _config("--batch-size", "4").data.batch_size == 4
    assert load_config(BASE, environ={"TRAINER_BATCH_SIZE": "4"}).data.batch_size == 4
    toml = tmp_path / "c.toml"
    toml.write_text('[data]\nbatch_size = "auto"\n[fit]\nreference_batch_size = 4\n')
    config = load_config(["--config", str(toml), *BASE], environ={})
    assert config.data.batch_size == "auto" and config.fit.reference_batch_size == 4
    assert fit.loader_data_config(config).batch_size == 4
    with pytest.raises(ValueError, match="batch_size must be a whole number or auto"):
        _config("--batch-size", "many")
    with pytest.raises(ValueError, match="not a multiple of reference_batch_size"):
        _config("--bucket-buffer", "9")  # auto with the reference batch 2


def test_the_plan_reads_auto_as_the_reference_batch():
    from trainer import plan

    config, _ = plan.resolve(["--batch-size", "auto", "--reference-batch-size", "4"], environ={})
    assert config.data.batch_size == 4


# --- splitting a step -------------------------------------------------------------------------


def _parts(lengths, rows=2):
    parts = []
    for number, length in enumerate(lengths):
        n = rows[number] if isinstance(rows, list) else rows
        features = torch.full((n, 3, 5), float(number)) + torch.arange(n)[:, None, None]
        inputs = torch.randint(0, 5, (n, length))
        labels = torch.randint(0, 5, (n, length))
        parts.append((features, inputs, labels))
    return parts


def _rows(parts):
    return [(f, i, lab) for p in parts for f, i, lab in zip(*p, strict=True)]


def test_split_keeps_the_windows_in_order_and_pads_across_loader_batches():
    parts = _parts([3, 5, 4])  # three loader batches of 2 windows
    untouched = fit.split_micro_batches(parts, 2, 7, 2)  # exactly the loader batches
    assert all(c is p for c, p in zip(untouched, parts, strict=True))
    for size in (1, 3, 6):
        chunks = fit.split_micro_batches(parts, size, 7, 2)
        assert [c[0].shape[0] for c in chunks] == [size] * (6 // size)
        for (f, i, lab), (want_f, want_i, want_lab) in zip(
            _rows(chunks), _rows(parts), strict=True
        ):
            n = want_i.shape[0]
            assert torch.equal(f, want_f)
            assert torch.equal(i[:n], want_i) and torch.equal(lab[:n], want_lab)
            assert (i[n:] == 7).all() and (lab[n:] == -100).all()
    with pytest.raises(ValueError, match="6 windows do not split into micro-batches of 4"):
        fit.split_micro_batches(parts, 4, 7, 2)
    with pytest.raises(ValueError, match="a loader batch holds more than 1 windows"):
        fit.split_micro_batches(parts, 1, 7, 1)


def test_split_of_short_batches_gives_every_rank_the_same_number_of_micro_batches():
    # an epoch's end: loader batches of 2, the second and fourth hold one window only
    parts = _parts([3, 5, 4, 6], rows=[2, 1, 2, 1])
    as_loaded = fit.split_micro_batches(parts, 2, 7, 2)
    assert all(c is p for c, p in zip(as_loaded, parts, strict=True))  # as the loader made them
    chunks = fit.split_micro_batches(parts, 1, 7, 2)
    assert len(chunks) == 8 and [c is None for c in chunks].count(True) == 2
    assert chunks[3] is None and chunks[7] is None  # the missing second windows
    present = [c for c in chunks if c is not None]
    assert all(torch.equal(a[0][0], b) for a, (b, _, _) in zip(present, _rows(parts), strict=True))
    assert [c[0].shape[0] for c in fit.split_micro_batches(parts, 4, 7, 2)] == [3, 3]


# --- the fallback, in one process -------------------------------------------------------------


class _Log:
    def __init__(self):
        self.warnings = []

    def warning(self, message, *args):
        self.warnings.append(message % args)


def _step(model, parts, size, fail_at_size=None, fail_in="forward", dropout=0.5):
    """One step through an Accumulator; the last micro-batch's forward raises OOM while the
    micro-batch is larger than `fail_at_size`. Returns (gradients, totals, accumulator, log)."""
    windows = len(parts) * max(p[0].shape[0] for p in parts)  # as if every batch were full
    log = _Log()
    accumulator = fit.Accumulator(fit.Choice(size, windows, "test"), Dist(), model, model, 0, log)

    def forward(micro):
        out = torch.nn.functional.dropout(model(micro.features.flatten(1)), dropout)
        # the last micro-batch fails after drawing dropout, the others' gradients accumulated
        if fail_in == "forward" and _fails(micro, fail_at_size):
            raise torch.OutOfMemoryError("fake")
        summed = (out.sum(1) * (micro.labels != -100).sum(1)).sum()
        count = (micro.labels != -100).sum()
        return summed / count / micro.accumulation, summed, count

    def backward(loss, micro):
        loss.backward()
        if fail_in == "backward" and _fails(micro, fail_at_size):
            raise torch.OutOfMemoryError("fake")  # after the gradients were added

    totals = accumulator.run(1, parts, forward, backward)
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    return grads, totals, accumulator, log


def _fails(micro, fail_at_size) -> bool:
    return fail_at_size is not None and micro.last and micro.features.shape[0] > fail_at_size


@pytest.mark.parametrize("fail_in", ["forward", "backward"])
def test_out_of_memory_halves_and_redoes_the_step_exactly(fail_in):
    torch.manual_seed(0)
    model = torch.nn.Linear(15, 2)
    parts = _parts([3, 5, 4, 6])  # 8 windows per step, loader batch 2
    torch.manual_seed(1)
    expected, expected_totals, _, _ = _step(model, parts, 1)  # at micro-batch 1 throughout
    torch.manual_seed(1)
    grads, totals, accumulator, log = _step(model, parts, 4, 1, fail_in)  # 4 -> 2 -> 1
    assert accumulator.micro_batch == 1 and accumulator.choice.accumulation == 8
    assert [step for step, _ in accumulator.fallbacks] == [1, 1]
    assert "redoing the step from the same 8 windows per rank at micro-batch 2" in log.warnings[0]
    # dropout drew the same masks (the RNG was put back), the same windows, the same sums
    assert all(torch.equal(a, b) for a, b in zip(grads, expected, strict=True))
    assert totals == expected_totals


def test_a_micro_batch_without_windows_runs_at_zero_weight():
    torch.manual_seed(0)
    model = torch.nn.Linear(15, 2)
    parts = _parts([3, 5, 4, 6], rows=[2, 1, 2, 1])  # 6 of 8 windows: 2 micro-batches empty
    grads, totals, _, _ = _step(model, parts, 1, dropout=0.0)
    for features, _, _ in _rows(parts):  # each present window's mean loss, at weight 1/8
        (model(features.flatten()[None]).sum() / 8).backward()
    expected = [param.grad for param in model.parameters()]
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads, expected, strict=True))
    assert totals[1] == sum(lab.numel() for _, _, lab in _rows(parts))


def test_out_of_memory_at_micro_batch_one_stops_with_a_clear_error():
    model = torch.nn.Linear(15, 2)
    with pytest.raises(fit.CannotFit, match="out of memory at micro-batch 1"):
        _step(model, _parts([3, 5]), 2, fail_at_size=0)


# --- two ranks through the real entry point ---------------------------------------------------

RUN_ARGS = (
    "--batch-size",
    "auto",  # on the CPU: the reference batch, 2
    "--reference-batch-size",
    "2",
    "--max-steps",
    "4",
    "--save-every",
    "1",
    "--keep-last",
    "10",
    "--eval-every",
    "0",
    "--dropout",
    "0.1",  # the redone step must draw the same dropout masks
    "--gradient-checkpointing",
    "true",
    "--precision",
    "fp16",  # the GPU default's GradScaler and ZeRO-1 state, on gloo
    "--zero1",
    "true",
)
OOM_STEP = 2


@pytest.mark.slow
def test_two_ranks_fall_back_on_out_of_memory_and_match_a_run_at_the_halved_batch(
    demo_shards, tmp_path
):
    """Rank 0's forward runs out of memory in the last (synchronised) micro-batch of step 2.
    Both ranks halve to micro-batch 1 x accumulation 4 and redo the step; the run is killed
    at step 3 and resumed. It ends bit-identical to a run that switched to micro-batch 1
    at step 2 by resuming from step 1's checkpoint with the stored micro-batch set to 1."""
    run = tmp_path / "fallback"
    hooks = {fit.OOM_HOOK: str(OOM_STEP)}
    killed = run_trainer(
        2, demo_shards, run, *RUN_ARGS, env={**hooks, "TRAINER_DEBUG_KILL_AT_STEP": "3"}
    )
    assert killed.returncode != 0, "the kill hook did not fire"
    log = (run / "training.log").read_text()
    assert "micro-batch 2 x accumulation 2 x 2 rank(s) = 8 windows per step" in log
    assert "batch_size auto on cpu" in log
    assert (
        f"step {OOM_STEP}: out of memory on at least one rank at micro-batch 2: redoing the "
        "step from the same 4 windows per rank at micro-batch 1 x accumulation 4" in log
    )
    # the checkpoint after the fallback stores it; the one before does not know of it
    training, _ = ckpt.load_training_files(run / "checkpoints" / "step-2")
    assert training["micro_batch_size"] == 1
    before = run / "checkpoints" / "step-1"
    assert ckpt.load_training_files(before)[0]["micro_batch_size"] == 2

    # the reference: from step 1's checkpoint (written before the fallback), micro-batch 1
    reference = tmp_path / "reference"
    shutil.copytree(before, reference / "checkpoints" / "step-1")
    state = torch.load(reference / "checkpoints" / "step-1" / "training.pt", weights_only=True)
    torch.save({**state, "micro_batch_size": 1}, reference / "checkpoints/step-1/training.pt")
    expected = run_trainer(2, demo_shards, reference, *RUN_ARGS)
    assert expected.returncode == 0, expected.stdout[-4000:]
    assert "kept from the checkpoint" in (reference / "training.log").read_text()

    resumed = run_trainer(2, demo_shards, run, *RUN_ARGS, env=hooks)
    assert resumed.returncode == 0, resumed.stdout[-4000:]
    log = (run / "training.log").read_text()
    assert "resuming from" in log and "micro-batch 1 x accumulation 4" in log

    for rank in (0, 1):  # the same windows made up every step
        ours, theirs = sample_log(run, rank), sample_log(reference, rank)
        for step in range(OOM_STEP, 5):
            assert ours[step]["keys"] == theirs[step]["keys"], (rank, step)
    final, wanted = weights(run / "checkpoints/step-4"), weights(reference / "checkpoints/step-4")
    assert final.keys() == wanted.keys()
    for name in final:
        assert torch.equal(final[name], wanted[name]), name


def test_turbo_config_asks_for_auto():
    config = load_config(["--config", str(REPO / "config/turbo-2x16gb.toml"), *BASE], environ={})
    assert config.data.batch_size == "auto" and config.fit.reference_batch_size == 2
