"""Evaluation: batched decoding on the shards, split across ranks, WER on rank 0.

Used during training (`evaluate_split`) and as a command line tool:

    python -m trainer.evaluate --model runs/turbo-de/best --shards /raid/shards/test
    torchrun --nproc_per_node=2 -m trainer.evaluate --model openai/whisper-large-v3-turbo ...

--model is any Whisper folder or hub id, or a CTranslate2 export (a folder holding model.bin),
decoded through trainer.decoding.ct2_backend so both can be compared on the same shards.
`--beam-size` (alias `--num-beams`) scores either in greedy (1, the default) or beam search (5 is
faster-whisper's and RealtimeSTT's).

The product's own decoding: with `--audio-source DATASET` (the dataset the split was built
from; the shards hold features, faster-whisper takes audio) a CTranslate2 export is also run
through faster-whisper in RealtimeSTT's modes (trainer.decoding.realtime_modes:
`BatchedInferencePipeline` with VAD, batch 16, beam 5, no timestamps, its default;
`WhisperModel.transcribe` with timestamps, its `batch_size=0`; each with and without an
`initial_prompt`), on single utterances and on long files joined from the split:

    python -m trainer.evaluate --model models/ct2 --shards SHARDS/test --audio-source demo/corpus

The per-utterance WER is the headline (it is what published Whisper WERs mean). Beside it, the
packed evaluation (`evaluate_packed`, on by default in training, `--packed` here) decodes the
split as real-time tools do: utterances in stored order packed into full windows
(trainer.data.packing, a fixed silence between them), timestamps on, no prompt. It reports the WER
of the windows and how far the predicted segment starts lie from the true ones
(trainer.decoding.longform).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from shard_builder import contract, storage
from shard_builder.reader import ShardReader
from trainer.data.loader import (
    DataConfig,
    check_split,
    decode_sample,
    eval_batches,
    pad_features_to_full,
)
from trainer.data.packing import (
    PackingLimits,
    WindowChoices,
    WindowTargets,
    build_length_index,
    build_window,
    collate_windows,
    plan_windows,
    window_features_to_full,
)
from trainer.decoding.longform import match_starts, segments_from_ids, start_error_summary
from trainer.model import window_frames
from trainer.runtime import distributed, gpu
from trainer.runtime.distributed import Dist
from trainer.watch.metrics import format_report, utterance_wer, wer_report

PREFIX_WITH_TIMESTAMPS = 3  # <|startoftranscript|><|lang|><|task|>


def _help(text: str, **kwargs: Any):
    return field(metadata={"help": text}, **kwargs)


@dataclass
class EvalConfig:
    eval_every: int = _help(
        "evaluate every N optimiser steps (and at the end; 0 = only at the end)", default=1000
    )
    eval_batch_size: int = _help("samples per device per decoding batch", default=8)
    beam_size: int = _help("1 = greedy decoding; more = beam search", default=1)
    max_new_tokens: int = _help("longest transcript generated, in tokens", default=225)
    best_metric: str = _help(
        "metric that picks RUN/best: wer_normalised or wer_orthographic (lower is better)",
        default="wer_normalised",
    )
    eval_at_start: bool = _help(
        "also evaluate before the first step (the baseline WER)", default=False
    )
    packed_eval: bool = _help(
        "also decode the eval split packed into full windows (stored order, a fixed silence "
        "between utterances), timestamps on, no prompt: window WER and the error of predicted "
        "segment starts against the true ones",
        default=True,
    )
    packed_eval_windows: int | None = _help(
        "packed evaluation: only the first N windows (None = all; the windows are packed from "
        "the same samples as the per-utterance evaluation, eval_limit included)",
        default=256,
    )
    packed_gap_seconds: float = _help(
        "packed evaluation: silence between consecutive utterances of a window", default=0.5
    )


# --- decoders: features padded to the model's window in, text out -----------------------------


class HFDecoder:
    """Whisper generate() with language and task forced; no timestamps, or (`timestamped`) with
    them."""

    def __init__(self, model, tokenizer, language: str, task: str, precision: str) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.language, self.task, self.precision = language, task, precision
        self.window_frames = window_frames(model.config)
        self.max_target_positions = int(model.config.max_target_positions)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def __call__(self, features: torch.Tensor, max_new_tokens: int, beam_size: int) -> list[str]:
        from trainer.runtime.optim import autocast

        was_training = self.model.training
        self.model.eval()
        with torch.no_grad(), autocast(self.precision, self.device):
            sequences = self.model.generate(
                input_features=features,
                language=self.language,
                task=self.task,
                return_timestamps=False,
                num_beams=beam_size,
                do_sample=False,
                max_new_tokens=max_new_tokens,
                use_cache=True,
            )
        self.model.train(was_training)
        if not isinstance(sequences, torch.Tensor):
            sequences = sequences["sequences"]
        return self.tokenizer.batch_decode(sequences, skip_special_tokens=True)

    def timestamped(
        self, features: torch.Tensor, max_new_tokens: int, beam_size: int
    ) -> list[list[int]]:
        """Token ids per window (prefix included), decoded with Whisper's timestamp rules.

        One decoding pass per window (`force_unique_generate_call`): transformers would
        otherwise decode again from the last timestamp, as its long-form mode does.
        """
        from trainer.runtime.optim import autocast

        room = self.max_target_positions - PREFIX_WITH_TIMESTAMPS
        was_training = self.model.training
        self.model.eval()
        with torch.no_grad(), autocast(self.precision, self.device):
            output = self.model.generate(
                input_features=features,
                language=self.language,
                task=self.task,
                return_timestamps=True,
                force_unique_generate_call=True,
                return_dict_in_generate=True,
                num_beams=beam_size,
                do_sample=False,
                max_new_tokens=min(max_new_tokens, room),
                use_cache=True,
            )
        self.model.train(was_training)
        sequences = output["sequences"] if isinstance(output, dict) else output.sequences
        return sequences.tolist()


class CT2Decoder:
    """A CTranslate2 export (trainer.decoding.ct2_backend), imported only when one is evaluated."""

    def __init__(self, folder: str, device: str, language: str, task: str) -> None:
        from trainer.decoding.ct2_backend import CT2Transcriber

        self.transcriber = CT2Transcriber(folder, device="cuda" if device == "cuda" else "cpu")
        self.tokenizer = self.transcriber.tokenizer
        self.folder = Path(folder)
        self.prefix = self.transcriber.prefix_tokens(language, task)
        self.window_frames = self.transcriber.window_frames
        self.device = torch.device("cpu")  # features go to CTranslate2 as numpy

    def __call__(self, features: torch.Tensor, max_new_tokens: int, beam_size: int) -> list[str]:
        ids = self.transcriber.generate_tokens(
            features.float().cpu().numpy(),
            prefix_tokens=self.prefix,
            max_length=max_new_tokens,
            beam_size=beam_size,
        )
        return [self.transcriber.decode(seq) for seq in ids]

    @property
    def text_tokenizer(self):
        """The export's tokenizer.json as a transformers tokenizer (what packing needs)."""
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast(tokenizer_file=str(self.folder / "tokenizer.json"))

    def timestamped(
        self, features: torch.Tensor, max_new_tokens: int, beam_size: int
    ) -> list[list[int]]:
        """CTranslate2 applies Whisper's timestamp rules when the prefix lacks
        <|notimestamps|>; ids after the prefix, without <|endoftext|>."""
        return self.transcriber.generate_tokens(
            features.float().cpu().numpy(),
            prefix_tokens=self.prefix[:PREFIX_WITH_TIMESTAMPS],
            max_length=max_new_tokens,
            beam_size=beam_size,
        )


# --- evaluation over a split ------------------------------------------------------------------


def batch_durations(batch: dict[str, Any]) -> list[float]:
    """Audio seconds per sample: the shard json's duration when the loader passes it on,
    else estimated from the stored frames (which overcount the audio by at most ~12 ms)."""
    if "durations" in batch:
        return [float(d) for d in batch["durations"]]
    hop = contract.HOP_LENGTH / contract.SAMPLING_RATE
    return [max(0.0, (int(n) - 1) * hop) for n in batch["num_frames"]]


def evaluate_split(
    decoder,
    split_dir: str | Path,
    data_config: DataConfig,
    info: Dist,
    batch_size: int,
    max_new_tokens: int,
    beam_size: int = 1,
    progress: bool = False,
) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """Decode every sample once across ranks; rank 0 gets (report, utterances), others None.

    Ranks may hold different batch counts (eval_batches): nothing collective happens until the
    single gather at the end, so no rank waits inside the loop.
    """
    config = replace(
        data_config,
        batch_size=batch_size,
        bucket_buffer=batch_size * max(1, data_config.bucket_buffer // batch_size),
        # Page-locked batches only help a copy to a GPU: key on the decoder's device, not on
        # whether some GPU exists (a CPU evaluation beside a training run would pin for nothing).
        pin_memory=data_config.pin_memory and torch.device(decoder.device).type == "cuda",
    )
    started = time.perf_counter()
    utterances: list[dict[str, Any]] = []
    loader = eval_batches(split_dir, config, info.rank, info.world_size)
    if progress and info.is_main:
        from tqdm import tqdm

        loader = tqdm(loader, desc="eval", unit="batch", leave=False)
    for batch in loader:
        features = pad_features_to_full(
            batch["features"].to(decoder.device),
            batch["pad_values"],
            decoder.window_frames,
            batch["num_frames"],
        )
        hypotheses = decoder(features, max_new_tokens, beam_size)
        for key, text, source, hyp, seconds in zip(
            batch["keys"],
            batch["texts"],
            batch["sources"],
            hypotheses,
            batch_durations(batch),
            strict=True,
        ):
            utterances.append(
                {
                    "key": key,
                    "source": source,
                    "reference": text,
                    "hypothesis": hyp.strip(),
                    "duration": seconds,
                }
            )
    gathered = distributed.gather_objects(info, utterances)
    wall = time.perf_counter() - started
    if not info.is_main:
        return None, []
    utterances = sorted((u for part in gathered for u in part), key=lambda u: u["key"])
    keys = [u["key"] for u in utterances]
    if len(set(keys)) != len(keys):
        raise AssertionError("an eval sample was decoded twice across ranks")
    report = wer_report(
        [u["reference"] for u in utterances],
        [u["hypothesis"] for u in utterances],
        [u["source"] for u in utterances],
    )
    audio = sum(u["duration"] for u in utterances)
    report.update(
        {
            "audio_seconds": audio,
            "wall_seconds": wall,
            "real_time_factor": wall / audio if audio else float("nan"),
            "world_size": info.world_size,
            "beam_size": beam_size,
        }
    )
    return report, utterances


# --- packed, timestamped evaluation -----------------------------------------------------------


def evaluate_packed(
    decoder,
    split_dir: str | Path,
    info: Dist,
    batch_size: int,
    max_new_tokens: int,
    beam_size: int = 1,
    *,
    limit: int | None = None,
    max_windows: int | None = None,
    gap_seconds: float = 0.5,
    language: str = "de",
    task: str = "transcribe",
    progress: bool = False,
) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """Decode the split packed into full windows with timestamps; rank 0 gets (report, windows).

    The windows are `plan_windows(..., epoch=None)` of the first `limit` samples in stored
    order, a fixed `gap_seconds` of silence before each utterance, then the first `max_windows`
    of them; rank r decodes windows r, r + R, ... and one gather ends it, as in
    `evaluate_split`. `max_new_tokens` is per utterance: a batch may generate that many, plus
    two timestamps, for each utterance of its fullest window (up to the decoder's positions).
    """
    started = time.perf_counter()
    split_dir = Path(split_dir)
    manifest = contract.load_manifest(split_dir)
    limits = PackingLimits(decoder.window_frames, gap_seconds=(gap_seconds, gap_seconds))
    windows = plan_windows(
        build_length_index(split_dir, manifest), limits, seed=0, epoch=None, limit=limit
    )[:max_windows]
    tokenizer = getattr(decoder, "text_tokenizer", decoder.tokenizer)
    targets = WindowTargets(tokenizer, language, task, limits.max_tokens)
    no_timestamps, eot = targets.no_timestamps, targets.end
    mine = list(range(info.rank, len(windows), info.world_size))
    batches = [mine[i : i + batch_size] for i in range(0, len(mine), batch_size)]
    if progress and info.is_main:
        from tqdm import tqdm

        batches = tqdm(batches, desc="packed eval", unit="batch", leave=False)
    reader = ShardReader(split_dir, [shard["name"] for shard in manifest["shards"]])
    results: list[dict[str, Any]] = []
    try:
        for numbers in batches:
            built = []
            for number in numbers:
                placed = windows[number]
                samples = [decode_sample(*reader.read(p.shard, p.index)) for p in placed]
                built.append(build_window(samples, placed, targets, WindowChoices(True, False)))
            batch = collate_windows(built)
            features = window_features_to_full(
                batch["features"].to(decoder.device), decoder.window_frames
            )
            fullest = max(len(w["keys"]) for w in built)
            sequences = decoder.timestamped(features, fullest * (max_new_tokens + 2), beam_size)
            for number, window, ids in zip(numbers, built, sequences, strict=True):
                segments = segments_from_ids(ids, no_timestamps, eot)
                true_starts = [start for start, _ in window["spans"]]
                predicted = [s.start for s in segments if s.start is not None]
                results.append(
                    {
                        "window": number,
                        "keys": window["keys"],
                        "spans": window["spans"],
                        "reference": " ".join(t.strip() for t in window["transcripts"]),
                        "hypothesis": " ".join(
                            tokenizer.decode(list(s.tokens), skip_special_tokens=True).strip()
                            for s in segments
                        ).strip(),
                        "segments": [
                            {
                                "start": s.start,
                                "end": s.end,
                                "text": tokenizer.decode(list(s.tokens), skip_special_tokens=True),
                            }
                            for s in segments
                        ],
                        "start_errors": match_starts(true_starts, predicted),
                    }
                )
    finally:
        reader.close()
    gathered = distributed.gather_objects(info, results)
    if not info.is_main:
        return None, []
    results = sorted((w for part in gathered for w in part), key=lambda w: w["window"])
    if [w["window"] for w in results] != list(range(len(windows))):
        raise AssertionError("a packed window was decoded twice, or not at all, across ranks")
    return packed_report(results, gap_seconds, time.perf_counter() - started), results


def packed_report(
    windows: list[dict[str, Any]], gap_seconds: float, wall_seconds: float
) -> dict[str, Any]:
    """Window WER (orthographic and normalised, references = the window's transcripts joined)
    and the segment-start figures of trainer.decoding.longform over every utterance of every
    window."""
    wer = wer_report(
        [w["reference"] for w in windows],
        [w["hypothesis"] for w in windows],
        ["packed"] * len(windows),
    )
    utterances = sum(len(w["keys"]) for w in windows)
    segments = sum(len(w["segments"]) for w in windows)
    return {
        "packed_windows": len(windows),
        "packed_utterances": utterances,
        "packed_gap_seconds": gap_seconds,
        "packed_wer_orthographic": wer["wer_orthographic"],
        "packed_wer_normalised": wer["wer_normalised"],
        "packed_segments_per_utterance": segments / utterances if utterances else float("nan"),
        **start_error_summary(e for w in windows for e in w["start_errors"]),
        "packed_wall_seconds": wall_seconds,
    }


# --- command line -----------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m trainer.evaluate",
        description="WER of a Whisper model (HF folder, hub id or CTranslate2 export) on a "
        "split of shards; orthographic and normalised, per source.",
    )
    parser.add_argument("--model", required=True, help="Whisper folder, hub id, or CT2 folder")
    parser.add_argument(
        "--shards",
        required=True,
        help="one split's folder, e.g. SHARDS/test, or its URL (s3://, gs://, hf://, https://)",
    )
    parser.add_argument(
        "--shard-cache",
        default=None,
        help="local folder for a split read from a URL (default: $SHARD_CACHE_DIR, else "
        "~/.cache/whisper-german-trainer/shards)",
    )
    parser.add_argument("--limit", type=int, default=None, help="only the first N samples")
    parser.add_argument("--batch-size", type=int, default=16, help="samples per decoding batch")
    parser.add_argument(
        "--beam-size",
        "--num-beams",
        dest="beam_size",
        type=int,
        default=1,
        help="per-utterance and packed decoding: 1 = greedy, 5 = the beam faster-whisper uses",
    )
    parser.add_argument("--max-new-tokens", type=int, default=225, help="longest transcript")
    parser.add_argument("--language", default="de")
    parser.add_argument("--task", default="transcribe")
    parser.add_argument("--device", default="auto", help="auto, cuda or cpu")
    parser.add_argument(
        "--precision",
        default="auto",
        help="auto (fp16 on CUDA, fp32 on CPU), fp16, bf16 or fp32 (HF models)",
    )
    parser.add_argument("--num-workers", type=int, default=2, help="loader workers per rank")
    parser.add_argument("--output", default=None, help="write the report (JSON) here")
    parser.add_argument(
        "--packed",
        action="store_true",
        help="also decode the split packed into full windows with timestamps (no prompt): "
        "window WER and segment-start error against the true utterance starts",
    )
    parser.add_argument(
        "--packed-windows", type=int, default=None, help="packed: only the first N windows"
    )
    parser.add_argument(
        "--packed-gap-seconds", type=float, default=0.5, help="packed: silence between utterances"
    )
    parser.add_argument(
        "--audio-source",
        default=None,
        metavar="DATASET",
        help="also decode a CTranslate2 export through faster-whisper as RealtimeSTT does "
        "(trainer.decoding.realtime_modes), reading each sample's audio from DATASET, the dataset "
        "the split was built from (e.g. demo/corpus)",
    )
    parser.add_argument(
        "--modes",
        default="all",
        help="with --audio-source: all, or some of batched (RealtimeSTT's default), "
        "batched-prompt, sequential (its batch_size=0), sequential-prompt",
    )
    parser.add_argument(
        "--long-form-seconds",
        type=float,
        default=45.0,
        help="with --audio-source: also join consecutive utterances into files of at least "
        "this many seconds and decode those (0 = single utterances only)",
    )
    parser.add_argument(
        "--long-form-gap-seconds",
        type=float,
        default=0.7,
        help="with --audio-source: silence between the utterances of a long file",
    )
    parser.add_argument(
        "--realtime-max-new-tokens",
        type=int,
        default=None,
        help="with --audio-source: faster-whisper's max_new_tokens (default: none, as "
        "RealtimeSTT calls it)",
    )
    parser.add_argument(
        "--worst",
        type=int,
        default=20,
        help="list the N utterances with the highest WER (0 = none)",
    )
    return parser.parse_args(argv)


def load_decoder(args: argparse.Namespace, info: Dist):
    """(decoder, n_mels, tokenizer fingerprint) for an HF model or a CTranslate2 export."""
    folder = Path(args.model)
    if (folder / "model.bin").is_file():
        decoder = CT2Decoder(args.model, info.device.type, args.language, args.task)
        extractor = json.loads((folder / "preprocessor_config.json").read_text())
        vocab = decoder.tokenizer.get_vocab(with_added_tokens=True)
        return decoder, int(extractor["feature_size"]), contract.tokenizer_fingerprint(vocab)
    from trainer.model import ModelConfig, load_model
    from trainer.runtime.optim import resolve_precision

    model, processor = load_model(
        ModelConfig(
            name_or_path=args.model,
            language=args.language,
            task=args.task,
            gradient_checkpointing=False,
        ),
        for_training=False,
    )
    model.to(info.device).eval()
    precision = resolve_precision(args.precision, info.device)
    decoder = HFDecoder(model, processor.tokenizer, args.language, args.task, precision)
    fingerprint = contract.tokenizer_fingerprint(processor.tokenizer.get_vocab())
    return decoder, model.config.num_mel_bins, fingerprint


def main(argv: list[str] | None = None) -> int:
    from shard_builder.config import load_dotenv_file

    load_dotenv_file()  # HF_HOME and the like, before anything imports huggingface_hub
    args = parse_args(argv)
    gpu.configure_allocator()  # before anything initialises CUDA, as the trainer does
    info = distributed.setup_distributed(args.device)
    try:
        decoder, n_mels, fingerprint = load_decoder(args, info)
        try:
            modes = check_realtime_request(args, decoder)
            split_dir = storage.local_split(args.shards, args.shard_cache, info.is_main)
            check_split(split_dir, n_mels, fingerprint, decoder.window_frames)
        except (ValueError, storage.ShardFetchError) as error:
            distributed.print0(info, f"error: {error}")
            return 2
        data_config = DataConfig(
            batch_size=args.batch_size,
            num_workers=args.num_workers,
            bucket_buffer=args.batch_size,
            eval_limit=args.limit,
        )
        report, utterances = evaluate_split(
            decoder,
            split_dir,
            data_config,
            info,
            args.batch_size,
            args.max_new_tokens,
            args.beam_size,
            progress=True,
        )
        windows = []
        if args.packed:
            packed, windows = evaluate_packed(
                decoder,
                split_dir,
                info,
                args.batch_size,
                args.max_new_tokens,
                args.beam_size,
                limit=args.limit,
                max_windows=args.packed_windows,
                gap_seconds=args.packed_gap_seconds,
                language=args.language,
                task=args.task,
                progress=True,
            )
            if report is not None:
                report.update(packed)
        realtime_details = {}
        if modes and info.is_main:
            try:
                report["realtime"], realtime_details = evaluate_realtime(
                    args, split_dir, modes, info.device.type
                )
            except ValueError as error:
                print(f"error: {error}")
                return 2
        if info.is_main:
            kind = "ctranslate2" if isinstance(decoder, CT2Decoder) else "transformers"
            report = {"model": args.model, "backend": kind, "shards": args.shards, **report}
            print(f"model: {args.model} ({kind})   shards: {args.shards}")
            print(format_report(report))
            if modes:
                from trainer.decoding.realtime_modes import format_modes

                print(format_modes(report["realtime"]))
            for u in utterances:
                u["wer_normalised"] = utterance_wer(u["reference"], u["hypothesis"])
            if args.worst:
                worst = sorted(utterances, key=lambda u: -_nan_low(u["wer_normalised"]))
                report["worst"] = worst[: args.worst]
                print(f"\nworst {len(report['worst'])} utterances (normalised WER):")
                for u in report["worst"]:
                    print(
                        f"  {100 * u['wer_normalised']:6.1f} %  {u['key']}\n"
                        f"     ref: {u['reference']}\n     hyp: {u['hypothesis']}"
                    )
            report["utterances"] = utterances
            if windows:
                report["packed"] = windows
            if realtime_details:
                report["realtime_decoded"] = realtime_details
            if args.output:
                Path(args.output).parent.mkdir(parents=True, exist_ok=True)
                Path(args.output).write_text(json.dumps(report, indent=2, ensure_ascii=False))
                print(f"report written to {args.output}")
        return 0
    finally:
        distributed.cleanup_distributed()


def check_realtime_request(args: argparse.Namespace, decoder) -> list:
    """The faster-whisper modes asked for (none without --audio-source), or ValueError when
    this model cannot run them."""
    if not args.audio_source:
        return []
    from trainer.decoding.realtime_modes import parse_modes

    modes = parse_modes(args.modes)
    if not isinstance(decoder, CT2Decoder):
        raise ValueError(
            "--audio-source decodes through faster-whisper, which runs a CTranslate2 export: "
            "export the model first (python -m trainer.export) and pass that folder as --model"
        )
    if decoder.window_frames != contract.MAX_FRAMES:
        raise ValueError(
            f"--audio-source: faster-whisper pads every window to {contract.MAX_FRAMES} frames, "
            f"and this export's window is {decoder.window_frames}"
        )
    return modes


def evaluate_realtime(args: argparse.Namespace, split_dir: Path, modes: list, device: str):
    """(report, details) of trainer.decoding.realtime_modes on the split's audio, on this rank (rank
    0: faster-whisper decodes one file at a time, so the modes are not split across ranks)."""
    from trainer.decoding.realtime_modes import RealtimeTranscriber, evaluate_modes, split_clips

    clips = split_clips(split_dir, args.audio_source, args.limit)
    transcriber = RealtimeTranscriber(
        args.model,
        device="cuda" if device == "cuda" else "cpu",
        language=args.language,
        task=args.task,
        max_new_tokens=args.realtime_max_new_tokens,
    )
    return evaluate_modes(
        transcriber, clips, modes, args.long_form_seconds, args.long_form_gap_seconds
    )


def _nan_low(value: float) -> float:
    return -1.0 if value != value else value


if __name__ == "__main__":
    sys.exit(main())
