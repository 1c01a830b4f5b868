"""bench/gpu_check.py's pieces, the per-phase memory record and GPU sharing, without running
the check itself (CI runs `bash bench/gpu_check.sh` in its CPU mode as a step of its own)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from trainer import plan
from trainer.runtime import gpu_sharing
from trainer.runtime.gpu import cuda_device_index
from trainer.runtime.memory_phases import PhasePeaks, read_records


def _load_script():
    path = Path(__file__).resolve().parent.parent / "bench" / "gpu_check.py"
    spec = importlib.util.spec_from_file_location("gpu_check", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gpu_check = _load_script()


class FakeAllocator:
    """Peak counters as torch.cuda keeps them: the largest value since the last reset."""

    def __init__(self) -> None:
        self.now, self.peak, self.resets = 0, 0, 0

    def use(self, nbytes: int) -> None:
        self.peak = max(self.peak, self.now + nbytes)

    def read(self) -> tuple[int, int]:
        return self.peak, self.peak + 100

    def reset(self) -> None:
        self.peak, self.resets = self.now, self.resets + 1


def test_phase_peaks_record_each_phase_once_per_occurrence(tmp_path):
    allocator = FakeAllocator()
    peaks = PhasePeaks(tmp_path, 1, torch.device("cpu"), 0, allocator.read, allocator.reset)
    allocator.use(50)  # setup and the first step
    peaks.step_done(1)
    for step, used in ((2, 30), (3, 40), (4, 35)):
        allocator.use(used)
        peaks.step_done(step)
    with peaks.phase("evaluation", 4):
        allocator.use(20)
    allocator.use(45)
    peaks.step_done(5)
    with peaks.phase("checkpoint_write", 5):
        allocator.use(10)
    resumed = PhasePeaks(tmp_path, 1, torch.device("cpu"), 5, allocator.read, allocator.reset)
    allocator.use(60)
    resumed.step_done(6)

    records = read_records(tmp_path)[1]
    got = [(r["phase"], r["step"], r["allocated"]) for r in records]
    assert got == [
        ("first_step", 1, 50),
        ("training_step", 4, 40),  # the largest of steps 2-4, written before the evaluation
        ("evaluation", 4, 20),  # not steps 2-4: the counters were reset when it began
        ("training_step", 5, 45),
        ("checkpoint_write", 5, 10),
        ("first_step_after_resume", 6, 60),
    ]
    assert all(r["reserved"] == r["allocated"] + 100 for r in records)


def test_phase_peaks_record_nothing_off_cuda(tmp_path):
    peaks = PhasePeaks(tmp_path, 0, torch.device("cpu"), 0)
    peaks.step_done(1)
    with peaks.phase("evaluation", 1):
        pass
    assert not (tmp_path / "memory").exists()


def test_gpu_sharing_backend_device_and_fraction():
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert gpu_sharing.process_group_backend(cuda, {}) == "nccl"
    assert gpu_sharing.process_group_backend(cpu, {}) == "gloo"
    assert gpu_sharing.process_group_backend(cuda, {"TRAINER_DIST_BACKEND": "gloo"}) == "gloo"
    with pytest.raises(ValueError, match="expected one of nccl, gloo"):
        gpu_sharing.process_group_backend(cuda, {"TRAINER_DIST_BACKEND": "mpi"})
    with pytest.raises(ValueError, match="nccl needs CUDA"):
        gpu_sharing.process_group_backend(cpu, {"TRAINER_DIST_BACKEND": "nccl"})

    assert [cuda_device_index(rank, 2, "nccl") for rank in (0, 1)] == [0, 1]
    assert [cuda_device_index(rank, 2, "gloo") for rank in (0, 1, 2, 3)] == [0, 1, 0, 1]
    assert [cuda_device_index(rank, 1, "gloo") for rank in (0, 1, 2)] == [0, 0, 0]
    with pytest.raises(ValueError, match="LOCAL_RANK 2 but only 2 GPUs"):
        cuda_device_index(2, 2, "nccl")

    assert gpu_sharing.memory_fraction({}) is None
    assert gpu_sharing.memory_fraction({"TRAINER_MEMORY_FRACTION": "0.25"}) == 0.25
    for bad in ("0", "1.5", "half"):
        with pytest.raises(ValueError, match="TRAINER_MEMORY_FRACTION"):
            gpu_sharing.memory_fraction({"TRAINER_MEMORY_FRACTION": bad})
    assert gpu_sharing.apply_memory_fraction(cpu, {"TRAINER_MEMORY_FRACTION": "0.5"}) == 0.5
    assert gpu_sharing.memory_cap_bytes(cpu, {"TRAINER_MEMORY_FRACTION": "0.5"}) is None


def test_memory_fraction_leaves_a_rank_what_the_small_card_gives_the_allocator():
    h200 = 150_000_000_000
    fraction = gpu_check.memory_fraction(h200, card_gib=16, context_gib=1)
    assert fraction * h200 == pytest.approx(15 * 2**30)
    with pytest.raises(ValueError, match="does not fit"):
        gpu_check.memory_fraction(8 * 2**30, card_gib=16, context_gib=1)


def test_turbo_shaped_model_folder_builds_turbo_with_a_128_bin_processor(tmp_path):
    from transformers import WhisperConfig, WhisperProcessor

    folder = gpu_check.turbo_shaped_model(tmp_path / "model")
    config = WhisperConfig.from_pretrained(folder)
    turbo = WhisperConfig.from_pretrained(plan.model_config_dir("openai/whisper-large-v3-turbo"))
    assert config.to_dict() == turbo.to_dict()
    processor = WhisperProcessor.from_pretrained(folder)
    assert processor.feature_extractor.feature_size == 128
    assert processor.feature_extractor.nb_max_frames == 3000
    vocab = processor.tokenizer.get_vocab()
    assert max(vocab.values()) < config.vocab_size  # every token id has an embedding row
    assert "<|de|>" in vocab and not any(folder.glob("*.safetensors"))  # random weights


@pytest.mark.parametrize("cuda", [True, False])
def test_check_settings_are_valid_trainer_settings(cuda, tmp_path):
    flags = gpu_check.trainer_flags(cuda, tmp_path / "model", tmp_path / "shards", "2")
    config, _ = plan.resolve(flags, environ={})
    assert config.optim.zero1 and config.model.gradient_checkpointing
    assert config.optim.max_steps == gpu_check.MAX_STEPS
    assert gpu_check.SAVE_EVERY < gpu_check.KILL_AT <= gpu_check.MAX_STEPS
    if cuda:  # the defaults: the run this check stands in for
        assert config.optim.grad_accum == 12 and config.data.pack
        assert config.optim.precision == "auto"  # fp16 + GradScaler on CUDA
    else:
        assert config.model.name_or_path.endswith("model")  # the folder given, not the preset


def test_peaks_beside_the_plan_and_the_batch_from_the_log():
    log = (
        "2026-12-01 rank 0: openai/whisper: 808.9M parameters (807.0M trainable), precision "
        "fp16, 2 rank(s) x batch 3 x accumulation 12 = 72 samples per step; 9 batches"
    )
    assert gpu_check.batch_in_log(log) == 3 and gpu_check.batch_in_log("nothing") is None
    records = {
        0: [{"phase": "evaluation", "step": 2, "allocated": 10 * 2**30, "reserved": 11 * 2**30}],
        1: [
            {"phase": "evaluation", "step": 2, "allocated": 12 * 2**30, "reserved": 12 * 2**30},
            {"phase": "evaluation", "step": 4, "allocated": 9 * 2**30, "reserved": 13 * 2**30},
            {"phase": "first_step", "step": 1, "allocated": 2**30, "reserved": 2**30},
        ],
    }
    measured = gpu_check.measured_peaks(records)
    assert measured["evaluation"] == {
        "allocated": 12 * 2**30,
        "reserved": 13 * 2**30,
        "rank": 1,
        "step": 2,
    }
    predicted = {
        "phases": {
            "evaluation": {"allocated": 8 * 2**30, "total": 9 * 2**30},
            "training_step": {"allocated": 2**29, "total": 2**30},
        }
    }
    rows = {row["phase"]: row for row in gpu_check.beside_plan(measured, predicted)}
    assert rows["evaluation"]["measured_over_planned"] == 1.5
    assert rows["first_step"]["planned_as"] == "training_step"
    assert rows["first_step"]["measured_over_planned"] == 2.0
    assert "measured_allocated_gib" not in rows["checkpoint_write"]
    json.dumps(rows)  # the summary is JSON


def test_mfu_is_against_the_card_the_check_runs_on():
    assert gpu_check.dense_peak_tflops("NVIDIA H200") == 989.4
    assert gpu_check.dense_peak_tflops("NVIDIA GeForce RTX 4060 Ti") == 44.1
    assert gpu_check.dense_peak_tflops("Some Future GPU") is None
