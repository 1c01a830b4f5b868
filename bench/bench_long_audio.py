"""Long clips split at pauses (shard_builder/align.py): how often, how exactly, how fast.

Fresh long rows, drawn with their own seed (not the corpus's), are made the way
scripts/make_demo_corpus.py makes the demo's: demo sentences spoken by one espeak-ng voice,
joined by 0.4-1.0 s of silence, 31-55 s, Ogg Vorbis at 16 kHz, so every joint and the text on
each side of it is known. Each row is split by `split_clip` with the builder's default settings
and the aligner named by --align-model (whisper-base has never been trained on these sentences),
for pieces that fit --window seconds. For each row:

- split or rejected (`too_long_unaligned`, and why);
- each cut inside a true pause: the piece before ends, and the piece after starts, between the
  last sound of one utterance and the first of the next;
- text exact: every piece's text is exactly the utterances whose speech lies in it, word for
  word; a split row whose text is not exact is "wrong" (the target is none);
- seconds per clip for the split on one CPU thread (torch.set_num_threads(1)), model load
  excluded.

A control splits every row once more with the transcript of another row: each must be rejected.

    python bench/bench_long_audio.py --align-model PATH/whisper-base [--rows 24] [--seed 2026]
        [--window 30] [--json out.json]
    python bench/bench_long_audio.py --align-method sentences [--window 5] ...  (no model)
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from shard_builder.align import Aligner, Unaligned, sentence_split, split_clip  # noqa: E402
from shard_builder.audio import decode_audio  # noqa: E402
from shard_builder.config import BuilderConfig  # noqa: E402

RATE = 16000


def corpus_maker():
    spec = importlib.util.spec_from_file_location(
        "make_demo_corpus", REPO / "scripts" / "make_demo_corpus.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["make_demo_corpus"] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def make_rows(count: int, seed: int) -> list:
    maker = corpus_maker()
    sentences = maker.read_sentences(REPO / "demo" / "sentences_de.txt")
    return maker.long_rows(0, sentences, seed, count)


def judge(pieces, texts: list[str], pauses: list[tuple[float, float]]) -> tuple[int, int, bool]:
    """(cuts inside a true pause, cuts, text exact) for one split row."""
    joints = [len(" ".join(texts[: i + 1]).split()) for i in range(len(texts) - 1)]
    ends = np.cumsum([len(p.text.split()) for p in pieces])[:-1].tolist()
    inside, exact = 0, True
    for end, piece, following in zip(ends, pieces[:-1], pieces[1:], strict=True):
        in_pause = [
            j
            for j, (a, b) in enumerate(pauses)
            if a <= piece.stop / RATE <= following.start / RATE <= b
        ]
        inside += bool(in_pause)
        exact &= bool(in_pause) and joints[in_pause[0]] == end
    return inside, len(pieces) - 1, exact


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--align-model", help="Whisper folder or hub id (likelihood method)")
    parser.add_argument("--align-method", choices=["likelihood", "sentences"], default="likelihood")
    parser.add_argument("--rows", type=int, default=24)
    parser.add_argument("--seed", type=int, default=2026, help="the corpus's long rows use 1235")
    parser.add_argument("--window", type=float, default=30.0, help="the shard model's window, s")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    defaults = BuilderConfig()
    if args.align_method == "sentences":
        names = ("min_pause", "align_max_error")

        def split(waveform, text):
            return sentence_split(waveform, text, max_samples, *settings)
    else:
        if not args.align_model:
            parser.error("--align-model is needed by the likelihood method")
        names = ("min_pause", "align_min_margin", "align_min_logprob")
        aligner = Aligner(args.align_model, "de", "transcribe")

        def split(waveform, text):
            return split_clip(waveform, text, aligner, max_samples, *settings)

    settings = tuple(getattr(defaults, name) for name in names)
    rows = make_rows(args.rows, args.seed)
    max_samples = int(args.window * RATE)
    results = []
    for index, long_row in enumerate(rows):
        waveform = decode_audio(long_row.row.audio)
        started = time.perf_counter()
        try:
            pieces = split(waveform, long_row.row.text)
            outcome = {"split": True, "pieces": len(pieces)}
            inside, cuts, exact = judge(pieces, long_row.texts, long_row.pauses)
            outcome.update(cuts=cuts, cuts_in_pause=inside, exact=exact)
            outcome["margins"] = [p.margin for p in pieces[:-1]]
            outcome["logprobs"] = [p.logprob for p in pieces]
        except Unaligned as unaligned:
            outcome = {"split": False, "why": str(unaligned)}
        outcome["seconds"] = time.perf_counter() - started
        outcome["clip_seconds"] = waveform.size / RATE
        other = rows[(index + 1) % len(rows)].row.text
        try:
            split(waveform, other)
            outcome["mismatch_rejected"] = False
        except Unaligned:
            outcome["mismatch_rejected"] = True
        results.append(outcome)
        print(json.dumps(outcome, ensure_ascii=False), flush=True)

    split_rows = [r for r in results if r["split"]]
    cuts = sum(r["cuts"] for r in split_rows)
    summary = {
        "rows": len(results),
        "clip_seconds": [
            min(r["clip_seconds"] for r in results),
            max(r["clip_seconds"] for r in results),
        ],
        "window": args.window,
        "align_method": args.align_method,
        "settings": dict(zip(names, settings, strict=True)),
        "split_share": len(split_rows) / len(results),
        "cuts": cuts,
        "cuts_in_pause_share": sum(r["cuts_in_pause"] for r in split_rows) / max(cuts, 1),
        "text_exact_share": sum(r["exact"] for r in split_rows) / len(results),
        "wrong": sum(not r["exact"] for r in split_rows),
        "rejected": [r["why"] for r in results if not r["split"]],
        "mismatch_rejected_share": sum(r["mismatch_rejected"] for r in results) / len(results),
        "seconds_per_clip_median": statistics.median(r["seconds"] for r in results),
        "seconds_per_clip_max": max(r["seconds"] for r in results),
        "smallest_margin": min((m for r in split_rows for m in r["margins"]), default=None),
        "lowest_logprob": min((lp for r in split_rows for lp in r["logprobs"]), default=None),
        "machine": platform.processor() or platform.machine(),
    }
    print(json.dumps(summary, indent=1, ensure_ascii=False))
    if args.json:
        args.json.write_text(json.dumps({"summary": summary, "rows": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
