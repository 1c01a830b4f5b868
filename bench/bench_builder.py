"""Shard builder against the old way, on the same input, in one run.

The old way: `datasets.map` with `WhisperFeatureExtractor` (numpy path) writing padded float32
features [n_mels, 3000] and labels to an Arrow cache. The new way: `python -m shard_builder`'s
`build()` writing trimmed float16 features to tar shards. Both run in one process on one core,
decode audio the same way (soundfile + soxr) and tokenise with the same tokenizer, so the
difference is the feature computation and what is stored.

    python bench/bench_builder.py --dataset demo/corpus --model config/models/tiny-whisper-de \
        --n-mels 128 --repeat 2
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import datasets  # noqa: E402
import torch  # noqa: E402
from bench_common import model_with_bins  # noqa: E402
from transformers import WhisperFeatureExtractor, WhisperTokenizer  # noqa: E402

from shard_builder.audio import RejectedRow, decode_audio  # noqa: E402
from shard_builder.build import (  # noqa: E402
    RECORDS_DIR,
    _worker,
    build_shard,
    init_worker,
    plan_split,
)
from shard_builder.config import BuilderConfig  # noqa: E402


def reencode(dataset_dir: str, split: str, fmt: str, workdir: Path) -> str:
    """A copy of the split with every decodable clip stored as `fmt` (16 kHz), bad rows kept."""
    import io

    import pyarrow.parquet as pq
    import soundfile

    target = workdir / f"corpus-{fmt}"
    (target / "data").mkdir(parents=True)
    for path in Path(dataset_dir).glob(f"data/{split}-*.parquet"):
        table = pq.read_table(path)
        clips = []
        for clip in table.column("audio").to_pylist():
            try:
                audio = decode_audio(clip["bytes"])
            except RejectedRow:
                clips.append(clip)
                continue
            buffer = io.BytesIO()
            soundfile.write(buffer, audio, 16000, format=fmt.upper())
            clips.append({"bytes": buffer.getvalue(), "path": clip["path"]})
        index = table.schema.get_field_index("audio")
        table = table.set_column(index, table.schema.field(index), [clips])
        pq.write_table(table, target / "data" / path.name)
    return str(target)


def old_way(dataset_dir: str, model: str, split: str, cache_dir: Path) -> dict:
    files = sorted(str(p) for p in Path(dataset_dir).glob(f"data/{split}-*.parquet"))
    dataset = datasets.load_dataset("parquet", data_files=files, split="train")
    dataset = dataset.cast_column("audio", datasets.Audio(decode=False))
    extractor = WhisperFeatureExtractor.from_pretrained(model)
    tokenizer = WhisperTokenizer.from_pretrained(model)
    tokenizer.set_prefix_tokens(language="de", task="transcribe", predict_timestamps=False)
    seconds = []

    def prepare(row):
        try:
            audio = decode_audio(row["audio"]["bytes"])
        except RejectedRow:
            return {"input_features": None, "labels": None, "keep": False}
        if audio.size > 480000 or not (row["transkription"] or "").strip():
            return {"input_features": None, "labels": None, "keep": False}
        seconds.append(audio.size / 16000)
        features = extractor(audio, sampling_rate=16000, return_tensors="np").input_features[0]
        return {
            "input_features": features,
            "labels": tokenizer(row["transkription"]).input_ids,
            "keep": True,
        }

    cache = cache_dir / "old-cache.arrow"
    start = time.perf_counter()
    mapped = dataset.map(
        prepare,
        remove_columns=dataset.column_names,
        cache_file_name=str(cache),
        writer_batch_size=64,
        desc="old way: datasets.map",
    )
    elapsed = time.perf_counter() - start
    kept = sum(mapped["keep"])
    return {
        "rows": len(dataset),
        "examples": kept,
        "seconds": elapsed,
        "bytes": cache.stat().st_size,
        "audio_hours": sum(seconds) / 3600,
    }


def new_way(dataset_dir: str, model: str, split: str, out: Path) -> dict:
    """Time only the per-row work, like the old way's map (model and data loading excluded)."""
    # long clips rejected, as the old way drops them: their split is bench_long_audio.py's
    config = BuilderConfig(
        out=str(out),
        dataset=dataset_dir,
        model=model,
        splits=[split],
        workers=1,
        shard_size=1000,
        long_audio="reject",
    )
    init_worker(config)
    rows = _worker["source"].num_rows(split)
    (out / split / RECORDS_DIR).mkdir(parents=True)
    start = time.perf_counter()
    records = [build_shard(task) for task in plan_split(split, rows, config.shard_size)]
    elapsed = time.perf_counter() - start
    return {
        "rows": rows,
        "examples": sum(r["num_samples"] for r in records),
        "seconds": elapsed,
        "bytes": sum(r["bytes"] for r in records),
        "audio_hours": sum(r["audio_seconds"] for r in records) / 3600,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="demo/corpus", help="parquet folder, hub layout")
    parser.add_argument("--model", default="config/models/tiny-whisper-de", help="local folder")
    parser.add_argument("--split", default="train")
    parser.add_argument("--n-mels", type=int, default=128, help="128 = large-v3/turbo")
    parser.add_argument("--repeat", type=int, default=2, help="runs of each; the best is kept")
    parser.add_argument(
        "--reencode",
        choices=["wav", "flac"],
        default=None,
        help="first re-encode the clips (the demo corpus is mostly OGG Vorbis, "
        "whose decoding both ways share)",
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        model = model_with_bins(args.model, args.n_mels, workdir)
        dataset = args.dataset
        if args.reencode:
            dataset = reencode(args.dataset, args.split, args.reencode, workdir)
        runs = {"old": [], "new": []}
        for attempt in range(args.repeat):
            runs["old"].append(old_way(dataset, model, args.split, workdir / f"o{attempt}"))
            runs["new"].append(new_way(dataset, model, args.split, workdir / f"n{attempt}"))
    best = {way: min(results, key=lambda r: r["seconds"]) for way, results in runs.items()}
    report(best, args)


def report(best: dict, args) -> None:
    rows = []
    for way, label in (
        ("old", "datasets.map + WhisperFeatureExtractor, padded float32 Arrow"),
        ("new", "shard_builder, trimmed float16 tar shards"),
    ):
        result = best[way]
        rate = result["examples"] / result["seconds"]
        per_hour = result["bytes"] / result["audio_hours"]
        rows.append((label, result["examples"], rate, per_hour))
        print(
            f"{label}: {result['examples']} examples in {result['seconds']:.2f} s on 1 core = "
            f"{rate:.1f} examples/s/core; {result['bytes'] / 1e6:.1f} MB for "
            f"{result['audio_hours'] * 60:.2f} min of audio = {per_hour / 1e6:.1f} MB per hour"
        )
    speedup = rows[1][2] / rows[0][2]
    shrink = rows[0][3] / rows[1][3]
    print(
        f"ratio: {speedup:.1f}x examples/s per core, {shrink:.1f}x fewer bytes per audio hour "
        f"({args.n_mels} mel bins, split {args.split}, audio {args.reencode or 'as stored'})"
    )


if __name__ == "__main__":
    main()
