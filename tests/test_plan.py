"""trainer.plan: what it predicts must equal what real optimisers hold and what FLOPs analysis
says, and its verdict must name a fix that fits.

The tiny preset and whisper-base (from the offline config under config/models/, no weights
needed) keep the file fast; turbo itself is only exercised by the documentation's command.
"""

from __future__ import annotations

import contextlib
import gc
import io
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import FakeTensorMode

from tests._trainer_run import spawn_ranks
from trainer import plan
from trainer.__main__ import run as trainer_main
from trainer.loop import wrap_for_ddp, zero_gradients
from trainer.model import ModelConfig, decoder_inputs_and_labels, token_loss, window_frames
from trainer.runtime.distributed import Dist

TINY = str(Path(__file__).resolve().parent.parent / "config" / "models" / "tiny-whisper-de")
BASE = "openai/whisper-base"  # mapped to config/models/whisper-base/config.json


def _real_model(freeze_encoder: bool = False):
    """The tiny preset as the trainer prepares it, with real float32 tensors on the CPU."""
    config = ModelConfig(name_or_path=TINY, freeze_encoder=freeze_encoder)
    torch.manual_seed(0)
    return plan.build_fake_model(config, torch.device("cpu"))


def _backward(model, config) -> None:
    """One forward and backward on a random batch of the model's shape."""
    features = torch.randn(2, config.num_mel_bins, window_frames(config))
    tokens = torch.randint(0, config.vocab_size, (2, 12))
    inputs, labels = decoder_inputs_and_labels(tokens, config.pad_token_id)
    logits = model(input_features=features, decoder_input_ids=inputs).logits
    summed, count = token_loss(logits, labels)
    (summed / count).backward()


def _one_step(model, optimizer) -> None:
    _backward(model, model.config)
    optimizer.step()


def _accumulated_step(ddp, optimizer) -> None:
    """Two micro-batches as the trainer runs them: the first under no_sync, then a step."""
    with ddp.no_sync():
        _backward(ddp, ddp.module.config)
    _backward(ddp, ddp.module.config)
    optimizer.step()


def _state_bytes(optimizer) -> int:
    return sum(
        value.nbytes
        for state in optimizer.state.values()
        for value in state.values()
        if isinstance(value, torch.Tensor)
    )


@pytest.mark.parametrize("freeze_encoder", [False, True])
def test_model_states_equal_what_a_real_adamw_holds(freeze_encoder):
    model = _real_model(freeze_encoder)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-3)
    _one_step(model, optimizer)
    predicted = plan.model_state_bytes(model, world_size=1, zero1=False)

    assert predicted["weights"] == sum(p.nbytes for p in model.parameters())
    assert predicted["gradients"] == sum(p.grad.nbytes for p in trainable)
    assert predicted["optimizer"] == _state_bytes(optimizer)
    if freeze_encoder:  # the encoder has neither gradients nor AdamW states
        assert all(p.grad is None for p in model.model.encoder.parameters())
        encoder = sum(p.numel() for p in model.model.encoder.parameters())
        assert predicted["trainable_parameters"] == predicted["parameters"] - encoder


def _zero_rank(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    from torch.distributed.optim import ZeroRedundancyOptimizer

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        model = _real_model()
        optimizer = ZeroRedundancyOptimizer(
            [p for p in model.parameters() if p.requires_grad],
            optimizer_class=torch.optim.AdamW,
            lr=1e-3,
        )
        ddp = wrap_for_ddp(model, Dist(rank, world_size, 0, torch.device("cpu")))
        for _ in range(2):  # the second accumulation starts from gradients zeroed in place
            _accumulated_step(ddp, optimizer)
            gradients = [p.grad for p in model.parameters() if p.requires_grad]
            zero_gradients(optimizer, under_ddp=True)
        held = _state_bytes(optimizer.optim)  # this rank's share of the AdamW state
        storages = {g.untyped_storage().data_ptr(): g.untyped_storage().nbytes() for g in gradients}
        Path(out_dir, f"rank{rank}.json").write_text(
            json.dumps({"optimizer": held, "gradient_storages": list(storages.values())})
        )
        # Tear down in order: freed after the group, DDP's reducer drops the group's last
        # reference and joins gloo's worker threads while holding the GIL, which deadlocks when
        # a thread still needs the GIL to release a finished broadcast's tensors (seen in CI).
        dist.barrier()
        del ddp, optimizer, gradients
        gc.collect()
    finally:
        dist.destroy_process_group()


def test_zero1_and_ddp_hold_what_the_plan_counts_on_two_ranks(tmp_path):
    """ZeroRedundancyOptimizer's shares equal the plan's; the trainer's DDP keeps the gradients
    in its all-reduce buckets (a few flat storages, not one per parameter), so the plan counts
    them once."""
    spawn_ranks(_zero_rank, (2, str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    held = [rank["optimizer"] for rank in ranks]

    predicted = plan.model_state_bytes(_real_model(), world_size=2, zero1=True)
    assert predicted["optimizer_per_rank"] == held
    assert predicted["optimizer"] == max(held)
    full = plan.model_state_bytes(_real_model(), world_size=1, zero1=False)["optimizer"]
    assert sum(held) == full  # the shares partition the whole state
    for rank in ranks:
        storages = rank["gradient_storages"]
        assert len(storages) <= 4, f"{len(storages)} gradient storages: not bucket views"
        assert sum(storages) == predicted["gradients"]
    assert "ddp_buckets" not in predicted


def _activations(batch_size: int, checkpointing: bool) -> int:
    mode = FakeTensorMode()
    config = ModelConfig(name_or_path=BASE, gradient_checkpointing=checkpointing)
    model = plan.build_fake_model(config, mode)
    return plan.measure_micro_batch(model, mode, batch_size, 40, "fp16").activation_peak


def test_activations_grow_linearly_with_batch_and_shrink_with_checkpointing():
    # From a few samples on, the peak sits where the per-sample tensors dominate (below that,
    # the peak of a + b * batch over the step moves between points with different a and b).
    peaks = {batch: _activations(batch, checkpointing=False) for batch in (8, 16, 32)}
    per_sample = (peaks[16] - peaks[8]) / 8
    assert per_sample > 50 * 2**20  # whisper-base keeps a few hundred MB per 30 s sample
    assert peaks[32] - peaks[16] == pytest.approx(16 * per_sample, rel=0.01)
    # what does not grow with the batch (the float16 copies of the weights, ...) is small
    assert peaks[8] - 8 * per_sample < per_sample
    checkpointed = _activations(32, checkpointing=True)
    assert checkpointed < 0.8 * peaks[32]


def _analytic_flops(config, positions: int) -> int:
    """Forward and backward matmul FLOPs of one Whisper sample (2 per multiply-add)."""
    d, ffn, vocab = config.d_model, config.encoder_ffn_dim, config.vocab_size
    src, frames, mels = config.max_source_positions, 2 * config.max_source_positions, 80
    conv1 = 2 * frames * d * mels * 3
    conv2 = 2 * src * d * d * 3
    encoder_layer = 8 * src * d * d + 4 * src * d * ffn + 4 * src * src * d
    decoder_layer = (
        8 * positions * d * d
        + 4 * positions * positions * d  # self-attention
        + 4 * positions * d * d
        + 4 * src * d * d
        + 4 * positions * src * d  # cross-attention
        + 4 * positions * d * ffn
    )
    logits = 2 * positions * d * vocab
    forward = (
        conv1
        + conv2
        + config.encoder_layers * encoder_layer
        + config.decoder_layers * decoder_layer
        + logits
    )
    return 3 * forward - conv1  # backward = 2x forward; the features need no gradient


def test_flops_of_whisper_base_agree_with_the_analytic_count():
    from transformers import WhisperConfig

    config = WhisperConfig.from_pretrained(plan.model_config_dir(BASE))
    tokens = 64  # 63 decoder positions
    counted = plan.count_model_flops(ModelConfig(name_or_path=BASE), 2, tokens)
    assert counted == pytest.approx(2 * _analytic_flops(config, tokens - 1), rel=0.05)


def test_whisper_base_config_is_the_real_one(whisper_base_dir):
    shipped = json.loads((plan.model_config_dir(BASE) / "config.json").read_text())
    assert shipped == json.loads((whisper_base_dir / "config.json").read_text())


def _options(**values) -> plan.PlanOptions:
    return plan.PlanOptions(context_gib=0.0, **values)


def test_a_config_that_cannot_fit_gets_does_not_fit_and_the_cheapest_fix(monkeypatch):
    argv = ["--name-or-path", BASE, "--batch-size", "4", "--grad-accum", "6", "--zero1", "false"]
    config, _ = plan.resolve(argv + ["--gradient-checkpointing", "false", "--pack", "false"], {})
    # whisper-base on two ranks, one utterance per window: model states ~1.08 GiB (~0.81 with
    # zero1), activations ~1.2 GiB at batch 4 and ~0.6 at batch 2
    monkeypatch.setitem(plan.GPUS, "small", plan.Gpu("a small GPU", 2.0, 10.0, 10.0, "test"))
    result = plan.plan_with_verdict(config, _options(gpu="small"))
    verdict = result["verdict"]
    assert not result["fits"] and not verdict["fits"]
    assert verdict["fix"] == "--zero1 true --batch-size 2 --grad-accum 12"
    assert verdict["fix_headroom"] >= 0
    text = plan.format_plan(result)
    assert "DOES NOT FIT" in text and "Cheapest change that fits: --zero1 true" in text

    # nothing helps on a GPU smaller than the weights alone (every lever already pulled)
    argv = ["--name-or-path", BASE, "--batch-size", "1", "--zero1", "true"]
    config, _ = plan.resolve(argv + ["--freeze-encoder", "true"], environ={})
    monkeypatch.setitem(plan.GPUS, "tiny", plan.Gpu("a tiny GPU", 0.25, 10.0, 10.0, "test"))
    hopeless = plan.plan_with_verdict(config, _options(gpu="tiny"))
    assert hopeless["verdict"]["fix"] is None
    assert "nothing the trainer offers" in plan.format_plan(hopeless)


def test_dry_run_takes_the_trainer_settings_and_reads_the_manifest(tmp_path, monkeypatch):
    shards = tmp_path / "shards"
    (shards / "train").mkdir(parents=True)
    (shards / "train" / "manifest.json").write_text(json.dumps({"num_samples": 12345}))
    monkeypatch.setenv("TRAINER_BATCH_SIZE", "2")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = trainer_main(
            ["--dry-run", "--model", BASE, "--shards", str(shards), "--json"]
            + ["--gpu", "rtx-3090", "--zero1", "true", "--pack", "true"]
        )
    assert code == 0
    result = json.loads(out.getvalue())
    assert result["batch_size"] == 2  # the environment layer applies
    assert result["zero1"] and result["pack"] and result["gpu"] == "rtx-3090"
    assert result["train_samples"] == 12345
    assert result["target_tokens"] == 448  # packed: a full window of planned tokens
    assert result["fits"] and result["verdict"]["fits"]
    assert result["verdict"]["phase"] == result["peak_phase"] in result["phases"]  # named
    memory = result["memory_bytes"]
    assert memory["optimizer"] < plan.adamw_state_bytes([result["trainable_parameters"]])
    assert result["utterances_per_step"] > result["windows_per_step"]  # several per window
    assert result["hours_per_epoch"] == pytest.approx(12345 / result["samples_per_second"] / 3600)


def test_unknown_model_is_a_clear_error(capsys):
    assert plan.main(["--model", "someone/whisper-unknown"]) == 2
    assert "no config.json for 'someone/whisper-unknown'" in capsys.readouterr().err


# --- every phase: evaluation, checkpoint write, first step after a resume ---------------------


def _greedy_decode_bytes(precision: str, rows: int, new_tokens: int) -> int:
    """Peak bytes the trainer's decoder (HFDecoder: generate under autocast) allocates on the
    tiny preset with real tensors, decoding exactly `new_tokens` per row."""
    from trainer.evaluate import HFDecoder
    from trainer.model import load_model

    torch.manual_seed(0)
    model, processor = load_model(ModelConfig(name_or_path=TINY))
    model.generation_config.min_new_tokens = new_tokens  # no early end: the full length
    decoder = HFDecoder(model, processor.tokenizer, "de", "transcribe", precision)
    features = torch.randn(rows, model.config.num_mel_bins, window_frames(model.config))
    held = {t.untyped_storage()._cdata for t in (*model.parameters(), *model.buffers())}
    tracker = plan.LiveBytes(ignore=held)
    tracker._track(features)  # the caller's batch, as the plan counts it
    with tracker:
        decoder(features, new_tokens, 1)
    return tracker.peak


@pytest.mark.parametrize("precision", ["fp16", "fp32"])
def test_generation_peak_is_what_generate_allocates(precision):
    """The plan's evaluation peak (encoder, first and last decoding steps on fake tensors) equals
    what real generate() allocates, autocast's cached weight copies included."""
    real = _greedy_decode_bytes(precision, rows=4, new_tokens=30)
    predicted = plan.measure_generation(ModelConfig(name_or_path=TINY), 4, 1, 4 + 30, precision)
    # fp16 within 2 %; fp32 misses ~10 % of the tiny model's few MB (small vocabulary-sized
    # temporaries), nothing that scales with the model
    assert predicted.peak == pytest.approx(real, rel=0.02 if precision == "fp16" else 0.12)
    assert (predicted.weight_copies > 0) == (precision == "fp16")


def test_generation_counts_half_precision_weight_copies_and_both_kv_caches():
    from transformers import WhisperConfig

    config = WhisperConfig.from_pretrained(plan.model_config_dir(BASE))
    rows, positions = 6, 100
    measured = plan.measure_generation(ModelConfig(name_or_path=BASE), 3, 2, positions, "fp16")
    model = plan.build_fake_model(ModelConfig(name_or_path=BASE), FakeTensorMode())
    cast = {
        id(module.weight): module.weight.numel()
        for module in model.modules()
        if isinstance(module, torch.nn.Linear | torch.nn.Conv1d)
    }  # the tied output projection once; embeddings and layer norms are not cast
    assert measured.weight_copies == pytest.approx(2 * sum(cast.values()), rel=0.01)
    per_position = config.decoder_layers * 2 * rows * config.d_model * 2  # k and v, float16
    cross = config.max_source_positions
    assert measured.rows == rows
    assert measured.kv_cache == pytest.approx(per_position * (positions - 1 + cross), rel=0.01)


def test_every_phase_is_planned_and_the_verdict_names_the_largest(monkeypatch):
    argv = ["--name-or-path", BASE, "--batch-size", "2", "--zero1", "true", "--pack", "false"]
    config, options = plan.resolve(argv + ["--eval-batch-size", "8"], {})
    options.context_gib = 0.0
    result = plan.make_plan(config, options)
    phases = result["phases"]
    assert list(phases) == list(plan.PHASE_TITLES)
    memory = result["memory_bytes"]
    states = memory["weights"] + memory["gradients"] + memory["optimizer"]
    assert phases["training_step"]["allocated"] == memory["allocated_peak"]
    # the shard lands in the optimiser's own state and gradients are bucket views: no extra
    assert phases["first_step_after_resume"]["allocated"] == memory["allocated_peak"]
    assert phases["first_step_after_resume"]["host_per_rank"] == (
        memory["weights"] + memory["optimizer"]
    )
    assert phases["checkpoint_write"]["allocated"] == states  # nothing gathered on a GPU
    generation = phases["evaluation"]["generation"]
    assert phases["evaluation"]["allocated"] == states + generation["peak"]
    assert result["peak_phase"] == "training_step"
    assert plan.verdict(config, options, result)["phase"] == "training_step"

    # A large evaluation batch makes generate the largest peak; on a GPU where batch 32 fits,
    # the cheapest fix is exactly that, and the training settings stay as they are.
    config, _ = plan.resolve(argv + ["--eval-batch-size", "32"], {})
    at_32 = plan.make_plan(config, options)
    assert at_32["peak_phase"] == "evaluation"
    gib = at_32["peak_total"] / 2**30 + 0.01
    monkeypatch.setitem(plan.GPUS, "mid", plan.Gpu("a mid GPU", gib, 10.0, 10.0, "test"))
    config, _ = plan.resolve(argv + ["--eval-batch-size", "64"], {})
    result = plan.plan_with_verdict(config, replace(options, gpu="mid"))
    verdict = result["verdict"]
    assert not result["fits"] and verdict["phase"] == "evaluation"
    assert verdict["fix"] == "--eval-batch-size 32"
    text = plan.format_plan(result)
    assert "short in the evaluation (generate)" in text and "<- largest" in text
