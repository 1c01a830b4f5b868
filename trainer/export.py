"""Export a Hugging Face Whisper to the faster-whisper (CTranslate2) format, then check the result.

    python -m trainer.export --model runs/turbo-de/best \
        --out models/whisper-large-v3-turbo-german-ct2 --quantization int8_float16

Conversion is CTranslate2's own TransformersConverter. Around it this module adds what a
converted folder needs to be usable and trustworthy:
- tokenizer.json and preprocessor_config.json beside model.bin: faster-whisper builds its feature
  extractor from preprocessor_config.json's `feature_size` and falls back to 80 mel bins, so a
  128-bin large-v3/turbo export without it is fed the wrong features;
- an atomic output: the folder appears under its final name only when complete (and verified,
  with --strict);
- a verification: faster-whisper loads and transcribes a clip, and CTranslate2's greedy tokens
  are compared with Hugging Face's on the same features and prefix;
- a long-form check in the way RealtimeSTT calls faster-whisper (`transcribe()` with timestamps
  on and beam 5) on demo test clips joined into one long clip: segment count, WER against the
  joined references, and how far the segment starts lie from the true utterance starts
  (trainer.decoding.longform). Its figures are reported, never a reason to fail: the export cannot
  know whether the model is meant to be good yet (the demo's random preset is not). It fails only
  when faster-whisper itself fails; --strict also fails an export that gives no segment at all;
- RealtimeSTT's default call (`BatchedInferencePipeline`, VAD on, batch 16, beam 5, no
  timestamps; trainer.decoding.realtime_modes) on the verification clip and the long-form clip,
  reported with its WER where the transcript is known.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from shard_builder.contract import MAX_FRAMES
from trainer.model import window_frames

REPO = Path(__file__).resolve().parent.parent
DEMO_CORPUS_DATA = REPO / "demo" / "corpus" / "data"
SAMPLING_RATE = 16000
PROCESSOR_FILES = ("tokenizer.json", "preprocessor_config.json")


class ExportError(RuntimeError):
    """The export cannot go ahead, or its result failed a check."""


def _help(text: str, **kwargs: Any):
    return field(metadata={"help": text}, **kwargs)


@dataclass
class ExportConfig:
    model: str = _help("Hugging Face Whisper folder (e.g. RUN/best) or hub id", default="")
    out: str = _help(
        "output folder for the CTranslate2 model; must not exist (see --force)", default=""
    )
    quantization: str = _help(
        "weight type stored in model.bin: float32, float16, bfloat16, int8, int8_float16, "
        "int8_float32, int8_bfloat16, int16 (checked against ctranslate2's list)",
        default="float16",
    )
    force: bool = _help("replace an existing output folder", default=False)
    verify: bool = _help(
        "load the result with faster-whisper and compare tokens with HF", default=True
    )
    verify_audio: str = _help(
        "audio file for the check (default: a demo corpus test clip)", default=""
    )
    long_form_seconds: float = _help(
        "long-form check: join demo test clips (0.7 s of silence between) into a clip of at "
        "least this many seconds and transcribe it as RealtimeSTT does (timestamps on, beam 5); "
        "0 = skip",
        default=45.0,
    )
    strict: bool = _help(
        "fail, and leave no output, unless CTranslate2's greedy tokens equal "
        "Hugging Face's exactly",
        default=False,
    )
    language: str = _help("language token of the decoding prefix", default="de")
    task: str = _help("task token of the decoding prefix", default="transcribe")
    max_new_tokens: int = _help("longest transcript decoded by the check", default=128)
    device: str = _help("device for the check: cpu or cuda", default="cpu")
    compute_type: str = _help(
        "CTranslate2 compute type for the check ('default' follows the "
        "stored weights where the device supports them)",
        default="default",
    )


@dataclass
class Verification:
    audio: str
    prefix_tokens: list[int]
    hf_tokens: list[int]
    ct2_tokens: list[int]
    exact: bool
    agreement: float
    hf_text: str
    ct2_text: str
    faster_whisper_text: str | None  # None: faster-whisper cannot run this window (see below)
    long_form: LongFormCheck | None = None  # None: skipped, or a window faster-whisper can't run
    realtime_default: RealtimeDefaultCheck | None = None  # None: a window faster-whisper can't run


@dataclass
class RealtimeDefaultCheck:
    """RealtimeSTT's default call (trainer.decoding.realtime_modes `batched`:
    BatchedInferencePipeline, VAD on, batch 16, beam 5, no timestamps) on the verification clip
    and the long-form clip."""

    text: str  # of the verification clip
    wer_normalised: float | None  # of that clip, when it is a demo clip with a transcript
    long_form_wer_normalised: float | None  # None: the long-form check was skipped
    long_form_text: str | None
    seconds_taken: float


@dataclass
class LongFormCheck:
    """faster-whisper's transcribe() on joined demo clips, timestamps on, beam 5."""

    audio: str
    seconds: float
    utterances: int
    segments: list[dict[str, Any]]  # start, end, text
    wer_normalised: float
    wer_orthographic: float
    start_errors: list[float | None]  # per true utterance start; None = no segment paired
    summary: dict[str, float | int]  # trainer.decoding.longform.start_error_summary
    reference: str
    text: str
    seconds_taken: float


@dataclass
class ExportReport:
    out: str
    quantization: str
    n_mels: int
    window_frames: int
    vocab_size: int
    tokenizer_size: int
    bytes_on_disk: int
    convert_seconds: float
    verification: Verification | None = None
    verify_seconds: float = 0.0


# --- checks on the request ------------------------------------------------------------------


def accepted_quantizations() -> tuple[str, ...]:
    from ctranslate2.specs.model_spec import ACCEPTED_MODEL_TYPES

    return tuple(ACCEPTED_MODEL_TYPES)


def check_quantization(name: str) -> None:
    accepted = accepted_quantizations()
    if name not in accepted:
        raise ValueError(
            f"--quantization {name!r} is not one of CTranslate2's: {', '.join(accepted)}"
        )


def check_output_free(out: Path, force: bool) -> None:
    if out.exists() and not force:
        raise ExportError(f"{out} already exists; pass --force to replace it")


# --- conversion -----------------------------------------------------------------------------


def make_converter(model: str):
    """CTranslate2's converter, loading the checkpoint in float32 whatever its config says.

    The converter loads in the dtype config.json names (float16 for the hub's checkpoints). For
    weights stored float16 that is lossless, but a checkpoint saved in float32 under a float16
    config would be rounded before quantisation; from float32 the chosen type is applied once.
    """
    import torch
    from ctranslate2.converters import TransformersConverter

    class Float32Converter(TransformersConverter):
        def load_model(self, model_class, model_name_or_path, **kwargs):
            kwargs["dtype"] = torch.float32
            return model_class.from_pretrained(model_name_or_path, **kwargs)

    return Float32Converter(model)


def convert(model: str, folder: Path, quantization: str) -> None:
    make_converter(model).convert(str(folder), quantization=quantization, force=True)


def source_file(model: str, name: str) -> Path | None:
    """A file of the source model, local or from the hub cache; None when it has none."""
    if Path(model).is_dir():
        path = Path(model) / name
        return path if path.is_file() else None
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(model, name))
    except Exception:  # absent from the repo, or offline: regenerate it below
        return None


def write_tokenizer(model: str, folder: Path) -> None:
    path = source_file(model, "tokenizer.json")
    if path is not None:
        shutil.copyfile(path, folder / "tokenizer.json")
        return
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(model).backend_tokenizer.save(str(folder / "tokenizer.json"))


def write_preprocessor(model: str, folder: Path, n_mels: int, encoder_frames: int) -> None:
    """preprocessor_config.json, which faster-whisper reads for the mel bins and window.

    transformers 5 saves a processor as processor_config.json only (whisper-base here has no
    preprocessor_config.json), so the file is written from the loaded feature extractor then.
    """
    path = source_file(model, "preprocessor_config.json")
    if path is not None:
        shutil.copyfile(path, folder / "preprocessor_config.json")
    else:
        from transformers import WhisperFeatureExtractor

        extractor = WhisperFeatureExtractor.from_pretrained(model)
        extractor.to_json_file(str(folder / "preprocessor_config.json"))
    extractor = json.loads((folder / "preprocessor_config.json").read_text())
    if extractor["feature_size"] != n_mels:
        raise ExportError(
            f"the feature extractor gives {extractor['feature_size']} mel bins but the model's "
            f"num_mel_bins is {n_mels}; fix the model folder before exporting"
        )
    # faster-whisper cuts audio into windows of nb_max_frames; the encoder takes exactly that many.
    frames = extractor.get("nb_max_frames", MAX_FRAMES)
    if frames != encoder_frames:
        raise ExportError(
            f"the feature extractor's window is {frames} frames but the model's encoder takes "
            f"{encoder_frames} (2 x max_source_positions); fix the model folder before exporting"
        )


def check_vocabulary(folder: Path, vocab_size: int) -> int:
    """The converter lists tokenizer.json's tokens by id, then pads with timestamp tokens to
    the model's vocab_size (50364 + 1501 for multilingual Whisper). A tokenizer with holes in
    its ids would shift every id after the hole; check that the ids mean the same tokens."""
    from tokenizers import Tokenizer

    vocabulary = json.loads((folder / "vocabulary.json").read_text(encoding="utf-8"))
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tokenizer_size = tokenizer.get_vocab_size(with_added_tokens=True)
    if len(vocabulary) != vocab_size or tokenizer_size > vocab_size:
        raise ExportError(
            f"vocabulary.json has {len(vocabulary)} tokens and tokenizer.json "
            f"{tokenizer_size}, the model {vocab_size}"
        )
    for token, token_id in tokenizer.get_vocab(with_added_tokens=True).items():
        if vocabulary[token_id] != token:
            raise ExportError(
                f"id {token_id} is {token!r} in tokenizer.json but "
                f"{vocabulary[token_id]!r} in the converted vocabulary"
            )
    return tokenizer_size


# --- verification ---------------------------------------------------------------------------


def load_audio(path: str) -> tuple[np.ndarray, str]:
    """The clip to verify with, 16 kHz mono float32: --verify-audio or a demo test clip."""
    from shard_builder.audio import RejectedRow, decode_audio

    if path:
        try:
            return decode_audio(Path(path).read_bytes()), path
        except RejectedRow as error:
            raise ValueError(f"--verify-audio {path}: {error}") from None
    return first_demo_clip()


def demo_transcript(audio_name: str) -> str | None:
    """The transcript of a clip `first_demo_clip` named; None for any other audio."""
    import pyarrow.parquet as pq

    file_name, _, clip_path = audio_name.partition(":")
    path = DEMO_CORPUS_DATA / file_name
    if not clip_path or not path.is_file():
        return None
    table = pq.read_table(path, columns=["audio", "transkription"])
    for row, text in zip(
        table.column("audio").to_pylist(), table.column("transkription").to_pylist(), strict=True
    ):
        if row["path"] == clip_path:
            return text
    return None


def first_demo_clip() -> tuple[np.ndarray, str]:
    import pyarrow.parquet as pq

    from shard_builder.audio import RejectedRow, decode_audio

    files = sorted(DEMO_CORPUS_DATA.glob("test-*.parquet"))
    if not files:
        raise ValueError("no demo corpus to verify with: pass --verify-audio FILE or --no-verify")
    for row in pq.read_table(files[0], columns=["audio"]).column("audio").to_pylist():
        try:
            return decode_audio(row["bytes"]), f"{files[0].name}:{row['path']}"
        except RejectedRow:
            continue
    raise ValueError(f"{files[0]} holds no decodable clip")


LONG_FORM_GAP_SECONDS = 0.7
LONG_FORM_BEAM_SIZE = 5  # RealtimeSTT's


def demo_long_clip(min_seconds: float) -> tuple[np.ndarray, list[float], list[str], str]:
    """(audio, true start of each utterance, its transcript, a name): consecutive decodable demo
    test clips joined with LONG_FORM_GAP_SECONDS of silence until at least `min_seconds`."""
    import pyarrow.parquet as pq

    from shard_builder.audio import RejectedRow, decode_audio
    from trainer.decoding.longform import join_clips

    files = sorted(DEMO_CORPUS_DATA.glob("test-*.parquet"))
    if not files:
        raise ValueError("no demo corpus for the long-form check: pass --long-form-seconds 0")
    table = pq.read_table(files[0], columns=["audio", "transkription"])
    clips, texts, seconds = [], [], 0.0
    for row, text in zip(
        table.column("audio").to_pylist(), table.column("transkription").to_pylist(), strict=True
    ):
        try:
            clip = decode_audio(row["bytes"])
        except RejectedRow:
            continue
        clips.append(clip)
        texts.append(text)
        seconds += len(clip) / SAMPLING_RATE + LONG_FORM_GAP_SECONDS
        if seconds >= min_seconds:
            break
    audio, offsets = join_clips(clips, LONG_FORM_GAP_SECONDS, SAMPLING_RATE)
    return audio, offsets, texts, f"{files[0].name}: first {len(clips)} clips joined"


def long_form_check(folder: Path, config: ExportConfig) -> LongFormCheck | None:
    """RealtimeSTT's call on a long clip: `transcribe(audio, language, beam_size=5)` with
    faster-whisper's defaults otherwise (timestamps on, temperature fallback, previous text as
    prompt, no VAD). None when skipped or when faster-whisper cannot run the model's window."""
    from faster_whisper import WhisperModel

    from trainer.decoding.ct2_backend import export_window_frames
    from trainer.decoding.longform import match_starts, start_error_summary
    from trainer.watch.metrics import wer_report

    if config.long_form_seconds <= 0 or export_window_frames(folder) != FASTER_WHISPER_FRAMES:
        return None
    audio, offsets, texts, name = demo_long_clip(config.long_form_seconds)
    started = time.perf_counter()
    model = WhisperModel(str(folder), device=config.device, compute_type=config.compute_type)
    segments, _ = model.transcribe(
        audio, language=config.language, task=config.task, beam_size=LONG_FORM_BEAM_SIZE
    )
    segments = [
        {"start": round(s.start, 2), "end": round(s.end, 2), "text": s.text} for s in segments
    ]
    reference = " ".join(texts)
    text = " ".join(s["text"].strip() for s in segments).strip()
    wer = wer_report([reference], [text], ["long-form"])
    errors = match_starts(offsets, [s["start"] for s in segments])
    return LongFormCheck(
        audio=name,
        seconds=len(audio) / SAMPLING_RATE,
        utterances=len(texts),
        segments=segments,
        wer_normalised=wer["wer_normalised"],
        wer_orthographic=wer["wer_orthographic"],
        start_errors=errors,
        summary=start_error_summary(errors),
        reference=reference,
        text=text,
        seconds_taken=time.perf_counter() - started,
    )


def realtime_default_check(
    folder: Path, audio: np.ndarray, audio_name: str, config: ExportConfig
) -> RealtimeDefaultCheck | None:
    """What RealtimeSTT's defaults make of the verification clip and of the long-form clip;
    None for a model whose window faster-whisper cannot feed."""
    from trainer.decoding.ct2_backend import export_window_frames
    from trainer.decoding.realtime_modes import DEFAULT_MODE, MODES, RealtimeTranscriber
    from trainer.watch.metrics import wer_report

    if export_window_frames(folder) != FASTER_WHISPER_FRAMES:
        return None
    started = time.perf_counter()
    mode = MODES[DEFAULT_MODE]
    transcriber = RealtimeTranscriber(
        folder,
        device=config.device,
        compute_type=config.compute_type,
        language=config.language,
        task=config.task,
        max_new_tokens=config.max_new_tokens,
    )
    text = " ".join(s["text"] for s in transcriber(audio, mode, None)).strip()
    reference = demo_transcript(audio_name)
    wer = None if reference is None else wer_report([reference], [text], ["x"])["wer_normalised"]
    long_wer, long_text = None, None
    if config.long_form_seconds > 0:
        long_audio, _, texts, _ = demo_long_clip(config.long_form_seconds)
        transcriber.max_new_tokens = None  # as RealtimeSTT calls it; a window may hold much
        long_text = " ".join(s["text"] for s in transcriber(long_audio, mode, None)).strip()
        long_wer = wer_report([" ".join(texts)], [long_text], ["x"])["wer_normalised"]
    return RealtimeDefaultCheck(
        text=text,
        wer_normalised=wer,
        long_form_wer_normalised=long_wer,
        long_form_text=long_text,
        seconds_taken=time.perf_counter() - started,
    )


def hf_greedy_tokens(
    model: str, features: np.ndarray, prefix: list[int], max_new_tokens: int, eot_id: int
) -> list[int]:
    """Hugging Face generate, greedy, forced prefix; text ids without the prefix and end token."""
    import torch
    from transformers import WhisperForConditionalGeneration

    hf_model = WhisperForConditionalGeneration.from_pretrained(model, dtype=torch.float32).eval()
    with torch.no_grad():
        sequence = hf_model.generate(
            torch.from_numpy(features),
            decoder_input_ids=torch.tensor([prefix]),
            max_new_tokens=max_new_tokens,
            num_beams=1,
            do_sample=False,
        )[0].tolist()
    if sequence[: len(prefix)] == prefix:  # some transformers versions return the prefix too
        sequence = sequence[len(prefix) :]
    return sequence[: sequence.index(eot_id)] if eot_id in sequence else sequence


def token_agreement(reference: list[int], candidate: list[int]) -> float:
    """Share of positions holding the same token, over the longer sequence (1.0 if both empty)."""
    longest = max(len(reference), len(candidate))
    if longest == 0:
        return 1.0
    return sum(a == b for a, b in zip(reference, candidate, strict=False)) / longest


# faster-whisper (1.2) pads or trims every window's features to 3000 frames
# (faster_whisper.audio.pad_or_trim), so only models with Whisper's 30 s window run in its
# transcribe(); CTranslate2 itself runs any window.
FASTER_WHISPER_FRAMES = MAX_FRAMES


def faster_whisper_text(folder: Path, audio: np.ndarray, config: ExportConfig) -> str | None:
    """What a real-time tool would get: faster-whisper's own loading, features and decoding;
    None for a model whose window faster-whisper cannot feed."""
    from faster_whisper import WhisperModel

    from trainer.decoding.ct2_backend import export_window_frames

    if export_window_frames(folder) != FASTER_WHISPER_FRAMES:
        return None

    model = WhisperModel(str(folder), device=config.device, compute_type=config.compute_type)
    segments, _ = model.transcribe(
        audio,
        language=config.language,
        task=config.task,
        beam_size=1,
        temperature=0.0,
        without_timestamps=True,
        condition_on_previous_text=False,
        compression_ratio_threshold=None,
        log_prob_threshold=None,
        no_speech_threshold=None,
        max_new_tokens=config.max_new_tokens,
        vad_filter=False,
    )
    return "".join(segment.text for segment in segments).strip()


def verify(folder: Path, config: ExportConfig) -> Verification:
    from transformers import AutoTokenizer, WhisperFeatureExtractor

    from trainer.decoding.ct2_backend import CT2Transcriber

    audio, audio_name = load_audio(config.verify_audio)
    features = WhisperFeatureExtractor.from_pretrained(config.model)(
        audio, sampling_rate=SAMPLING_RATE, return_tensors="np"
    ).input_features.astype(np.float32)
    transcriber = CT2Transcriber(folder, device=config.device, compute_type=config.compute_type)
    prefix = transcriber.prefix_tokens(config.language, config.task)
    tokenizer = AutoTokenizer.from_pretrained(config.model)
    names = [
        "<|startoftranscript|>",
        f"<|{config.language}|>",
        f"<|{config.task}|>",
        "<|notimestamps|>",
    ]
    if tokenizer.convert_tokens_to_ids(names) != prefix:
        raise ExportError(
            f"the exported tokenizer.json gives prefix {prefix}, the model's "
            f"tokenizer {tokenizer.convert_tokens_to_ids(names)}"
        )
    ct2_tokens = transcriber.generate_tokens(features, prefix, config.max_new_tokens)[0]
    hf_tokens = hf_greedy_tokens(
        config.model, features, prefix, config.max_new_tokens, transcriber.eot_id
    )
    return Verification(
        audio=audio_name,
        prefix_tokens=prefix,
        hf_tokens=hf_tokens,
        ct2_tokens=ct2_tokens,
        exact=hf_tokens == ct2_tokens,
        agreement=token_agreement(hf_tokens, ct2_tokens),
        hf_text=transcriber.decode(hf_tokens),
        ct2_text=transcriber.decode(ct2_tokens),
        faster_whisper_text=faster_whisper_text(folder, audio, config),
        long_form=long_form_check(folder, config),
        realtime_default=realtime_default_check(folder, audio, audio_name, config),
    )


# --- the export as a whole ------------------------------------------------------------------


def folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def publish(staging: Path, out: Path) -> None:
    """Rename the finished folder into place; an old one is moved aside first, then removed,
    so at every moment `out` is either the old complete export or the new one."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
    staging.rename(out)
    if old is not None:
        shutil.rmtree(old)


def export(config: ExportConfig) -> ExportReport:
    from transformers import AutoConfig

    check_quantization(config.quantization)
    out = Path(config.out)
    check_output_free(out, config.force)
    model_config = AutoConfig.from_pretrained(config.model)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        started = time.perf_counter()
        convert(config.model, staging, config.quantization)
        write_tokenizer(config.model, staging)
        write_preprocessor(
            config.model, staging, model_config.num_mel_bins, window_frames(model_config)
        )
        tokenizer_size = check_vocabulary(staging, model_config.vocab_size)
        report = ExportReport(
            out=str(out),
            quantization=config.quantization,
            n_mels=model_config.num_mel_bins,
            window_frames=window_frames(model_config),
            vocab_size=model_config.vocab_size,
            tokenizer_size=tokenizer_size,
            bytes_on_disk=folder_bytes(staging),
            convert_seconds=time.perf_counter() - started,
        )
        if config.verify:
            started = time.perf_counter()
            report.verification = verify(staging, config)
            report.verify_seconds = time.perf_counter() - started
            if config.strict and not report.verification.exact:
                raise ExportError(
                    "--strict: CTranslate2's greedy tokens differ from Hugging "
                    f"Face's (agreement {report.verification.agreement:.3f})"
                )
            long_form = report.verification.long_form
            if config.strict and long_form is not None and not long_form.segments:
                raise ExportError(
                    "--strict: faster-whisper's transcribe() (timestamps on, beam 5) gave no "
                    f"segment for the {long_form.seconds:.0f} s long-form clip"
                )
        (staging / "export_report.json").write_text(json.dumps(asdict(report), indent=2) + "\n")
        write_model_card(config.model, staging, out)
        publish(staging, out)
        return report
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def write_model_card(model: str, staging: Path, out: Path) -> None:
    """README.md in the export: the model card of trainer.model_card, from the model's run folder
    (trainer.publish writes it again with the hub repo names)."""
    from trainer.model_card import CardError, gather_inputs, make_card, write_card

    try:
        inputs = gather_inputs(str(out), "ctranslate2", Path(model), ct2_folder=staging)
        write_card(staging, make_card(inputs))
    except CardError as error:  # the export itself is sound; only its description is missing
        print(f"warning: no model card written: {error}", file=sys.stderr)


def print_report(report: ExportReport) -> None:
    print(f"exported {report.out}")
    print(f"  quantization  {report.quantization}")
    print(f"  size on disk  {report.bytes_on_disk / 1e6:.1f} MB")
    print(f"  n_mels        {report.n_mels} (preprocessor_config.json feature_size)")
    note = (
        ""
        if report.window_frames == FASTER_WHISPER_FRAMES
        else (
            ": shorter than Whisper's 30 s, so CTranslate2 runs it but faster-whisper's "
            "transcribe() does not"
        )
    )
    print(f"  window        {report.window_frames} frames{note}")
    print(
        f"  vocabulary    {report.vocab_size} ids ({report.tokenizer_size} in tokenizer.json, "
        f"the rest timestamp tokens)"
    )
    print(f"  conversion    {report.convert_seconds:.1f} s")
    check = report.verification
    if check is None:
        print("  verification  skipped (--no-verify)")
        return
    verdict = "exact" if check.exact else f"{check.agreement:.1%} of positions agree"
    print(f"  verification  {verdict} on {check.audio} ({report.verify_seconds:.1f} s)")
    print(f"    HF greedy      {len(check.hf_tokens)} tokens: {check.hf_text!r}")
    print(f"    CT2 greedy     {len(check.ct2_tokens)} tokens: {check.ct2_text!r}")
    if check.faster_whisper_text is None:
        print(
            f"    faster-whisper not run: its transcribe() takes {FASTER_WHISPER_FRAMES}-frame "
            "(30 s) windows only, and this model's window is shorter; CTranslate2 runs it, as "
            "above and through trainer.evaluate"
        )
    else:
        print(f"    faster-whisper {check.faster_whisper_text!r}")
    print_long_form(check.long_form)
    print_realtime_default(check.realtime_default)


def print_realtime_default(check: RealtimeDefaultCheck | None) -> None:
    if check is None:
        print("  RealtimeSTT   not run (a window other than 30 s)")
        return
    print(
        "  RealtimeSTT   default call: BatchedInferencePipeline, VAD on, batch 16, beam 5, "
        f"no timestamps ({check.seconds_taken:.1f} s)"
    )
    wer = "" if check.wer_normalised is None else f" (WER normalised {check.wer_normalised:.1%})"
    print(f"    clip       {check.text!r}{wer}")
    if check.long_form_wer_normalised is not None:
        print(f"    long-form  WER normalised {check.long_form_wer_normalised:.1%}")


def print_long_form(check: LongFormCheck | None) -> None:
    if check is None:
        print("  long-form     not run (--long-form-seconds 0, or a window other than 30 s)")
        return
    summary = check.summary
    print(
        f"  long-form     faster-whisper transcribe(), timestamps on, beam "
        f"{LONG_FORM_BEAM_SIZE}, on {check.seconds:.1f} s ({check.audio}; "
        f"{check.seconds_taken:.1f} s)"
    )
    print(
        f"    {len(check.segments)} segments for {check.utterances} utterances; WER normalised "
        f"{100 * check.wer_normalised:.1f} %, orthographic {100 * check.wer_orthographic:.1f} %"
    )
    print(
        f"    segment starts vs true: median error "
        f"{summary['segment_start_error_median_s']:.2f} s, within 0.5 s "
        f"{100 * summary['segment_start_within_0_5s']:.0f} %, missed "
        f"{100 * summary['segment_start_missed']:.0f} %"
    )
    if not check.segments:
        print("    warning: no segment at all (expected only from an untrained model)")


def parse_args(argv: list[str] | None = None) -> ExportConfig:
    parser = argparse.ArgumentParser(
        prog="python -m trainer.export",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    for spec in fields(ExportConfig):
        flag = "--" + spec.name.replace("_", "-")
        if spec.type == "bool" and spec.default:
            parser.add_argument(
                "--no-" + spec.name.replace("_", "-"),
                dest=spec.name,
                action="store_false",
                help=spec.metadata["help"],
            )
        elif spec.type == "bool":
            parser.add_argument(flag, action="store_true", help=spec.metadata["help"])
        else:
            kind = {"int": int, "float": float}.get(spec.type, str)
            parser.add_argument(
                flag,
                type=kind,
                default=spec.default,
                required=spec.name in ("model", "out"),
                help=spec.metadata["help"],
            )
    return ExportConfig(**vars(parser.parse_args(argv)))


def main(argv: list[str] | None = None) -> int:
    from shard_builder.config import load_dotenv_file

    load_dotenv_file()  # HF_HOME and the like, before anything imports huggingface_hub
    config = parse_args(argv)
    try:
        report = export(config)
    except ImportError as error:
        print(
            f"error: {error}; install the export extra: pip install -e '.[export]'", file=sys.stderr
        )
        return 2
    except (ExportError, ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print_report(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
