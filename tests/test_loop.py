"""The trainer's pieces: configuration layers, targets, loss, schedule, guard, the CUDA device
helpers (no GPU needed), and three short runs of the entry point: the warm-up warning, and
gradient checkpointing on and off."""

from __future__ import annotations

import dataclasses
import math
import tomllib

import pytest
import torch

from tests._trainer_run import REPO, metrics, run_trainer, weights
from trainer.config import SECTIONS, TrainConfig, build_parser, load_config
from trainer.model import decoder_inputs_and_labels, token_loss
from trainer.runtime.gpu import (
    configure_allocator,
    cuda_device_index,
    memory_metrics,
    memory_reading,
)
from trainer.runtime.optim import (
    OptimConfig,
    TrainingDiverged,
    check_overflow,
    lr_factor,
    resolve_precision,
    warmup_warning,
)

BASE = ["--shards", "/data/shards", "--output-dir", "runs/x"]


def test_defaults_are_the_two_16_gb_gpu_configuration():
    """The original project's model, learning rate and 48 samples per step, as the batch that
    trainer.plan finds to fit a 16 GB card: 2 x accumulation 12 with ZeRO-1."""
    config = TrainConfig()
    assert config.model.name_or_path == "openai/whisper-large-v3-turbo"
    # the micro-batch is fitted to the card; the windows per step are the reference batch's
    assert config.data.batch_size == "auto"
    assert config.fit.reference_batch_size * config.optim.grad_accum * 2 == 48
    assert config.fit.reference_batch_size == 2 and config.optim.zero1
    assert config.optim.lr == 1e-5 and config.optim.warmup_steps > 0
    assert config.optim.precision == "auto"  # fp16 + GradScaler on CUDA
    assert config.model.gradient_checkpointing
    assert config.eval.eval_every == 1000 and config.checkpoint.save_every == 1000
    assert config.log.log_every == 25
    assert config.eval.best_metric.startswith("wer")


def test_turbo_config_file_spells_out_the_defaults():
    config = load_config(["--config", str(REPO / "config/turbo-2x16gb.toml"), *BASE], environ={})
    plain = load_config(BASE, environ={})
    config.config = plain.config = ""
    assert config == plain


def test_every_field_has_help_text():
    for cls in [TrainConfig, *SECTIONS.values()]:
        for spec in dataclasses.fields(cls):
            if spec.name not in SECTIONS:
                assert spec.metadata.get("help"), f"{cls.__name__}.{spec.name} has no help"
    assert "--batch-size" in build_parser().format_help()


def test_resolution_order_defaults_file_environment_flags(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text(
        "[optim]\nlr = 0.5\ngrad_accum = 3\nwarmup_steps = 7\n"
        "[data]\nbatch_size = 8\nseed = 4\n[model]\nfreeze_encoder = true\n"
    )
    environ = {
        "TRAINER_LR": "0.25",
        "TRAINER_OPTIM__GRAD_ACCUM": "5",
        "RUNS_DIR": "/r",
        "SHARDS_DIR": "/s",
    }
    config = load_config(
        ["--config", str(toml), "--lr", "0.125", "--data.seed", "11"], environ=environ
    )
    assert config.optim.lr == 0.125  # flag > env > file
    assert config.optim.grad_accum == 5  # env > file
    assert config.optim.warmup_steps == 7 and config.data.batch_size == 8  # file > default
    assert config.data.seed == 11 and config.seed == 0  # dotted flag for a shared name
    assert config.model.freeze_encoder is True
    assert config.output_dir == "/r/whisper-de" and config.data.shards == "/s"


def test_model_flag_and_variable_name_the_model_as_in_the_other_clis():
    assert load_config(["--model", "m/a", *BASE], environ={}).model.name_or_path == "m/a"
    assert load_config(["--name-or-path", "m/b", *BASE], environ={}).model.name_or_path == "m/b"
    assert load_config(BASE, environ={"TRAINER_MODEL": "m/c"}).model.name_or_path == "m/c"
    flag_wins = load_config(["--model", "m/a", *BASE], environ={"TRAINER_MODEL": "m/c"})
    assert flag_wins.model.name_or_path == "m/a"
    agreeing = {"TRAINER_MODEL": "m/c", "TRAINER_MODEL__NAME_OR_PATH": "m/c"}
    assert load_config(BASE, environ=agreeing).model.name_or_path == "m/c"
    with pytest.raises(ValueError, match="TRAINER_MODEL='m/c' and TRAINER_NAME_OR_PATH='m/d'"):
        load_config(BASE, environ={"TRAINER_MODEL": "m/c", "TRAINER_NAME_OR_PATH": "m/d"})


def test_model_in_toml_is_a_table_and_the_error_says_how_to_write_it(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text('model = "openai/whisper-base"\n')
    with pytest.raises(ValueError, match=r"\[model\] must be a table; .*\[model\] name_or_path ="):
        load_config(["--config", str(toml), *BASE], environ={})


def test_unknown_settings_are_refused(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text("[optim]\nlearning_rate = 1.0\n")
    with pytest.raises(ValueError, match="optim.learning_rate"):
        load_config(["--config", str(toml), *BASE], environ={})


def test_demo_config_is_valid():
    with open(REPO / "config/demo-tiny.toml", "rb") as handle:
        assert tomllib.load(handle)["model"]["name_or_path"] == "config/models/tiny-whisper-de"
    config = load_config(["--config", str(REPO / "config/demo-tiny.toml")], environ={})
    assert config.optim.precision == "fp32" and config.device == "cpu"


def test_decoder_inputs_do_not_double_the_start_token():
    # <|sot|> <|de|> <|transcribe|> <|notimestamps|> a b <|eot|>, then padding
    tokens = torch.tensor(
        [
            [50258, 50261, 50359, 50363, 11, 12, 50257, -100],
            [50258, 50261, 50359, 50363, 13, 50257, -100, -100],
        ]
    )
    inputs, labels = decoder_inputs_and_labels(tokens, pad_token_id=50257)
    assert inputs[0].tolist() == [50258, 50261, 50359, 50363, 11, 12, 50257]
    assert inputs[1].tolist() == [50258, 50261, 50359, 50363, 13, 50257, 50257]
    assert labels[0].tolist() == [50261, 50359, 50363, 11, 12, 50257, -100]
    assert (inputs[:, 0] == 50258).all() and (inputs[:, 1] != 50258).all()


def test_token_loss_ignores_padding_and_is_float32():
    logits = torch.randn(2, 3, 10, dtype=torch.bfloat16)
    labels = torch.tensor([[1, 2, -100], [3, -100, -100]])
    summed, count = token_loss(logits, labels)
    assert count.item() == 3 and summed.dtype == torch.float32
    manual = torch.nn.functional.cross_entropy(
        logits.float()[labels != -100], labels[labels != -100], reduction="sum"
    )
    assert torch.allclose(summed, manual)


def test_learning_rate_warmup_then_decay():
    assert lr_factor(0, 10, 100, "linear") == pytest.approx(0.1)
    assert lr_factor(9, 10, 100, "linear") == pytest.approx(1.0)
    assert lr_factor(55, 10, 100, "linear") == pytest.approx(0.5)
    assert lr_factor(100, 10, 100, "linear") == pytest.approx(0.0)
    assert lr_factor(55, 10, 100, "cosine") == pytest.approx(0.5)
    assert lr_factor(100, 10, 100, "cosine", min_ratio=0.1) == pytest.approx(0.1)
    assert lr_factor(500, 10, 100, "constant") == 1.0


def test_warmup_that_outlasts_the_run_is_named_with_both_numbers():
    longer = warmup_warning(500, 100)
    assert "warm-up (500 optimiser steps) is longer than the run (100 steps)" in longer
    assert "20% of it" in longer and "--warmup-steps" in longer and "--max-steps" in longer
    assert "as long as the run (100 steps)" in warmup_warning(100, 100)
    assert "takes 60% of the run (500 steps)" in warmup_warning(300, 500)
    # Half the run or less is an ordinary warm-up; none at all needs no warning.
    assert warmup_warning(250, 500) is None and warmup_warning(500, 10_000) is None
    assert warmup_warning(0, 10) is None


def test_trainer_logs_the_warmup_warning(demo_shards, tmp_path):
    result = run_trainer(
        1, demo_shards, tmp_path, "--max-steps", "1", "--warmup-steps", "4", "--eval-limit", "2"
    )
    assert result.returncode == 0, result.stdout[-3000:]
    expected = "WARNING warm-up (4 optimiser steps) is longer than the run (1 steps)"
    assert expected in result.stdout  # stderr is merged into stdout
    assert expected in (tmp_path / "training.log").read_text()


def test_collapsing_loss_scale_stops_with_a_clear_error():
    config = OptimConfig(min_loss_scale=1e-4, max_consecutive_skips=5)
    check_overflow(10, 4, 2.0**-10, config)  # still fine
    with pytest.raises(TrainingDiverged, match=r"step 11: the fp16 loss scale collapsed.*--lr"):
        check_overflow(11, 1, 2.0**-14, config)
    with pytest.raises(TrainingDiverged, match=r"step 12: 5 optimiser steps in a row"):
        check_overflow(12, 5, None, config)


def test_grad_scaler_skips_an_inf_step_and_backs_off():
    """The fp16 path: GradScaler itself skips the update on inf and halves the scale."""
    layer = torch.nn.Linear(2, 1)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    before = layer.weight.detach().clone()
    (scaler.scale(layer(torch.ones(1, 2)).sum()) * math.inf).backward()
    scaler.unscale_(optimizer)
    scaler.step(optimizer)
    scaler.update()
    assert torch.equal(layer.weight, before) and scaler.get_scale() == 2.0**7


def test_each_process_finds_its_gpu_among_the_visible_ones():
    assert cuda_device_index(local_rank=1, visible=2) == 1
    # one GPU visible per process (per-rank CUDA_VISIBLE_DEVICES, a scheduler's binding)
    assert cuda_device_index(local_rank=3, visible=1) == 0
    with pytest.raises(ValueError, match=r"LOCAL_RANK 2 but only 2 GPUs .*nproc_per_node=2"):
        cuda_device_index(local_rank=2, visible=2)
    with pytest.raises(ValueError, match="no CUDA device is visible"):
        cuda_device_index(local_rank=0, visible=0)


def test_allocator_gets_expandable_segments_unless_the_user_chose():
    environ: dict[str, str] = {}
    assert configure_allocator(environ) == "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True"
    assert environ == {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}
    for name in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"):
        chosen = {name: "max_split_size_mb:128"}
        assert "set by you" in configure_allocator(chosen)
        assert chosen == {name: "max_split_size_mb:128"}


def test_bf16_on_a_card_without_it_is_refused_naming_the_card(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    with pytest.raises(ValueError, match=r"bf16, but Tesla T4 \(compute capability 7.5\).*fp16"):
        resolve_precision("bf16", torch.device("cuda", 0))
    assert resolve_precision("bf16", torch.device("cpu")) == "bf16"  # CPU autocast has bf16
    assert resolve_precision("auto", torch.device("cuda", 0)) == "fp16"


def test_memory_of_every_rank_is_reported():
    readings = [{"allocated": 10.0, "reserved": 12.5}, {"allocated": 11.0, "reserved": 11.5}]
    assert memory_metrics(readings) == {
        "gpu_memory_gb": 11.0,
        "gpu_reserved_gb": 12.5,
        "rank0/gpu_allocated_gb": 10.0,
        "rank0/gpu_reserved_gb": 12.5,
        "rank1/gpu_allocated_gb": 11.0,
        "rank1/gpu_reserved_gb": 11.5,
    }
    assert memory_metrics([{}, {}]) == {}  # not on CUDA
    assert memory_reading(torch.device("cpu")) == {}


def test_gradient_checkpointing_trains_the_same_model(demo_shards, tmp_path):
    """The default for turbo, run through the trainer: recomputing the layers in the backward
    (non-reentrant, RNG state preserved, dropout on) gives the same loss and the same weights,
    bit for bit on the CPU."""
    args = ("--max-steps", "1", "--eval-every", "0", "--dropout", "0.1", "--eval-limit", "2")
    runs = {}
    for checkpointing in ("true", "false"):
        run_dir = tmp_path / checkpointing
        result = run_trainer(
            1, demo_shards, run_dir, *args, "--gradient-checkpointing", checkpointing
        )
        assert result.returncode == 0, result.stdout[-3000:]
        runs[checkpointing] = (metrics(run_dir), weights(run_dir / "checkpoints" / "step-1"))
    (on_rows, on_weights), (off_rows, off_weights) = runs["true"], runs["false"]
    assert [row["loss"] for row in on_rows] == [row["loss"] for row in off_rows]
    for name, tensor in on_weights.items():
        assert torch.equal(tensor, off_weights[name]), name


def test_gradient_checkpointing_recomputes_the_layers():
    """What the test above switches on really recomputes: each layer runs twice."""
    from tests._trainer_run import TINY_MODEL
    from trainer.model import ModelConfig, load_model, window_frames

    calls = {True: 0, False: 0}
    for checkpointing in (True, False):
        model, _ = load_model(
            ModelConfig(name_or_path=str(TINY_MODEL), gradient_checkpointing=checkpointing)
        )
        model.train()

        def count(*_, checkpointing=checkpointing) -> None:
            calls[checkpointing] += 1

        # (a module inside the layer: transformers checkpoints the layer's forward, so the
        # layer's own hooks stay outside the recompute)
        model.model.decoder.layers[0].fc1.register_forward_hook(count)
        config = model.config
        features = torch.randn(1, config.num_mel_bins, window_frames(config))
        tokens = torch.randint(0, config.vocab_size, (1, 6))
        inputs, labels = decoder_inputs_and_labels(tokens, config.pad_token_id)
        logits = model(input_features=features, decoder_input_ids=inputs).logits
        summed, count_ = token_loss(logits, labels)
        summed.backward()
    assert calls == {True: 2, False: 1}


def test_batches_are_pinned_only_for_a_gpu_run(demo_shards, monkeypatch):
    """Keyed on the run's device: a CPU run on a machine that has a GPU pins nothing."""
    from trainer.loop import make_train_data
    from trainer.runtime.distributed import Dist

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU exists ...
    config = load_config([*BASE, "--pack", "false", "--num-workers", "0"], environ={})
    assert config.data.pin_memory
    cpu_run = make_train_data(config, demo_shards / "train", Dist(), None, 500, None)
    assert cpu_run.batches(0).pin_memory is False  # ... but this run is on the CPU
    gpu_info = Dist(device=torch.device("cuda", 0))
    gpu_run = make_train_data(config, demo_shards / "train", gpu_info, None, 500, None)
    assert gpu_run.batches(0).pin_memory is True
