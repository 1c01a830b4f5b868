"""Checkpoints appear only when complete, load with weights_only / safetensors, prune safely."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from tests._trainer_run import TINY_MODEL, run_trainer, weights
from trainer.model import ModelConfig, load_model
from trainer.runtime import checkpoint as ckpt
from trainer.runtime.distributed import Dist


@pytest.fixture(scope="module")
def tiny():
    return load_model(ModelConfig(name_or_path=str(TINY_MODEL), gradient_checkpointing=False))


def _save(run_dir, step, model, processor, best_step=-1):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    state = {
        "step": step,
        "epoch": 0,
        "batch_in_epoch": step,
        "best_metric": None,
        "best_step": best_step,
        "scheduler": {"last_epoch": step},
        "scaler": {},
    }
    return ckpt.save_checkpoint(
        Dist(),  # one process: rank 0 of 1
        run_dir,
        step,
        model,
        processor,
        optimizer.state_dict(),
        False,
        state,
        [ckpt.capture_rng(torch.device("cpu"))],
        {"note": "test"},
    )


def test_checkpoint_round_trip_with_weights_only(tiny, tmp_path):
    model, processor = tiny
    folder = _save(tmp_path, 7, model, processor)
    assert folder.name == "step-7" and ckpt.latest_checkpoint(tmp_path) == folder
    training, rng = ckpt.load_training_files(folder)  # weights_only=True
    assert training["step"] == 7 and training["batch_in_epoch"] == 7 and len(rng) == 1
    optimizer, is_shard = ckpt.load_optimizer_state(folder, 0, 1)
    assert "state" in optimizer and not is_shard
    again, _ = load_model(
        ModelConfig(name_or_path=str(TINY_MODEL), init_seed=1, gradient_checkpointing=False)
    )
    ckpt.load_model_weights(again, folder)
    for (name, a), b in zip(model.state_dict().items(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    # every checkpoint is also a plain Hugging Face folder
    from transformers import WhisperForConditionalGeneration

    WhisperForConditionalGeneration.from_pretrained(folder)


def test_rng_states_restore_exactly():
    cpu = torch.device("cpu")
    state = ckpt.capture_rng(cpu)
    assert state["cuda"] == []  # keyed on the run's device, not on whether CUDA exists
    expected = (random.random(), np.random.rand(), torch.rand(3))
    random.random(), np.random.rand(), torch.rand(3)
    ckpt.restore_rng(state, cpu)
    got = (random.random(), np.random.rand(), torch.rand(3))
    assert got[0] == expected[0] and got[1] == expected[1] and torch.equal(got[2], expected[2])


def test_temporaries_are_invisible_and_pruning_keeps_the_best(tiny, tmp_path):
    model, processor = tiny
    for step in (2, 4, 6, 8):
        _save(tmp_path, step, model, processor)
    (tmp_path / "checkpoints" / ".tmp-step-10").mkdir()  # an interrupted write
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [2, 4, 6, 8]
    ckpt.prune_checkpoints(tmp_path, keep_last=2, keep_steps={2})
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [2, 6, 8]
    ckpt.remove_temporaries(tmp_path)
    assert not (tmp_path / "checkpoints" / ".tmp-step-10").exists()


@pytest.mark.slow
def test_killed_checkpoint_write_leaves_previous_one_loadable(demo_shards, tmp_path):
    run_dir = tmp_path / "run"
    args = ("--max-steps", "4", "--save-every", "2", "--eval-every", "0")
    crashed = run_trainer(
        1, demo_shards, run_dir, *args, env={ckpt.CRASH_HOOK: "4"}
    )  # SIGKILL half-way through step-4
    assert crashed.returncode != 0
    partial = run_dir / "checkpoints" / ".tmp-step-4"
    assert partial.is_dir() and (partial / "model.safetensors").exists()
    assert not (partial / "training.pt").exists(), "the hook should fire mid-write"
    assert [s for s, _ in ckpt.list_checkpoints(run_dir)] == [2]
    previous = ckpt.latest_checkpoint(run_dir)
    training, _ = ckpt.load_training_files(previous)
    assert training["step"] == 2
    assert weights(previous)  # safetensors loads

    resumed = run_trainer(1, demo_shards, run_dir, *args)
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    assert not partial.exists(), "the unfinished write is cleaned up"
    assert [s for s, _ in ckpt.list_checkpoints(run_dir)] == [2, 4]
    assert "resuming from" in (run_dir / "training.log").read_text()
