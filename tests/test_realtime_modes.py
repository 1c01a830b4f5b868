"""trainer.decoding.realtime_modes: the demo split's audio found by row id, and a CTranslate2 export
of the random tiny preset (Whisper's 30 s window) decoded in every RealtimeSTT mode through the real
faster-whisper. A random model's words are garbage; what is checked is the plumbing: the calls,
which figures each mode reports, and that they are the WER of what was decoded."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import DEMO_CORPUS

pytest.importorskip("ctranslate2")
pytest.importorskip("faster_whisper")

from tests.test_export import export_config, save_random_whisper  # noqa: E402
from trainer.decoding.realtime_modes import (  # noqa: E402
    MODES,
    RealtimeTranscriber,
    evaluate_modes,
    long_files,
    parse_modes,
    split_clips,
)
from trainer.export import export  # noqa: E402
from trainer.watch.metrics import wer_report  # noqa: E402


@pytest.fixture(scope="module")
def random_export(module_tmp) -> Path:
    folder = module_tmp("realtime")
    model = save_random_whisper(folder / "best")
    out = folder / "ct2"
    export(export_config(model, out, quantization="float32", verify=False))
    return out


def test_split_audio_comes_from_the_source_rows(demo_shards, tmp_path):
    clips = split_clips(demo_shards / "test", str(DEMO_CORPUS), limit=5)
    assert len(clips) == 5 and len({c.key for c in clips}) == 5
    assert all(c.key.startswith("test-") and c.text for c in clips)
    assert all(c.audio.dtype == np.float32 and 0.5 < c.audio.size / 16000 < 30 for c in clips)
    files = long_files(clips, long_seconds=6.0, gap_seconds=0.5)
    assert sum(len(f.texts) for f in files) == 5 and files[0].prompt is None
    assert files[1].prompt == files[0].texts[-1]
    first = files[0]
    assert first.starts[0] == 0.0
    assert first.starts[1] == pytest.approx(clips[0].audio.size / 16000 + 0.5)
    # The train rows under the test split's name: the transcripts disagree, so this is not
    # the split's source and the lookup says so.
    wrong = tmp_path / "wrong" / "data"
    wrong.mkdir(parents=True)
    shutil.copyfile(
        DEMO_CORPUS / "data" / "train-00000-of-00001.parquet",
        wrong / "test-00000-of-00001.parquet",
    )
    with pytest.raises(ValueError, match="not|reads .* but sample test-"):
        split_clips(demo_shards / "test", str(wrong.parent), limit=5)


def test_every_mode_runs_in_faster_whisper_and_scores_what_it_decoded(demo_shards, random_export):
    clips = split_clips(demo_shards / "test", str(DEMO_CORPUS), limit=3)
    transcriber = RealtimeTranscriber(random_export, compute_type="float32", max_new_tokens=4)
    report, details = evaluate_modes(
        transcriber, clips, MODES.values(), long_seconds=8.0, gap_seconds=0.5
    )
    assert list(report) == ["batched", "batched-prompt", "sequential", "sequential-prompt"]
    for name, parts in report.items():
        assert parts["utterances"]["items"] == 3 and "long_form" in parts
        hypotheses = [" ".join(s["text"] for s in segs) for segs in details[name]["utterances"]]
        again = wer_report([c.text for c in clips], hypotheses, ["x"] * 3)
        assert parts["utterances"]["wer_normalised"] == pytest.approx(again["wer_normalised"])
        long = parts["long_form"]
        assert long["items"] == len(long_files(clips, 8.0, 0.5))
        timestamped = not MODES[name].batched
        assert ("segment_start_error_median_s" in long) == timestamped
        assert "segment_start_error_median_s" not in parts["utterances"]
        segments = [s for segs in details[name]["long_form"] for s in segs]
        assert all((s["start"] is not None) == timestamped for s in segments)
    assert parse_modes("batched, sequential") == [MODES["batched"], MODES["sequential"]]
    with pytest.raises(ValueError, match="unknown mode"):
        parse_modes("greedy")


def test_evaluate_cli_scores_the_export_in_realtime_modes(random_export, tmp_path, capsys):
    """`python -m trainer.evaluate --audio-source`: shards built for the 30 s random model, its
    export decoded per utterance (CTranslate2) and in two faster-whisper modes."""
    import json

    from tests.conftest import build_shards
    from trainer import evaluate

    shards = tmp_path / "shards"
    built = build_shards(shards, random_export.parent / "best", "--limit", "4")
    assert built.returncode == 0, built.stderr[-2000:]
    common = ["--shards", str(shards / "test"), "--limit", "3", "--max-new-tokens", "4"]
    common += ["--num-workers", "0", "--device", "cpu", "--worst", "0"]
    output = tmp_path / "report.json"
    code = evaluate.main(
        ["--model", str(random_export), *common, "--audio-source", str(DEMO_CORPUS)]
        + ["--modes", "batched,sequential", "--long-form-seconds", "8"]
        + ["--realtime-max-new-tokens", "4", "--output", str(output)]
    )
    assert code == 0
    report = json.loads(output.read_text())
    assert set(report["realtime"]) == {"batched", "sequential"}
    assert report["realtime"]["batched"]["utterances"]["items"] == report["num_utterances"] == 3
    assert "segment_start_within_0_5s" in report["realtime"]["sequential"]["long_form"]
    printed = capsys.readouterr().out
    assert "batched: BatchedInferencePipeline batch 16, no timestamps  (RealtimeSTT's default)" in (
        printed
    )
    # The HF checkpoint it came from, scored in beam 5 as faster-whisper decodes.
    hf_output = tmp_path / "hf.json"
    hf_model = str(random_export.parent / "best")
    assert (
        evaluate.main(
            ["--model", hf_model, *common, "--num-beams", "5", "--output", str(hf_output)]
        )
        == 0
    )
    hf_report = json.loads(hf_output.read_text())
    assert hf_report["backend"] == "transformers" and hf_report["beam_size"] == 5
    assert hf_report["num_utterances"] == 3
    capsys.readouterr()
    # An HF model cannot run in faster-whisper: a clear error before any decoding.
    code = evaluate.main(["--model", hf_model, *common, "--audio-source", "demo/corpus"])
    assert code == 2
    assert "export the model first" in capsys.readouterr().out
