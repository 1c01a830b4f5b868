"""Quality at equal compute: packed vs. unpacked fine-tuning of a real Whisper on the demo corpus.

Three models are compared: the untouched checkpoint, a full fine-tune (encoder included) on one
utterance per window, and a full fine-tune on packed windows with the same optimiser steps and
windows per step. Each is measured three ways, on the demo test sentences that never occur in
train (the others repeat train sentences and mostly measure memory) and on all of them:

1. per-utterance normalised WER from `trainer.evaluate` (greedy, `<|notimestamps|>`);
2. long-form, RealtimeSTT's call pattern: test utterances joined into 30-60 s files with short
   silences, the CTranslate2 export run through faster-whisper
   `transcribe(audio, language="de", beam_size=5)` (timestamps on): normalised WER, and the
   error of predicted segment starts against the true offsets;
3. per utterance through faster-whisper with `initial_prompt` (the previous test sentence).

    python bench/bench_quality.py --model PATH/whisper-base --out out/quality [--steps 30]

Training runs on 2 CPU ranks (torchrun, gloo) with `config/demo-whisper-base.toml` and
`--freeze-encoder false`; a run folder that already finished is reused. Figures go to
docs/benchmarks.md by hand.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from shard_builder import contract  # noqa: E402
from trainer.decoding.longform import match_starts, start_error_summary  # noqa: E402
from trainer.watch.metrics import normalise, wer_report  # noqa: E402

SAMPLING_RATE = contract.SAMPLING_RATE
LONG_FILE_SECONDS = (30.0, 60.0)
SILENCE_SECONDS = (0.3, 0.8)


def run(command: list[str], log: Path) -> None:
    print("$", " ".join(command), flush=True)
    with open(log, "w") as handle:
        result = subprocess.run(command, cwd=REPO, stdout=handle, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        raise SystemExit(f"failed ({result.returncode}); see {log}")


def build_shards(model: str, out: Path) -> Path:
    if not (out / "test" / contract.MANIFEST_NAME).is_file():
        command = [sys.executable, "-m", "shard_builder", "--dataset", "demo/corpus"]
        command += ["--model", model, "--out", str(out), "--shard-size", "64"]
        run(command, out.parent / "build.log")
    return out


def fine_tune(model: str, shards: Path, folder: Path, steps: int, lr: float, pack: bool) -> Path:
    if (folder / "best" / "config.json").is_file():
        print(f"reusing {folder}", flush=True)
        return folder / "best"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    command += ["-m", "trainer", "--config", "config/demo-whisper-base.toml"]
    command += ["--model", model, "--shards", str(shards), "--output-dir", str(folder)]
    command += ["--freeze-encoder", "false", "--max-steps", str(steps), "--lr", str(lr)]
    command += ["--warmup-steps", "3", "--save-every", "0", "--eval-every", "0"]
    command += ["--progress", "false", "--pack", "true" if pack else "false"]
    folder.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    run(command, folder.parent / f"{folder.name}.log")
    print(f"trained {folder.name} in {time.perf_counter() - started:.0f} s", flush=True)
    return folder / "best"


def export(model: str, out: Path) -> Path:
    if not (out / "model.bin").is_file():
        command = [sys.executable, "-m", "trainer.export", "--model", model, "--out", str(out)]
        command += ["--quantization", "float32"]
        run(command, out.parent / f"{out.name}.log")
    return out


def per_utterance_wer(model: str, shards: Path, out: Path) -> list[dict]:
    report = out / "per-utterance.json"
    if not report.is_file():
        command = [sys.executable, "-m", "trainer.evaluate", "--model", model]
        command += ["--shards", str(shards / "test"), "--output", str(report), "--device", "cpu"]
        command += ["--batch-size", "8", "--num-workers", "1", "--worst", "0"]
        run(command, out / "evaluate.log")
    return json.loads(report.read_text())["utterances"]


# --- the test audio, and which sentences train holds ------------------------------------------


def train_texts(shards: Path) -> set[str]:
    from trainer.data.loader import iter_split_samples

    return {normalise(sample["text"]) for sample in iter_split_samples(shards / "train")}


def test_clips(shards: Path) -> list[dict]:
    """The built test samples with their audio, decoded from the demo corpus by row id."""
    import pyarrow.parquet as pq

    from shard_builder.audio import decode_audio
    from trainer.data.loader import iter_split_samples

    table = pq.read_table(next((REPO / "demo/corpus/data").glob("test-*.parquet")))
    audio = table.column("audio").to_pylist()
    clips = []
    for sample in iter_split_samples(shards / "test"):
        row = int(sample["key"].rsplit("-", 1)[1])
        waveform = decode_audio(audio[row]["bytes"])
        clips.append({"key": sample["key"], "text": sample["text"], "audio": waveform})
    return clips


def long_files(clips: list[dict], seed: int = 0) -> list[dict]:
    """Consecutive clips joined into 30-60 s files with short silences; true start offsets."""
    rng = np.random.default_rng(seed)
    files, current = [], None
    for clip in clips:
        if current is None:
            target = rng.uniform(*LONG_FILE_SECONDS)
            current = {"pieces": [], "starts": [], "texts": [], "length": 0, "target": target}
        silence = int(rng.uniform(*SILENCE_SECONDS) * SAMPLING_RATE)
        current["pieces"] += [np.zeros(silence, np.float32), clip["audio"]]
        current["starts"].append((current["length"] + silence) / SAMPLING_RATE)
        current["texts"].append(clip["text"])
        current["length"] += silence + clip["audio"].size
        if current["length"] / SAMPLING_RATE >= current["target"]:
            files.append(current)
            current = None
    if current is not None:
        files.append(current)
    for item in files:
        item["audio"] = np.concatenate(item.pop("pieces"))
    return files


def long_form(folder: Path, files: list[dict]) -> dict:
    from faster_whisper import WhisperModel

    model = WhisperModel(str(folder), device="cpu", compute_type="float32")
    references, hypotheses, errors, segments_total = [], [], [], 0
    for item in files:
        segments, _ = model.transcribe(item["audio"], language="de", beam_size=5)
        segments = list(segments)
        segments_total += len(segments)
        references.append(" ".join(item["texts"]))
        hypotheses.append(" ".join(s.text.strip() for s in segments))
        errors += match_starts(item["starts"], [s.start for s in segments])
    report = wer_report(references, hypotheses, ["long"] * len(files))
    return {
        "files": len(files),
        "audio_seconds": sum(f["audio"].size for f in files) / SAMPLING_RATE,
        "wer_normalised": report["wer_normalised"],
        "segments": segments_total,
        **start_error_summary(errors),
    }


def prompted(folder: Path, clips: list[dict]) -> dict:
    from faster_whisper import WhisperModel

    model = WhisperModel(str(folder), device="cpu", compute_type="float32")
    references, hypotheses = [], []
    previous = "Guten Tag."
    for clip in clips:
        segments, _ = model.transcribe(
            clip["audio"], language="de", beam_size=5, initial_prompt=previous
        )
        hypotheses.append(" ".join(s.text.strip() for s in segments))
        references.append(clip["text"])
        previous = clip["text"]
    return {
        "wer_normalised": wer_report(references, hypotheses, ["u"] * len(clips))["wer_normalised"]
    }


def subset_wer(utterances: list[dict], keys: set[str]) -> float:
    chosen = [u for u in utterances if u["key"] in keys]
    report = wer_report(
        [u["reference"] for u in chosen], [u["hypothesis"] for u in chosen], ["x"] * len(chosen)
    )
    return report["wer_normalised"]


def measure(name: str, model: str, shards: Path, out: Path, clips: list[dict], seen: set) -> dict:
    folder = out / name
    folder.mkdir(parents=True, exist_ok=True)
    unseen_clips = [c for c in clips if normalise(c["text"]) not in seen]
    unseen_keys = {c["key"] for c in unseen_clips}
    utterances = per_utterance_wer(model, shards, folder)
    ct2 = export(model, folder / "ct2")
    result = {
        "model": name,
        "per_utterance_unseen": subset_wer(utterances, unseen_keys),
        "per_utterance_all": subset_wer(utterances, {u["key"] for u in utterances}),
        "long_form_unseen": long_form(ct2, long_files(unseen_clips)),
        "long_form_all": long_form(ct2, long_files(clips)),
        "prompted_unseen": prompted(ct2, unseen_clips)["wer_normalised"],
    }
    (folder / "result.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2), flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="a pretrained Whisper folder")
    parser.add_argument("--out", default="out/quality")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--lr", type=float, default=5e-5)
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    shards = build_shards(args.model, out / "shards")
    unpacked = fine_tune(args.model, shards, out / "unpacked", args.steps, args.lr, pack=False)
    packed = fine_tune(args.model, shards, out / "packed", args.steps, args.lr, pack=True)
    clips, seen = test_clips(shards), train_texts(shards)
    unseen = sum(normalise(c["text"]) not in seen for c in clips)
    print(f"test utterances: {len(clips)}, of which {unseen} never occur in train", flush=True)
    results = [
        measure(name, model, shards, out, clips, seen)
        for name, model in (
            ("untouched", args.model),
            ("unpacked", str(unpacked)),
            ("packed", str(packed)),
        )
    ]
    print_table(results, args.steps)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    return 0


def print_table(results: list[dict], steps: int) -> None:
    print(f"\nwhisper-base, full fine-tune, {steps} steps x 2 ranks x 4 windows, demo corpus")
    header = (
        "model       per-utt WER unseen / all   long-form WER unseen / all   "
        "start err median (unseen)  within 0.5 s   prompted WER unseen"
    )
    print(header)
    for r in results:
        lu, la = r["long_form_unseen"], r["long_form_all"]
        print(
            f"{r['model']:<11} {100 * r['per_utterance_unseen']:8.1f} % / "
            f"{100 * r['per_utterance_all']:5.1f} %      "
            f"{100 * lu['wer_normalised']:8.1f} % / {100 * la['wer_normalised']:5.1f} %      "
            f"{lu['segment_start_error_median_s']:8.2f} s              "
            f"{100 * lu['segment_start_within_0_5s']:5.1f} %        "
            f"{100 * r['prompted_unseen']:6.1f} %"
        )


if __name__ == "__main__":
    sys.exit(main())
