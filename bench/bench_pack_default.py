"""Packed against unpacked fine-tuning on a corpus that does not repeat, in the product's modes.

The corpus is bench/make_bench_corpus.py's (sentences never repeated between train and test nor
within train; test voices and speeds never heard in train). Each run fine-tunes whisper-base in
full (encoder included) on 2 CPU ranks (torchrun, gloo, config/demo-whisper-base.toml), then:

1. `trainer.evaluate` on the HF checkpoint, per utterance, greedy and beam 5, and greedy with
   timestamps on (each utterance alone in its window, the mode packed windows mostly train),
   with a breakdown of the greedy errors (substitutions, deletions, insertions; insertions after
   the last reference word, errors on the first word) to see where a gap between modes comes
   from;
2. the int8 CTranslate2 export through `trainer.evaluate --audio-source`
   (trainer.decoding.realtime_modes): RealtimeSTT's default (`batched`) and its `batch_size=0` call
   (`sequential`, timestamps), each with and without a prompt, on single utterances and on
   45 s files joined from the test split.

    python bench/bench_pack_default.py --model PATH/whisper-base --corpus out/bench-corpus \
        --shards out/bench-shards --out out/pack-default \
        --run unpacked:false:8:4 --run packed-eq-utt:true:4:1 --seed 0

`--run NAME:PACK:STEPS:WINDOWS_PER_RANK[:LONE_PROBABILITY]` (repeatable). A run folder that
already finished is reused; figures are printed and written to OUT/results.json, then copied
into docs/benchmarks.md by hand. `--summary OUT/RUN ...` prints the table of finished runs, with
95 % paired bootstrap intervals (over the test utterances) of each WER minus the first run's;
`--pooled BASE,OTHER BASE,OTHER ...` (one pair of run folders per seed) the same over every
seed's utterance pairs together.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from trainer.watch.metrics import normalise  # noqa: E402


def run(command: list[str], log: Path) -> None:
    print("$", " ".join(command), flush=True)
    with open(log, "w") as handle:
        result = subprocess.run(command, cwd=REPO, stdout=handle, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        raise SystemExit(f"failed ({result.returncode}); see {log}")


def fine_tune(args, folder: Path, pack: bool, steps: int, windows: int, lone: float) -> Path:
    if (folder / "best" / "config.json").is_file():
        print(f"reusing {folder}", flush=True)
        return folder / "best"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    command += ["-m", "trainer", "--config", "config/demo-whisper-base.toml"]
    command += ["--model", args.model, "--shards", args.shards, "--output-dir", str(folder)]
    command += ["--freeze-encoder", "false", "--max-steps", str(steps), "--lr", str(args.lr)]
    command += ["--warmup-steps", "2", "--save-every", "0", "--eval-every", "0"]
    command += ["--batch-size", str(windows), "--seed", str(args.seed)]
    command += ["--data.seed", str(args.seed), "--progress", "false"]
    command += ["--pack", "true" if pack else "false", "--packed-eval", "false"]
    command += ["--lone-probability", str(lone), "--eval-limit", str(args.limit)]
    folder.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    run(command, folder.parent / f"{folder.name}.log")
    print(f"trained {folder.name} in {time.perf_counter() - started:.0f} s", flush=True)
    return folder / "best"


def evaluate(args, model: str, report: Path, *extra: str) -> dict:
    if not report.is_file():
        command = [sys.executable, "-m", "trainer.evaluate", "--model", model]
        command += ["--shards", f"{args.shards}/test", "--output", str(report), "--device", "cpu"]
        command += ["--batch-size", "8", "--num-workers", "1", "--worst", "0"]
        command += ["--limit", str(args.limit), *extra]
        run(command, report.with_suffix(".log"))
    return json.loads(report.read_text())


def export(model: str, out: Path) -> Path:
    if not (out / "model.bin").is_file():
        command = [sys.executable, "-m", "trainer.export", "--model", model, "--out", str(out)]
        command += ["--quantization", "int8", "--long-form-seconds", "0"]
        run(command, out.parent / f"{out.name}.log")
    return out


def error_breakdown(utterances: list[dict]) -> dict:
    """Where the greedy per-utterance errors lie (normalised words, jiwer's alignment)."""
    import jiwer

    totals = dict(words=0, substitutions=0, deletions=0, insertions=0)
    totals.update(trailing_insertions=0, first_word_errors=0, first_letter_lowered=0)
    for u in utterances:
        ref, hyp = normalise(u["reference"]), normalise(u["hypothesis"])
        if not ref:
            continue
        totals["words"] += len(ref.split())
        # orthographic only: a sentence-initial capital written lower case
        lowered = u["reference"][:1].isupper() and u["hypothesis"].strip()[:1].islower()
        totals["first_letter_lowered"] += lowered
        if not hyp:
            totals["deletions"] += len(ref.split())
            totals["first_word_errors"] += 1
            continue
        out = jiwer.process_words(ref, hyp)
        totals["substitutions"] += out.substitutions
        totals["deletions"] += out.deletions
        totals["insertions"] += out.insertions
        chunks = out.alignments[0]
        if chunks and chunks[-1].type == "insert":
            totals["trailing_insertions"] += chunks[-1].hyp_end_idx - chunks[-1].hyp_start_idx
        if chunks and chunks[0].type != "equal" and chunks[0].ref_start_idx == 0:
            totals["first_word_errors"] += 1
    return totals


def timestamped_per_utterance(args, model: str, report: Path) -> dict:
    """Each test utterance alone in its window, as `trainer.evaluate` decodes it, but greedy
    with timestamps on (no <|notimestamps|>): the mode packed windows mostly train."""
    if report.is_file():
        return json.loads(report.read_text())
    from trainer.data.loader import DataConfig, eval_batches, pad_features_to_full
    from trainer.decoding.longform import segments_from_ids
    from trainer.evaluate import HFDecoder
    from trainer.model import ModelConfig, load_model
    from trainer.watch.metrics import wer_report

    hf, processor = load_model(
        ModelConfig(name_or_path=model, gradient_checkpointing=False), for_training=False
    )
    decoder = HFDecoder(hf.eval(), processor.tokenizer, "de", "transcribe", "fp32")
    tokenizer = processor.tokenizer
    no_timestamps = tokenizer.convert_tokens_to_ids("<|notimestamps|>")
    eot = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    config = DataConfig(batch_size=8, num_workers=0, bucket_buffer=8, eval_limit=args.limit)
    refs, hyps = [], []
    for batch in eval_batches(f"{args.shards}/test", config, 0, 1):
        features = pad_features_to_full(
            batch["features"], batch["pad_values"], decoder.window_frames, batch["num_frames"]
        )
        for text, ids in zip(batch["texts"], decoder.timestamped(features, 225, 1), strict=True):
            segments = segments_from_ids(ids, no_timestamps, eot)
            words = [tokenizer.decode(list(s.tokens)).strip() for s in segments]
            refs.append(text)
            hyps.append(" ".join(words))
    result = wer_report(refs, hyps, ["x"] * len(refs))
    pairs = zip(refs, hyps, strict=True)
    result["utterances"] = [{"reference": r, "hypothesis": h} for r, h in pairs]
    report.write_text(json.dumps(result, indent=2, ensure_ascii=False))
    return result


def measure(args, name: str, pack: bool, steps: int, windows: int, lone: float) -> dict:
    folder = Path(args.out) / name
    best = fine_tune(args, folder, pack, steps, windows, lone)
    greedy = evaluate(args, str(best), folder / "greedy.json")
    beam = evaluate(args, str(best), folder / "beam5.json", "--num-beams", "5") if args.beam else {}
    stamped = (
        timestamped_per_utterance(args, str(best), folder / "greedy-timestamps.json")
        if args.diagnose
        else {"wer_normalised": None, "utterances": []}
    )
    ct2 = export(str(best), folder / "ct2")
    modes = evaluate(
        args,
        str(ct2),
        folder / "realtime.json",
        "--audio-source",
        args.corpus,
        "--modes",
        args.modes,
        "--long-form-seconds",
        "45",
    )
    train_log = folder.parent / f"{name}.log"
    log = train_log.read_text() if train_log.is_file() else ""
    seen = [line for line in log.splitlines() if "samples seen" in line]
    result = {
        "run": name,
        "pack": pack,
        "steps": steps,
        "windows_per_step": 2 * windows,
        "lone_probability": lone,
        "done_line": seen[-1] if seen else None,
        "greedy_wer": greedy["wer_normalised"],
        "beam5_wer": beam.get("wer_normalised"),
        "greedy_timestamps_wer": stamped["wer_normalised"],
        "greedy_timestamps_errors": error_breakdown(stamped["utterances"]),
        "greedy_errors": error_breakdown(greedy["utterances"]),
        "ct2_greedy_wer": modes["wer_normalised"],
        "realtime": modes["realtime"],
    }
    (folder / "result.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2), flush=True)
    return result


def paired_interval(base: list[dict], other: list[dict], rounds: int = 2000) -> tuple:
    """95 % bootstrap interval (utterances resampled, paired by key) of other's normalised
    WER minus base's, in points."""
    return pooled_interval([(base, other)], rounds)[1]


def pooled_interval(runs: list[tuple[list[dict], list[dict]]], rounds: int = 2000) -> tuple:
    """(difference, 95 % interval) of other's normalised WER minus base's, in points, over the
    utterance pairs of every (base, other) run pair together (seeds pooled: a pair is one test
    utterance decoded by both runs of one seed; all seeds' pairs are resampled together)."""
    import jiwer
    import numpy as np

    pairs = []
    for base, other in runs:
        mine = {u["reference"]: u for u in other}
        pairs += [(u, mine[u["reference"]]) for u in base if u["reference"] in mine]
    counts = []
    for a, b in pairs:
        ref = normalise(a["reference"])
        words = len(ref.split())
        errors = [
            jiwer.process_words(ref, normalise(h) or "<empty>")
            for h in (a["hypothesis"], b["hypothesis"])
        ]
        counts.append((words, *(e.substitutions + e.deletions + e.insertions for e in errors)))
    counts = np.asarray(counts, dtype=float)
    rng = np.random.default_rng(0)
    picks = rng.integers(0, len(counts), size=(rounds, len(counts)))
    sample = counts[picks].sum(axis=1)
    difference = 100 * (sample[:, 2] - sample[:, 1]) / sample[:, 0]
    whole = 100 * (counts[:, 2].sum() - counts[:, 1].sum()) / counts[:, 0].sum()
    interval = tuple(float(x) for x in np.percentile(difference, [2.5, 97.5]).round(1))
    return round(float(whole), 1), interval


def realtime_utterances(report: dict, mode: str) -> list[dict]:
    """(reference, hypothesis) per test utterance as a realtime mode of trainer.evaluate did."""
    refs = [u["reference"] for u in report["utterances"]]
    hyps = report["realtime_decoded"][mode]["utterances"]
    return [
        {"reference": r, "hypothesis": " ".join(s["text"] for s in h)}
        for r, h in zip(refs, hyps, strict=True)
    ]


def summary(folders: list[str]) -> None:
    """A markdown table of finished runs (OUT/NAME folders), intervals against the first."""
    rows = [json.loads((Path(f) / "result.json").read_text()) for f in folders]
    greedy = [json.loads((Path(f) / "greedy.json").read_text())["utterances"] for f in folders]
    decoded = [json.loads((Path(f) / "realtime.json").read_text()) for f in folders]

    def percent(value) -> str:
        return "not run" if value is None else f"{100 * value:.1f} %"

    def mode(rt, name, part, key="wer_normalised"):
        figures = rt.get(name, {}).get(part)
        return None if figures is None else figures.get(key)

    print("| run | greedy | greedy, interval vs first | greedy + timestamps | CT2 greedy |", end="")
    print(" batched (RealtimeSTT default) | interval vs first | batched long-form |", end="")
    print(" sequential | sequential long-form | long-form start error median |")
    first = realtime_utterances(decoded[0], "batched")
    for row, utts, report in zip(rows, greedy, decoded, strict=True):
        rt = row["realtime"]
        start = mode(rt, "sequential", "long_form", "segment_start_error_median_s")
        cells = [
            row["run"],
            percent(row["greedy_wer"]),
            str(paired_interval(greedy[0], utts)),
            percent(row.get("greedy_timestamps_wer")),
            percent(row["ct2_greedy_wer"]),
            percent(mode(rt, "batched", "utterances")),
            str(paired_interval(first, realtime_utterances(report, "batched"))),
            percent(mode(rt, "batched", "long_form")),
            percent(mode(rt, "sequential", "utterances")),
            percent(mode(rt, "sequential", "long_form")),
            "not run" if start is None else f"{start:.2f} s",
        ]
        print("| " + " | ".join(cells) + " |")


def pooled(pairs: list[str]) -> None:
    """Seeds pooled: each argument BASE_RUN,OTHER_RUN (two finished run folders of one seed);
    the difference over all their utterance pairs, greedy and RealtimeSTT's default."""
    folders = [tuple(Path(f) for f in pair.split(",")) for pair in pairs]

    def greedy(folder):
        return json.loads((folder / "greedy.json").read_text())["utterances"]

    def batched(folder):
        return realtime_utterances(json.loads((folder / "realtime.json").read_text()), "batched")

    for name, read in (("greedy per utterance", greedy), ("RealtimeSTT default", batched)):
        difference, interval = pooled_interval([(read(a), read(b)) for a, b in folders])
        print(f"{name}: {difference:+.1f} points, 95 % interval {interval} ({len(folders)} seeds)")


def main(argv: list[str] | None = None) -> int:
    if argv is None and sys.argv[1:2] == ["--summary"]:
        summary(sys.argv[2:])
        return 0
    if argv is None and sys.argv[1:2] == ["--pooled"]:
        pooled(sys.argv[2:])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="a pretrained Whisper folder")
    parser.add_argument("--corpus", default="out/bench-corpus")
    parser.add_argument("--shards", default="out/bench-shards")
    parser.add_argument("--out", default="out/pack-default")
    parser.add_argument(
        "--run", action="append", required=True, help="NAME:PACK:STEPS:WINDOWS[:LONE_PROBABILITY]"
    )
    parser.add_argument("--lr", type=float, default=3e-5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--limit", type=int, default=60, help="test utterances evaluated")
    parser.add_argument("--modes", default="all")
    parser.add_argument(
        "--beam", action=argparse.BooleanOptionalAction, default=True, help="also beam 5 (HF)"
    )
    parser.add_argument(
        "--diagnose",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also greedy per utterance with timestamps (HF)",
    )
    parser.add_argument("--untouched", action="store_true", help="also score the base model")
    args = parser.parse_args(argv)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    results = []
    if args.untouched:
        folder = Path(args.out) / "untouched"
        folder.mkdir(exist_ok=True)
        greedy = evaluate(args, args.model, folder / "greedy.json")
        stamped = timestamped_per_utterance(args, args.model, folder / "greedy-timestamps.json")
        results.append(
            {
                "run": "untouched",
                "greedy_wer": greedy["wer_normalised"],
                "greedy_errors": error_breakdown(greedy["utterances"]),
                "greedy_timestamps_wer": stamped["wer_normalised"],
            }
        )
    for spec in args.run:
        name, pack, steps, windows, *lone = spec.split(":")
        lone = float(lone[0]) if lone else 0.0
        results.append(measure(args, name, pack == "true", int(steps), int(windows), lone))
    (Path(args.out) / "results.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
