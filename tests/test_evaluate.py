"""Evaluation: WER/CER maths, the demo learns, and the `python -m trainer.evaluate` CLI.

The figures the CLI writes are recomputed here, independently, with jiwer and the normaliser.
"""

from __future__ import annotations

import json
import subprocess
import sys
import types

import jiwer
import pytest
import torch
from transformers.models.whisper.english_normalizer import BasicTextNormalizer

from tests._trainer_run import REPO, TINY_MODEL, metrics, run_trainer
from trainer.watch.metrics import normalise, wer_report

# The demo-learns run: the tiny preset (3.6 M parameters, 5 s window) from random initialisation
# on the demo train split with config/demo-tiny.toml's settings, evaluated on all 60 demo test
# utterances before and after. Measured on 2 CPU cores (docs/training.md): ~5 minutes; the loss
# falls 10.7 -> ~0.2 and the normalised WER 100 % -> ~80 % (step 1000) -> ~50 % (step 1500): the
# model learns to tell the demo's sentences apart in voices and tempos it was not trained on.
DEMO_STEPS = 1500
# "Clearly down" from 100 %. The figure moves with the data order, which is legitimately
# different in each layout of the sampler: 0.50 when first measured, 0.65 (one block per rank,
# the layout before data streams), 0.71 (two data streams, config/demo-tiny.toml, this layout;
# CPU float32 is deterministic, so the same on every run here). The CER assertion below is the
# finer check that learning happened.
DEMO_WER_AFTER = 0.75


def test_wer_report_orthographic_normalised_and_per_source():
    refs = ["Die Straße ist groß.", "Übermorgen, ja!", "...", "Hallo Welt"]
    hyps = ["die strasse ist groß", "übermorgen ja", "", "Hallo Welt"]
    report = wer_report(refs, hyps, ["a", "a", "b", "b"])
    assert report["num_utterances"] == 4
    assert report["dropped_empty_after_normalisation"] == 1  # "..." normalises to nothing
    # normalised: 1 error (straße/strasse) in 4 + 2 + 2 words; ß and umlauts kept
    assert report["wer_normalised"] == pytest.approx(1 / 8)
    assert normalise("Größe Übel") == "größe übel"
    # orthographic: case and punctuation count
    assert report["wer_orthographic"] == pytest.approx(jiwer.wer(refs, [h for h in hyps]))
    assert report["per_source"]["b"]["wer_normalised"] == 0.0
    assert "BasicTextNormalizer" in report["normaliser"]


@pytest.fixture(scope="module")
def demo_run(demo_shards, module_tmp):
    run_dir = module_tmp("demo-learns")
    result = run_trainer(
        1,
        demo_shards,
        run_dir,
        "--batch-size",
        "8",
        "--bucket-buffer",
        "48",
        "--grad-accum",
        "1",
        "--lr",
        "3e-3",
        "--warmup-steps",
        "50",
        "--schedule",
        "linear",
        "--max-steps",
        str(DEMO_STEPS),
        "--eval-every",
        "0",
        "--eval-at-start",
        "true",
        "--eval-limit",
        "none",
        "--eval-batch-size",
        "30",
        "--max-new-tokens",
        "40",
        "--save-every",
        str(DEMO_STEPS),
        "--log-every",
        "10",
        "--sample-log",
        "false",
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-4000:]
    return run_dir


@pytest.mark.slow
def test_demo_learns(demo_run):
    train = metrics(demo_run)
    evals = metrics(demo_run, "eval")
    before, after = evals[0], evals[-1]
    assert before["step"] == 0 and after["step"] == DEMO_STEPS
    print(
        f"loss {train[0]['loss']:.2f} -> {train[-1]['loss']:.2f}; normalised CER "
        f"{before['cer_normalised']:.3f} -> {after['cer_normalised']:.3f}; normalised WER "
        f"{before['wer_normalised']:.3f} -> {after['wer_normalised']:.3f}"
    )
    assert train[0]["loss"] > 9.0 and train[-1]["loss"] < 1.0
    assert before["wer_normalised"] >= 0.95
    assert after["wer_normalised"] <= DEMO_WER_AFTER
    assert after["cer_normalised"] < before["cer_normalised"] - 0.2


@pytest.mark.slow
def test_evaluate_cli_agrees_with_jiwer(demo_run, demo_shards, tmp_path):
    output = tmp_path / "report.json"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "trainer.evaluate",
            "--model",
            str(demo_run / "best"),
            "--shards",
            str(demo_shards / "test"),
            "--batch-size",
            "30",
            "--max-new-tokens",
            "40",
            "--num-workers",
            "1",
            "--output",
            str(output),
            "--worst",
            "5",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(output.read_text())
    utterances = report["utterances"]
    assert report["num_utterances"] == len(utterances) == 60
    assert len({u["key"] for u in utterances}) == 60
    assert_agrees_with_jiwer(report)
    assert f"{100 * report['wer_normalised']:6.2f} %" in result.stdout
    assert "BasicTextNormalizer" in result.stdout
    assert report["real_time_factor"] > 0 and len(report["worst"]) == 5


def assert_agrees_with_jiwer(report):
    utterances = report["utterances"]
    refs = [u["reference"] for u in utterances]
    hyps = [u["hypothesis"] for u in utterances]
    # recomputed independently of trainer.watch.metrics
    normaliser = BasicTextNormalizer()
    norm_refs = [" ".join(normaliser(r).split()) for r in refs]
    norm_hyps = [" ".join(normaliser(h).split()) for h in hyps]
    assert report["wer_normalised"] == pytest.approx(jiwer.wer(norm_refs, norm_hyps))
    assert report["wer_orthographic"] == pytest.approx(jiwer.wer(refs, hyps))
    assert report["cer_orthographic"] == pytest.approx(jiwer.cer(refs, hyps))


def test_evaluate_cli_uses_a_ctranslate2_export(demo_shards, tmp_path, monkeypatch, capsys):
    """A folder with model.bin is decoded through trainer.decoding.ct2_backend (faked here). The
    fake "transcribes" each batch as its references with errors (lower case, last word dropped,
    one word added), so the WER the CLI writes is non-trivial and checked against jiwer."""
    folder = tmp_path / "ct2"
    folder.mkdir()
    (folder / "model.bin").write_bytes(b"")
    for name in ("tokenizer.json", "preprocessor_config.json"):
        (folder / name).write_bytes((TINY_MODEL / name).read_bytes())
    calls = []

    class FakeTranscriber:  # the interface of trainer.decoding.ct2_backend.CT2Transcriber
        def __init__(self, path, device="cpu", compute_type="default"):
            from tokenizers import Tokenizer

            self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
            self.window_frames = 500  # the tiny preset's, as its export's preprocessor says
            calls.append(("init", path, device))

        def prefix_tokens(self, language="de", task="transcribe"):
            names = ["<|startoftranscript|>", f"<|{language}|>", f"<|{task}|>", "<|notimestamps|>"]
            return [self.tokenizer.token_to_id(name) for name in names]

        def generate_tokens(self, features, prefix_tokens, max_length, beam_size):
            calls.append(("generate", features.shape, list(prefix_tokens)))
            texts = seen.pop(0)
            assert len(texts) == features.shape[0]
            wrong = [" ".join(t.lower().split()[:-1] + ["ja"]) for t in texts]
            return [self.tokenizer.encode(t, add_special_tokens=False).ids for t in wrong]

        def decode(self, ids):
            return self.tokenizer.decode(ids, skip_special_tokens=True)

    monkeypatch.setitem(
        sys.modules,
        "trainer.decoding.ct2_backend",
        types.SimpleNamespace(CT2Transcriber=FakeTranscriber),
    )
    from trainer import evaluate

    seen = []  # the reference texts of each batch, in the order the decoder gets them
    real_eval_batches = evaluate.eval_batches

    def recording_eval_batches(*args, **kwargs):
        for batch in real_eval_batches(*args, **kwargs):
            seen.append(list(batch["texts"]))
            yield batch

    monkeypatch.setattr(evaluate, "eval_batches", recording_eval_batches)
    output = tmp_path / "r.json"
    code = evaluate.main(
        [
            "--model",
            str(folder),
            "--shards",
            str(demo_shards / "test"),
            "--limit",
            "12",
            "--batch-size",
            "5",
            "--num-workers",
            "0",
            "--output",
            str(output),
            "--device",
            "cpu",
        ]
    )
    assert code == 0
    report = json.loads(output.read_text())
    assert report["backend"] == "ctranslate2" and report["num_utterances"] == 12
    assert 0.1 < report["wer_normalised"] < 0.6 and report["wer_orthographic"] > 0.1
    assert_agrees_with_jiwer(report)
    generate = [c for c in calls if c[0] == "generate"]
    assert generate and generate[0][1][1:] == (80, 500)  # the tiny preset's 5 s window
    assert (
        generate[0][2]
        == json.loads((demo_shards / "test" / "manifest.json").read_text())["prefix_tokens"]
    )
    assert "ctranslate2" in capsys.readouterr().out


@pytest.mark.parametrize(("device", "pinned"), [("cpu", False), ("cuda", True)])
def test_evaluation_pins_batches_only_for_a_decoder_on_a_gpu(monkeypatch, device, pinned):
    """Page-locked batches help only a copy to a GPU: a CPU evaluation on a machine that has one
    (beside a training run, say) must not pin, a GPU one keeps the setting."""
    from trainer import evaluate
    from trainer.data.loader import DataConfig
    from trainer.runtime.distributed import Dist

    class Stop(Exception):
        pass

    seen = []

    def capturing_eval_batches(split_dir, config, rank, world_size):
        seen.append(config.pin_memory)
        raise Stop

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(evaluate, "eval_batches", capturing_eval_batches)
    decoder = types.SimpleNamespace(device=torch.device(device), window_frames=500)
    info = Dist(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    with pytest.raises(Stop):
        evaluate.evaluate_split(decoder, "unused", DataConfig(pin_memory=True), info, 4, 8)
    assert seen == [pinned]
