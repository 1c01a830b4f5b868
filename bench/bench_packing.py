"""Packed 30 s windows against one utterance per window: FLOPs and CPU time per utterance.

Utterance lengths are drawn from a log-normal fit of the real dataset's clip lengths (see
`draw_utterances`), packed by the trainer's own planner (`trainer.data.packing.plan_windows` with
`DataConfig()`'s gap range) and, in both modes, cut into batches the way the trainer does
(`sampling.bucket_batches`, buffer 64, batch 4: rows padded to the longest in their batch).

FLOPs: forward + loss backward of turbo's shape (a randomly initialised `WhisperConfig` of
openai/whisper-large-v3-turbo's dimensions) counted by `FlopCounterMode` under
`FakeTensorMode`, so nothing is computed (the `meta` device fails here: with `use_cache` off,
transformers' packed-sequence check calls `.item()`, which it skips for fake tensors).
`verify_counts` checks the fake count against a real CPU run at whisper-base's dimensions.
For a fixed 3000-frame encoder input the count is a quadratic in the decoder length L (linear
layers ~L, self-attention ~L^2), so it is counted at three lengths and checked exactly at a
fourth. Attention is eager: SDPA's CPU kernel has no FLOP formula and would go uncounted
(CUDA's flash and efficient kernels have one, counting the same matmuls as eager). Gradient
checkpointing is off for the count: it adds one forward recompute in both modes.

CPU wall-clock: whisper-base's dimensions (random init, SDPA, as `load_model` sets it up),
forward + backward of one packed window against one single-utterance window, alternated in one
run, median kept; per utterance = time per window / utterances per window.

    python bench/bench_packing.py [--utterances N] [--seed S] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from contextlib import nullcontext
from fractions import Fraction
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402
from transformers import WhisperConfig, WhisperForConditionalGeneration  # noqa: E402

from shard_builder.contract import (  # noqa: E402
    MAX_FRAMES,
    MAX_TARGET_POSITIONS,
    frames_touching_audio,
)
from trainer.data import packing, sampling  # noqa: E402
from trainer.data.loader import DataConfig  # noqa: E402
from trainer.loop import model_inputs  # noqa: E402
from trainer.model import decoder_inputs_and_labels, token_loss  # noqa: E402

# openai/whisper-large-v3-turbo's config.json
TURBO = dict(
    d_model=1280,
    encoder_layers=32,
    decoder_layers=4,
    encoder_attention_heads=20,
    decoder_attention_heads=20,
    encoder_ffn_dim=5120,
    decoder_ffn_dim=5120,
    num_mel_bins=128,
    vocab_size=51866,
)
# openai/whisper-base's config.json
BASE = dict(
    d_model=512,
    encoder_layers=6,
    decoder_layers=6,
    encoder_attention_heads=8,
    decoder_attention_heads=8,
    encoder_ffn_dim=2048,
    decoder_ffn_dim=2048,
    num_mel_bins=80,
    vocab_size=51865,
)
SAMPLING_RATE = 16000
# Clip lengths: flozi00/asr-german-mixed averages ~4 s per clip (issue #10: mean ~4-5 s, tail
# to 30 s). No per-clip distribution is recorded, so: log-normal, mean 4.5 s, shape 0.75
# (median 3.4 s, ~1 % over 20 s), redrawn outside [0.5 s, 30 s].
MEAN_SECONDS, LOG_SIGMA, MIN_SECONDS, MAX_SECONDS = 4.5, 0.75, 0.5, 30.0
# Text tokens per second of German speech: measured on the demo corpus's train split (267
# espeak-ng clips, 15.5 characters/s) with whisper-base's tokenizer (the multilingual BPE turbo
# shares): 4.25 tokens/s overall, 5-95 % of clips between 3.2 and 6.0 -> log-normal spread 0.19.
TOKENS_PER_SECOND, TOKENS_LOG_SIGMA = 4.25, 0.19
BATCH_SIZE, BUCKET_BUFFER = 4, 64  # DataConfig's defaults (config/turbo-2x16gb.toml)
PAD_ID = 50257  # <|endoftext|>, Whisper's pad id
STORED_EXTRA = packing.PREFIX_LENGTH + 1  # prefix + <|endoftext|> around the stored text


# --- lengths and plans -------------------------------------------------------------------------


def draw_utterances(count: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(seconds, stored frames, text tokens) of `count` utterances."""
    rng = np.random.default_rng(seed)
    mu = math.log(MEAN_SECONDS) - LOG_SIGMA**2 / 2
    seconds = rng.lognormal(mu, LOG_SIGMA, count)
    outside = (seconds < MIN_SECONDS) | (seconds > MAX_SECONDS)
    while outside.any():
        seconds[outside] = rng.lognormal(mu, LOG_SIGMA, int(outside.sum()))
        outside = (seconds < MIN_SECONDS) | (seconds > MAX_SECONDS)
    frames = np.array([frames_touching_audio(round(s * SAMPLING_RATE)) for s in seconds])
    rates = TOKENS_PER_SECOND * rng.lognormal(0.0, TOKENS_LOG_SIGMA, count)
    texts = np.maximum(1, np.rint(seconds * rates)).astype(np.int64)
    return seconds, frames.astype(np.int32), texts.astype(np.int32)


def window_lengths(
    windows, texts: list[np.ndarray], seed: int, timestamp_p: float, prompt_p: float
) -> list[int]:
    """Full target length of each window as `packing.build_window` makes it: timestamped (two
    timestamps and a space token per utterance, the planner's budget) or not, with a prompt of
    the previous window's text where `window_choices` draws one."""
    lengths, previous = [], 0
    for number, placed in enumerate(windows):
        text = [int(texts[p.shard][p.index]) + 1 for p in placed]  # + the space token
        choices = packing.window_choices(seed, 0, number, timestamp_p, prompt_p)
        length = 4 + sum(t + 2 for t in text)  # sot lang task (ts text ts)... eot
        if not choices.timestamps or length > MAX_TARGET_POSITIONS:
            length = 5 + sum(text)  # sot lang task notimestamps text... eot
        room = min(packing.MAX_PROMPT_TOKENS, MAX_TARGET_POSITIONS - length - 1)
        if choices.prompt and room > 0 and previous:
            length += 1 + min(room, previous)
        lengths.append(length)
        previous = sum(text)
    return lengths


def padded_rows(sequence_lengths: list[int]) -> list[int]:
    """Decoder input length of every row once batched as the trainer batches (bucketed buffers,
    padded to the batch's longest); the input is the sequence without its last token."""
    rows = []
    for low in range(0, len(sequence_lengths), BUCKET_BUFFER):
        buffer = sequence_lengths[low : low + BUCKET_BUFFER]
        for batch in sampling.bucket_batches(buffer, BATCH_SIZE, None):
            rows += [max(buffer[i] for i in batch) - 1] * len(batch)
    return rows


# --- FLOPs -------------------------------------------------------------------------------------


def build_model(dims: dict, attention: str) -> WhisperForConditionalGeneration:
    config = WhisperConfig(**dims, max_source_positions=MAX_FRAMES // 2, max_target_positions=448)
    config._attn_implementation = attention
    config.use_cache = False  # as load_model sets it for training
    model = WhisperForConditionalGeneration(config)
    return model.train()


def train_step_flops(dims: dict, length: int, fake: bool = True, batch: int = 1) -> int:
    """FLOPs of forward + loss backward for `batch` windows of `length` decoder inputs; with
    `fake`, under FakeTensorMode (shapes only, nothing computed), else a real CPU run."""
    with FakeTensorMode() if fake else nullcontext():
        torch.manual_seed(0)
        model = build_model(dims, "eager")
        features = torch.randn(batch, dims["num_mel_bins"], MAX_FRAMES)
        tokens = torch.randint(0, PAD_ID, (batch, length + 1))
        inputs, labels = decoder_inputs_and_labels(tokens, PAD_ID)
        with FlopCounterMode(display=False) as counter:
            logits = model(input_features=features, decoder_input_ids=inputs).logits
            summed, count = token_loss(logits, labels)
            (summed / count.clamp(min=1)).backward()
    return counter.get_total_flops()


class QuadraticFlops:
    """FLOPs(L) = a + b L + c L^2 for one window, from exact counts at three decoder lengths."""

    def __init__(self, dims: dict, points=(8, 200, 447), check=64) -> None:
        counts = {n: train_step_flops(dims, n) for n in (*points, check)}
        (x0, x1, x2), (y0, y1, y2) = points, [Fraction(counts[n]) for n in points]
        d01, d12 = (y1 - y0) / (x1 - x0), (y2 - y1) / (x2 - x1)
        self.c = (d12 - d01) / (x2 - x0)
        self.b = d01 - self.c * (x0 + x1)
        self.a = y0 - self.b * x0 - self.c * x0 * x0
        self.checked = (check, counts[check], self(check))
        if self(check) != counts[check]:
            raise AssertionError(f"FLOPs not quadratic in L: {self.checked}")

    def __call__(self, length: int) -> Fraction:
        return self.a + self.b * length + self.c * length * length


def verify_counts(length: int = 24) -> dict:
    """The fake-tensor count against a real CPU run (whisper-base dims), and batch linearity."""
    fake, real = train_step_flops(BASE, length), train_step_flops(BASE, length, fake=False)
    batch2 = train_step_flops(BASE, length, batch=2)
    if fake != real or batch2 != 2 * fake:
        raise AssertionError(f"fake {fake}, real CPU {real}, batch of 2 {batch2}")
    return {"decoder_length": length, "fake": fake, "cpu": real, "batch_2": batch2}


# --- CPU wall-clock ----------------------------------------------------------------------------


def synthetic_batch(dims: dict, batch: int, length: int, packed: bool, frames: int) -> dict:
    """A collated batch as the loaders hand it over: `length`-token sequences, `frames` stored
    frames per row (packed: gaps at -inf, floor applied on the device; else pad values)."""
    features = torch.randn(batch, dims["num_mel_bins"], frames).half()
    tokens = torch.randint(0, PAD_ID, (batch, length + 1))
    if packed:
        features[:, :, ::7] = packing.GAP_FILL
        return {"features": features, "tokens": tokens, "unlabelled": torch.zeros(batch).long()}
    return {
        "features": features,
        "tokens": tokens,
        "pad_values": torch.full((batch,), -0.5),
        "num_frames": torch.full((batch,), frames),
    }


def time_step(model, batch: dict) -> float:
    start = time.perf_counter()
    model.zero_grad(set_to_none=True)
    features, inputs, labels = model_inputs(batch, torch.device("cpu"), MAX_FRAMES, PAD_ID)
    logits = model(input_features=features, decoder_input_ids=inputs).logits
    summed, count = token_loss(logits, labels)
    (summed / count.clamp(min=1)).backward()
    return time.perf_counter() - start


def cpu_wall_clock(shape: dict, repeats: int, batch: int) -> dict:
    """Median seconds per utterance, packed vs one utterance per window, alternated."""
    torch.manual_seed(0)
    model = build_model(BASE, "sdpa")
    batches = {
        "packed": synthetic_batch(BASE, batch, shape["packed_length"], True, MAX_FRAMES),
        "unpacked": synthetic_batch(BASE, batch, shape["unpacked_length"], False, 500),
    }
    times = {name: [] for name in batches}
    for repeat in range(repeats + 1):  # the first round warms up and is not kept
        for name, inputs in batches.items():
            seconds = time_step(model, inputs)
            if repeat:
                times[name].append(seconds)
    per_window = {name: statistics.median(t) for name, t in times.items()}
    packed = per_window["packed"] / (batch * shape["utterances_per_window"])
    unpacked = per_window["unpacked"] / batch
    return {
        "seconds_per_window": per_window,
        "all_seconds": times,
        "seconds_per_utterance": {"packed": packed, "unpacked": unpacked},
        "ratio": unpacked / packed,
        **shape,
        "batch": batch,
        "repeats": repeats,
        "threads": torch.get_num_threads(),
    }


# --- main --------------------------------------------------------------------------------------


def summarise(values) -> dict:
    values = np.asarray(values)
    return {
        "mean": float(values.mean()),
        "p50": float(np.percentile(values, 50)),
        "p95": float(np.percentile(values, 95)),
        "max": float(values.max()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--utterances", type=int, default=20000, help="utterances drawn")
    parser.add_argument("--seed", type=int, default=0, help="seed of lengths, plan and choices")
    parser.add_argument("--json", type=Path, default=None, help="write every figure here")
    parser.add_argument("--repeats", type=int, default=3, help="timed CPU steps per mode")
    parser.add_argument("--cpu-batch", type=int, default=1, help="windows per timed CPU step")
    parser.add_argument("--skip-cpu", action="store_true", help="FLOPs only (no real compute)")
    args = parser.parse_args()
    data = DataConfig()
    started = time.perf_counter()

    seconds, frames, texts = draw_utterances(args.utterances, args.seed)
    index = packing.LengthIndex((frames,), (texts,))
    limits = packing.PackingLimits(MAX_FRAMES, MAX_TARGET_POSITIONS, data.gap_range())
    windows = packing.plan_windows(index, limits, seed=args.seed, epoch=0)
    per_window = [len(w) for w in windows]
    speech = int(frames.sum())
    planned = [5 + sum(int(texts[p.index]) + 3 for p in w) for w in windows]
    modes = {
        "unpacked": [int(t) + STORED_EXTRA for t in texts],
        "packed": window_lengths(
            windows, [texts], args.seed, data.timestamp_probability, data.prompt_probability
        ),
        "packed_worst": window_lengths(windows, [texts], args.seed, 1.0, 1.0),
    }

    verified = verify_counts()
    flops = QuadraticFlops(TURBO)
    results = {}
    for mode, lengths in modes.items():
        rows = padded_rows(lengths)
        total = sum(flops(n) for n in rows)
        results[mode] = {
            "windows": len(lengths),
            "sequence_length": summarise(lengths),
            "padded_decoder_length": summarise(rows),
            "flops_per_window": float(total / len(rows)),
            "flops_per_utterance": float(total / args.utterances),
        }
    unpacked_flops = results["unpacked"]["flops_per_utterance"]
    for mode in ("packed", "packed_worst"):
        results[mode]["ratio"] = unpacked_flops / results[mode]["flops_per_utterance"]
    figures = {
        "utterances": args.utterances,
        "seed": args.seed,
        "gap_seconds": list(data.gap_range()),
        "seconds": summarise(seconds),
        "text_tokens": summarise(texts),
        "windows": len(windows),
        "utterances_per_window": summarise(per_window),
        "speech_share_packed": speech / (len(windows) * MAX_FRAMES),
        "speech_share_unpacked": speech / (args.utterances * MAX_FRAMES),
        "planned_tokens_per_window": summarise(planned),
        "flops": results,
        "turbo_encoder_flops": float(flops.a),
        "flop_checks": {"fake_vs_cpu": verified, "quadratic_check": [*map(float, flops.checked)]},
    }
    if not args.skip_cpu:
        shape = {
            "packed_length": round(results["packed"]["padded_decoder_length"]["mean"]),
            "unpacked_length": round(results["unpacked"]["padded_decoder_length"]["mean"]),
            "utterances_per_window": args.utterances / len(windows),
        }
        load_before = os.getloadavg()[0]
        figures["cpu"] = cpu_wall_clock(shape, args.repeats, args.cpu_batch)
        figures["cpu"]["load_average_1min"] = [load_before, os.getloadavg()[0]]
    figures["machine"] = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    figures["bench_seconds"] = time.perf_counter() - started
    report(figures)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1))


def report(f: dict) -> None:
    s, u, planned = f["seconds"], f["utterances_per_window"], f["planned_tokens_per_window"]
    print(
        f"\n{f['utterances']} utterances (seed {f['seed']}): mean {s['mean']:.2f} s, median "
        f"{s['p50']:.2f} s, p95 {s['p95']:.2f} s, max {s['max']:.1f} s; text tokens mean "
        f"{f['text_tokens']['mean']:.1f}; gaps {f['gap_seconds']} s"
    )
    print(
        f"packed into {f['windows']} windows: {u['mean']:.2f} utterances per window "
        f"(median {u['p50']:.0f}, max {u['max']:.0f}); planned tokens per window mean "
        f"{planned['mean']:.0f}, p95 {planned['p95']:.0f}, max {planned['max']:.0f}"
    )
    print(
        f"speech share of the windows: packed {100 * f['speech_share_packed']:.1f} %, one "
        f"utterance per window {100 * f['speech_share_unpacked']:.1f} %"
    )
    check = f["flop_checks"]["fake_vs_cpu"]
    print(
        f"FLOP counter: fake tensors = real CPU run at whisper-base dims ({check['fake']:.6e}, "
        f"L={check['decoder_length']}); "
        f"turbo encoder fwd+bwd {f['turbo_encoder_flops'] / 1e12:.2f} TFLOP per window"
    )
    print(
        "\n| turbo, fwd+bwd | windows | target tokens per window (mean / p95) | padded decoder "
        "input (mean) | TFLOP per window | TFLOP per utterance | fewer FLOPs per utterance |"
    )
    print("|---|---|---|---|---|---|---|")
    names = {
        "unpacked": "one utterance per window",
        "packed": "packed, defaults (50 % timestamps, 30 % prompts)",
        "packed_worst": "packed, every window timestamped + prompted",
    }
    for mode, name in names.items():
        r = f["flops"][mode]
        ratio = f"{r['ratio']:.2f}x" if "ratio" in r else "1x (baseline)"
        window, utterance = r["flops_per_window"] / 1e12, r["flops_per_utterance"] / 1e12
        print(
            f"| {name} | {r['windows']} | {r['sequence_length']['mean']:.0f} / "
            f"{r['sequence_length']['p95']:.0f} | {r['padded_decoder_length']['mean']:.0f} | "
            f"{window:.3f} | {utterance:.3f} | {ratio} |"
        )
    if "cpu" in f:
        c = f["cpu"]
        per_u, per_w = c["seconds_per_utterance"], c["seconds_per_window"]
        print(
            f"\nCPU, whisper-base dims, fwd+bwd, batch {c['batch']}, median of {c['repeats']} "
            f"alternated, {c['threads']} threads, load average {c['load_average_1min'][0]:.1f} "
            f"before, {c['load_average_1min'][1]:.1f} after:"
        )
        print("| mode | decoder input | s per window | utterances per window | s per utterance |")
        print("|---|---|---|---|---|")
        print(
            f"| one utterance per window | {c['unpacked_length']} | {per_w['unpacked']:.2f} | 1 "
            f"| {per_u['unpacked']:.2f} |"
        )
        print(
            f"| packed | {c['packed_length']} | {per_w['packed']:.2f} | "
            f"{c['utterances_per_window']:.2f} | {per_u['packed']:.2f} |"
        )
        print(f"wall-clock ratio per utterance: {c['ratio']:.2f}x")
    print(f"\n{f['machine']}; bench took {f['bench_seconds']:.0f} s")


if __name__ == "__main__":
    main()
