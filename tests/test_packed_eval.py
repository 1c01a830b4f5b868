"""The packed, timestamped evaluation and a saved model's timestamp decoding (tiny preset).

The tiny preset hears 5 s, so its packed windows hold one or two demo utterances; its random
weights decode garbage, but with Whisper's timestamp rules: the structure (windows, spans,
segments, the gather across ranks, the report and the logs) is what is checked here.
"""

from __future__ import annotations

import json

import jiwer
import pytest
import torch

from tests._trainer_run import metrics, run_trainer
from tests.conftest import TINY_MODEL
from trainer import evaluate
from trainer.decoding.longform import timestamp_begin
from trainer.evaluate import HFDecoder, evaluate_packed
from trainer.model import ModelConfig, load_model
from trainer.runtime import checkpoint as ckpt
from trainer.runtime.distributed import Dist
from trainer.watch.metrics import format_report, normalise

PACKED_KEYS = (
    "packed_wer_orthographic",
    "packed_wer_normalised",
    "segment_start_error_median_s",
    "segment_start_within_0_5s",
    "segment_start_missed",
    "packed_segments_per_utterance",
)


@pytest.fixture(scope="module")
def tiny():
    config = ModelConfig(name_or_path=str(TINY_MODEL), gradient_checkpointing=False)
    return load_model(config, for_training=False)


def decoder_of(tiny) -> HFDecoder:
    model, processor = tiny
    return HFDecoder(model, processor.tokenizer, "de", "transcribe", "fp32")


def test_packed_eval_covers_the_split_once_and_reports(tiny, demo_shards):
    report, windows = evaluate_packed(
        decoder_of(tiny),
        demo_shards / "test",
        Dist(),
        batch_size=16,
        max_new_tokens=6,
        gap_seconds=0.1,  # 0.5 s would leave every 2-4 s demo clip alone in its 5 s window
    )
    keys = [k for w in windows for k in w["keys"]]
    assert len(keys) == len(set(keys)) == 60 == report["packed_utterances"]
    assert report["packed_windows"] == len(windows) < 60
    assert {len(w["keys"]) for w in windows} == {1, 2}
    for window in windows:
        (first, _), *rest = window["spans"]
        assert first == 0.1 and all(end <= 5.0 for _, end in window["spans"])
        assert len(window["start_errors"]) == len(window["keys"])
        assert all(s["start"] is not None for s in window["segments"])  # timestamps on
    assert set(PACKED_KEYS) <= set(report)
    refs = [normalise(w["reference"]) for w in windows]
    hyps = [normalise(w["hypothesis"]) for w in windows]
    assert report["packed_wer_normalised"] == pytest.approx(jiwer.wer(refs, hyps))
    assert 0.0 <= report["segment_start_within_0_5s"] <= 1.0
    text = format_report({**minimal_report(), **report})
    assert "packed WER orthographic / normalised" in text and "within 0.5 s" in text


def minimal_report() -> dict:
    names = ("wer_orthographic", "wer_normalised", "cer_orthographic", "cer_normalised")
    return {
        "num_utterances": 1,
        "normaliser": "n",
        "dropped_empty_after_normalisation": 0,
        **dict.fromkeys(names, 0.0),
    }


def test_ranks_share_the_windows(tiny, demo_shards, monkeypatch):
    """Two ranks in one process: each decodes every other window, rank 0 gathers them all and
    gets what one rank alone gets."""
    decoder = decoder_of(tiny)
    kwargs = dict(batch_size=4, max_new_tokens=4, max_windows=7)
    alone, windows = evaluate_packed(decoder, demo_shards / "test", Dist(), **kwargs)
    parts = {}

    def gather(info, obj):
        parts[info.rank] = obj
        return [parts[0], parts[1]] if info.rank == 0 else [obj]

    monkeypatch.setattr(evaluate.distributed, "gather_objects", gather)
    other = evaluate_packed(decoder, demo_shards / "test", Dist(1, 2), **kwargs)
    assert other == (None, []) and [w["window"] for w in parts[1]] == [1, 3, 5]
    report, gathered = evaluate_packed(decoder, demo_shards / "test", Dist(0, 2), **kwargs)
    assert [w["window"] for w in gathered] == list(range(7))
    assert [w["keys"] for w in gathered] == [w["keys"] for w in windows]
    for name in PACKED_KEYS:
        assert report[name] == pytest.approx(alone[name], nan_ok=True)


def test_saved_model_predicts_timestamps(tiny, tmp_path):
    """RUN/best's generation config lets generate() predict timestamps, the first one within
    max_initial_timestamp_index (1.00 s), while plain decoding stays without them."""
    from transformers import WhisperForConditionalGeneration

    model, processor = tiny
    folder = ckpt.save_best(tmp_path, model, processor)
    reloaded = WhisperForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    saved = reloaded.generation_config
    vocab = processor.tokenizer.get_vocab()
    assert json.loads((folder / "generation_config.json").read_text())["return_timestamps"] is False
    assert saved.no_timestamps_token_id == vocab["<|notimestamps|>"]
    assert saved.max_initial_timestamp_index == 50
    assert saved.prev_sot_token_id == vocab["<|startofprev|>"]
    features = torch.randn(2, 80, 500)
    with torch.no_grad():
        ids = reloaded.generate(
            input_features=features, return_timestamps=True, max_new_tokens=6
        ).tolist()
        plain = reloaded.generate(input_features=features, max_new_tokens=6).tolist()
    first = timestamp_begin(saved.no_timestamps_token_id)
    for sequence in ids:
        generated = [t for t in sequence if t not in (50258, 50261, 50359)]
        assert first <= generated[0] <= first + 50, sequence
    assert not [t for sequence in plain for t in sequence if t >= first]


@pytest.mark.slow
def test_training_logs_the_packed_figures(demo_shards, tmp_path):
    run_dir = tmp_path / "run"
    result = run_trainer(
        1, demo_shards, run_dir, "--max-steps", "1", "--eval-every", "0", "--save-every", "1"
    )
    assert result.returncode == 0, result.stdout[-3000:]
    (row,) = metrics(run_dir, "eval")
    assert set(PACKED_KEYS) <= set(row)
    saved = json.loads((run_dir / "eval" / "step-1.json").read_text())
    assert saved["packed_utterances"] == 8  # the FAST eval limit: the same samples
    assert sum(len(w["keys"]) for w in saved["packed"]) == 8
    assert "packed WER" in (run_dir / "training.log").read_text()


def test_evaluate_cli_offers_the_packed_figures(demo_shards, tmp_path, capsys):
    output = tmp_path / "report.json"
    code = evaluate.main(
        [
            "--model",
            str(TINY_MODEL),
            "--shards",
            str(demo_shards / "test"),
            "--limit",
            "4",
            "--batch-size",
            "4",
            "--max-new-tokens",
            "4",
            "--num-workers",
            "0",
            "--device",
            "cpu",
            "--packed",
            "--packed-windows",
            "3",
            "--output",
            str(output),
        ]
    )
    assert code == 0
    report = json.loads(output.read_text())
    assert report["num_utterances"] == 4 and report["packed_windows"] == len(report["packed"]) == 3
    assert set(PACKED_KEYS) <= set(report)
    assert "segment starts: median error" in capsys.readouterr().out
