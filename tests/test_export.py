"""trainer.export and trainer.decoding.ct2_backend on the tiny preset (random weights, fixed seed).

A random model decodes garbage that runs to the length limit, so every decode here is kept
short; exact token agreement still means something because greedy search compares argmaxes
over the full 51865-entry vocabulary at every step.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import REPO, TINY_MODEL, set_window

pytest.importorskip("ctranslate2")
pytest.importorskip("faster_whisper")

from trainer.decoding.ct2_backend import CT2Transcriber  # noqa: E402
from trainer.export import (  # noqa: E402
    ExportConfig,
    ExportError,
    export,
    first_demo_clip,
    print_report,
)

PROCESSOR_FILES = [
    "tokenizer.json",
    "tokenizer_config.json",
    "generation_config.json",
    "preprocessor_config.json",
    "processor_config.json",
]
MAX_NEW_TOKENS = 12
LONG_FORM_WER, LONG_FORM_WITHIN = 0.5, 0.75  # untouched whisper-base: 34 % and 100 % measured


def save_random_whisper(folder: Path, num_mel_bins: int = 80, window_seconds: int = 30) -> Path:
    """The tiny preset with seeded random weights, saved like a trainer's RUN/best folder, with
    Whisper's 30 s window by default (what faster-whisper's transcribe() runs)."""
    import torch
    from transformers import GenerationConfig, WhisperConfig, WhisperForConditionalGeneration

    config = WhisperConfig.from_pretrained(TINY_MODEL)
    config.num_mel_bins = num_mel_bins
    config.max_source_positions = window_seconds * 50
    torch.manual_seed(1234)
    model = WhisperForConditionalGeneration(config)
    model.generation_config = GenerationConfig.from_pretrained(TINY_MODEL)
    model.save_pretrained(folder)
    for name in PROCESSOR_FILES:
        shutil.copyfile(TINY_MODEL / name, folder / name)
    set_window(folder, window_seconds)
    return folder


def export_config(model: Path, out: Path, **overrides) -> ExportConfig:
    """Short decodes; no long-form check (a random model runs it to every limit: ~15-30 s on
    two cores) except where a test asks for it."""
    settings = dict(
        model=str(model), out=str(out), max_new_tokens=MAX_NEW_TOKENS, long_form_seconds=0
    )
    settings.update(overrides)
    return ExportConfig(**settings)


def demo_features(model: Path, count: int) -> np.ndarray:
    """Hugging Face features of the first `count` good demo test clips."""
    import pyarrow.parquet as pq
    from transformers import WhisperFeatureExtractor

    from shard_builder.audio import decode_audio

    parquet = next((REPO / "demo" / "corpus" / "data").glob("test-*.parquet"))
    rows = pq.read_table(parquet, columns=["audio"]).column("audio").to_pylist()[:count]
    clips = [decode_audio(row["bytes"]) for row in rows]
    extractor = WhisperFeatureExtractor.from_pretrained(model)
    features = extractor(clips, sampling_rate=16000, return_tensors="np").input_features
    return features.astype(np.float32)


def hf_greedy(model: Path, features: np.ndarray, prefix: list[int], new_tokens: int):
    import torch
    from transformers import WhisperForConditionalGeneration

    hf_model = WhisperForConditionalGeneration.from_pretrained(model, dtype=torch.float32).eval()
    with torch.no_grad():
        sequences = hf_model.generate(
            torch.from_numpy(features),
            decoder_input_ids=torch.tensor([prefix] * len(features)),
            max_new_tokens=new_tokens,
            do_sample=False,
            num_beams=1,
        ).tolist()
    eot = hf_model.generation_config.eos_token_id
    return [s[: s.index(eot)] if eot in s else s for s in sequences]


@pytest.fixture(scope="module")
def tiny_model(module_tmp) -> Path:
    return save_random_whisper(module_tmp("tiny-random") / "best")


@pytest.fixture(scope="module")
def float32_export(tiny_model, module_tmp):
    out = module_tmp("exports") / "tiny-ct2-float32"
    config = export_config(tiny_model, out, quantization="float32", strict=True)
    config.long_form_seconds = 31.0  # just over one window: faster-whisper seeks on
    return out, export(config)


def test_float32_export_matches_hf_and_runs_in_faster_whisper(float32_export):
    out, report = float32_export
    check = report.verification
    assert check.exact, (check.hf_tokens, check.ct2_tokens)
    assert check.agreement == 1.0
    assert check.prefix_tokens == [50258, 50261, 50359, 50363]
    assert 0 < len(check.hf_tokens) <= MAX_NEW_TOKENS
    assert isinstance(check.faster_whisper_text, str)
    assert report.quantization == "float32" and report.n_mels == 80
    assert report.vocab_size == 51865
    saved = json.loads((out / "export_report.json").read_text())
    assert saved["verification"]["exact"] is True


def test_long_form_check_runs_transcribe_with_timestamps(float32_export, capsys):
    """RealtimeSTT's call (timestamps on, beam 5) on joined demo clips: figures, not a verdict,
    for a random model."""
    out, report = float32_export
    check = report.verification.long_form
    assert check is not None and check.seconds >= 31.0 and check.utterances >= 8
    assert len(check.start_errors) == check.utterances
    assert check.segments and all(s["end"] >= s["start"] >= 0 for s in check.segments)
    assert set(check.summary) >= {"segment_start_error_median_s", "segment_start_within_0_5s"}
    saved = json.loads((out / "export_report.json").read_text())
    assert saved["verification"]["long_form"]["utterances"] == check.utterances
    print_report(report)
    printed = capsys.readouterr().out
    assert "long-form     faster-whisper transcribe(), timestamps on, beam 5" in printed
    assert f"{len(check.segments)} segments for {check.utterances} utterances" in printed
    # RealtimeSTT's default call on the verification clip (a demo clip: its WER is known) and
    # on the long-form clip.
    default = report.verification.realtime_default
    assert isinstance(default.text, str) and default.wer_normalised > 0.5  # random weights
    assert default.long_form_wer_normalised is not None
    assert saved["verification"]["realtime_default"]["text"] == default.text
    assert "RealtimeSTT   default call: BatchedInferencePipeline, VAD on, batch 16" in printed


def test_output_holds_processor_files_and_nothing_partial(float32_export):
    out, report = float32_export
    names = {path.name for path in out.iterdir()}
    assert {"model.bin", "config.json", "vocabulary.json"} <= names
    assert {"tokenizer.json", "preprocessor_config.json"} <= names
    preprocessor = json.loads((out / "preprocessor_config.json").read_text())
    assert preprocessor["feature_size"] == report.n_mels == 80
    assert (out / "tokenizer.json").read_bytes() == (TINY_MODEL / "tokenizer.json").read_bytes()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]


def test_faster_whisper_reads_the_exported_folder(float32_export):
    from faster_whisper import WhisperModel

    out, _ = float32_export
    model = WhisperModel(str(out), device="cpu", compute_type="float32")
    assert model.feature_extractor.mel_filters.shape[0] == 80
    audio, _ = first_demo_clip()
    segments, info = model.transcribe(
        audio,
        language="de",
        beam_size=1,
        temperature=0.0,
        without_timestamps=True,
        max_new_tokens=MAX_NEW_TOKENS,
        condition_on_previous_text=False,
    )
    list(segments)  # decoding is lazy: consume it to run it
    assert info.language == "de"


def test_ct2_transcriber_batch_equals_hf_at_every_length(tiny_model, float32_export):
    """Batched greedy tokens equal HF's for several limits; a random model never stops early,
    so this also pins `max_length` to mean new tokens (CTranslate2 4.8.5 counts otherwise)."""
    out, _ = float32_export
    transcriber = CT2Transcriber(out)
    prefix = transcriber.prefix_tokens("de", "transcribe")
    features = demo_features(tiny_model, 3)
    for new_tokens in (1, 5, 20):
        ours = transcriber.generate_tokens(features, prefix, max_length=new_tokens)
        assert ours == hf_greedy(tiny_model, features, prefix, new_tokens)
        assert all(len(ids) <= new_tokens for ids in ours)
        assert all(transcriber.eot_id not in ids and ids[:1] != prefix[:1] for ids in ours)
    assert isinstance(transcriber.decode(ours[0]), str)
    beams = transcriber.generate_tokens(features, prefix, max_length=5, beam_size=2)
    assert len(beams) == 3 and all(len(ids) <= 5 for ids in beams)


@pytest.mark.parametrize("shape", [(1, 128, 3000), (1, 80, 500)])
def test_ct2_transcriber_rejects_features_of_the_wrong_shape(float32_export, shape):
    transcriber = CT2Transcriber(float32_export[0])
    assert transcriber.window_frames == 3000  # read from the export's preprocessor_config.json
    with pytest.raises(ValueError, match=r"\[batch, 80, 3000\]"):
        transcriber.generate_tokens(np.zeros(shape, np.float32), [50258], 4)


def test_a_short_window_model_exports_and_says_faster_whisper_cannot_run_it(tmp_path, capsys):
    """The tiny preset's 5 s window: CTranslate2 runs it exactly; faster-whisper's transcribe()
    pads every window to 3000 frames, so the export says so instead of crashing in it."""
    model = save_random_whisper(tmp_path / "best", window_seconds=5)
    out = tmp_path / "ct2"
    report = export(export_config(model, out, quantization="float32", strict=True))
    print_report(report)
    assert report.window_frames == 500 and report.verification.exact
    assert report.verification.faster_whisper_text is None
    assert CT2Transcriber(out).window_frames == 500
    printed = capsys.readouterr().out
    assert "window        500 frames" in printed and "faster-whisper not run" in printed
    assert report.verification.long_form is None and "long-form     not run" in printed
    assert report.verification.realtime_default is None and "RealtimeSTT   not run" in printed


def test_int8_export_loads_and_runs(tiny_model, float32_export, tmp_path):
    out = tmp_path / "tiny-ct2-int8"
    report = export(export_config(tiny_model, out, quantization="int8"))
    check = report.verification
    assert 0.0 <= check.agreement <= 1.0 and len(check.ct2_tokens) <= MAX_NEW_TOKENS
    assert isinstance(check.faster_whisper_text, str)
    float32_bytes = (float32_export[0] / "model.bin").stat().st_size
    assert (out / "model.bin").stat().st_size < 0.5 * float32_bytes


def test_128_bin_model_from_processor_config_only(tmp_path):
    """transformers 5 saves processor_config.json only; the export must still tell faster-whisper
    about 128 bins, or it would build 80-bin features (the large-v3 conversion pitfall)."""
    from faster_whisper import WhisperModel

    model = save_random_whisper(tmp_path / "tiny-128", num_mel_bins=128)
    (model / "preprocessor_config.json").unlink()
    processor = json.loads((model / "processor_config.json").read_text())
    processor["feature_extractor"]["feature_size"] = 128
    (model / "processor_config.json").write_text(json.dumps(processor))
    out = tmp_path / "tiny-128-ct2"
    report = export(export_config(model, out, quantization="float32", strict=True))
    assert report.n_mels == 128 and report.verification.exact
    assert json.loads((out / "preprocessor_config.json").read_text())["feature_size"] == 128
    assert WhisperModel(str(out)).feature_extractor.mel_filters.shape[0] == 128


def test_refuses_to_overwrite_without_force(tiny_model, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("an earlier export")
    with pytest.raises(ExportError, match="--force"):
        export(export_config(tiny_model, out, verify=False))
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    export(export_config(tiny_model, out, verify=False, force=True))
    assert (out / "model.bin").is_file() and not (out / "keep.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


def test_failed_conversion_leaves_no_folder(tmp_path):
    out = tmp_path / "never"
    with pytest.raises(Exception):  # noqa: B017 - the preset has no weights: any load error
        export(export_config(TINY_MODEL, out, verify=False))
    assert list(tmp_path.iterdir()) == []


def test_cli_rejects_an_unknown_quantization(tiny_model, tmp_path):
    out = tmp_path / "bad"
    command = [
        sys.executable,
        "-m",
        "trainer.export",
        "--model",
        str(tiny_model),
        "--out",
        str(out),
        "--quantization",
        "int4",
    ]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert "'int4' is not one of CTranslate2's" in result.stderr
    assert "int8_float16" in result.stderr and "float32" in result.stderr
    assert not out.exists()


@pytest.mark.slow
@pytest.mark.real_model
def test_whisper_base_faster_whisper_transcript_equals_hf(whisper_base_dir, tmp_path):
    """Real German output: faster-whisper (own features, own decoding loop) says what HF says."""
    out = tmp_path / "whisper-base-ct2"
    config = export_config(
        whisper_base_dir,
        out,
        quantization="float32",
        strict=True,
        max_new_tokens=128,
        long_form_seconds=45,
    )
    check = export(config).verification
    assert check.exact and len(check.hf_tokens) > 3
    assert check.faster_whisper_text == check.hf_text
    assert json.loads((out / "preprocessor_config.json").read_text())["feature_size"] == 80
    # The long clip through RealtimeSTT's call: untouched whisper-base transcribes the demo's
    # synthetic German loosely but finds the utterances (figures in docs/conversion.md).
    long_form = check.long_form
    assert long_form.seconds >= 45 and len(long_form.segments) >= long_form.utterances // 2
    assert long_form.wer_normalised < LONG_FORM_WER
    assert long_form.summary["segment_start_within_0_5s"] >= LONG_FORM_WITHIN
