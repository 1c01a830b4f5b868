"""Training loader throughput: tar shards + trainer.data.loader against the old padded Arrow cache.

New way: `TrainData.batches()` over 128-bin shards of the demo corpus (trimmed float16,
bucketed), then `pad_features_to_full` to 3000 frames as the trainer does on its device (here
the CPU). Old way: a `datasets` Arrow cache of the same samples holding padded float32
[n_mels, 3000] features and labels, read through a torch DataLoader with
`with_format("torch")`. Same batch size, 1 and 2 workers. Building the shards and the cache
is not timed; each timed pass is one full epoch including the DataLoader's start-up.

    python bench/bench_loader.py --n-mels 128 --copies 4 --batch-size 8 --passes 3
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import datasets  # noqa: E402
import torch  # noqa: E402
from bench_common import model_with_bins  # noqa: E402

from shard_builder.contract import MANIFEST_NAME, MAX_FRAMES, load_manifest  # noqa: E402
from trainer.data import sampling  # noqa: E402
from trainer.data.loader import (  # noqa: E402
    IGNORE_INDEX,
    DataConfig,
    TrainData,
    iter_span_samples,
    pad_features_to_full,
)


def build_shards(dataset: str, model: Path, out: Path) -> Path:
    command = [sys.executable, "-m", "shard_builder", "--dataset", dataset, "--model", str(model),
               "--out", str(out), "--splits", "train", "--shard-size", "64",
               "--workers", str(len(os.sched_getaffinity(0)))]  # fmt: skip
    subprocess.run(command, cwd=REPO, check=True, capture_output=True, text=True)
    return out / "train"


def replicate_split(split_dir: Path, copies: int, out: Path) -> Path:
    """The split's shards `copies` times over (byte copies), so an epoch outlasts start-up."""
    manifest = load_manifest(split_dir)
    out.mkdir()
    shards = []
    for _ in range(copies):
        for shard in manifest["shards"]:
            name = f"shard-{len(shards):06d}.tar"
            shutil.copyfile(split_dir / shard["name"], out / name)
            shards.append({**shard, "name": name})
    manifest.update(shards=shards, num_samples=manifest["num_samples"] * copies)
    (out / MANIFEST_NAME).write_text(json.dumps(manifest))
    return out


def build_padded_cache(split_dir: Path, cache_dir: Path) -> datasets.Dataset:
    """The old way's cache: every sample padded to float32 [n_mels, 3000] in an Arrow file."""
    manifest = load_manifest(split_dir)
    sizes = [shard["num_samples"] for shard in manifest["shards"]]
    names = [shard["name"] for shard in manifest["shards"]]
    spans = sampling.stream_spans(sizes, range(len(sizes)), 0, sum(sizes))
    samples = list(iter_span_samples(split_dir, names, spans))
    n_mels = manifest["features"]["n_mels"]

    def pad(batch):
        chosen = [samples[i] for i in batch["index"]]
        features = [
            pad_features_to_full(torch.tensor(s["features"])[None], torch.tensor([s["pad_value"]]))[
                0
            ].numpy()
            for s in chosen
        ]
        return {"input_features": features, "labels": [s["tokens"].tolist() for s in chosen]}

    features = datasets.Features(
        {
            "input_features": datasets.Array2D((n_mels, MAX_FRAMES), "float32"),
            "labels": datasets.Sequence(datasets.Value("int64")),
        }
    )
    index = datasets.Dataset.from_dict({"index": list(range(len(samples)))})
    cache = index.map(
        pad,
        batched=True,
        batch_size=16,
        writer_batch_size=16,
        remove_columns=["index"],
        features=features,
        cache_file_name=str(cache_dir / "padded.arrow"),
    )
    return cache.with_format("torch")


def collate_padded(rows: list[dict]) -> dict:
    """What the old trainer's collator did: stack features, pad labels with -100."""
    lengths = [len(row["labels"]) for row in rows]
    labels = torch.full((len(rows), max(lengths)), IGNORE_INDEX, dtype=torch.int64)
    for i, row in enumerate(rows):
        labels[i, : lengths[i]] = row["labels"]
    return {
        "input_features": torch.stack([row["input_features"] for row in rows]),
        "labels": labels,
    }


def time_new(
    split_dir: Path, batch_size: int, workers: int, epoch: int, pad: bool
) -> tuple[float, int]:
    config = DataConfig(batch_size=batch_size, num_workers=workers, bucket_buffer=64)
    data = TrainData(split_dir, config, rank=0, world_size=1)
    start, count = time.perf_counter(), 0
    for batch in data.batches(epoch):
        features = batch["features"]
        if pad:  # what the trainer does on its device, here on the CPU
            features = pad_features_to_full(features, batch["pad_values"])
        count += features.shape[0]
    return time.perf_counter() - start, count


def time_old(cache: datasets.Dataset, batch_size: int, workers: int) -> tuple[float, int]:
    loader = torch.utils.data.DataLoader(
        cache, batch_size=batch_size, shuffle=True, num_workers=workers, collate_fn=collate_padded
    )
    start, count = time.perf_counter(), 0
    for batch in loader:
        count += batch["input_features"].shape[0]
    return time.perf_counter() - start, count


def median_rate(timings: list[tuple[float, int]]) -> tuple[float, int]:
    return statistics.median(n / seconds for seconds, n in timings), timings[0][1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="demo/corpus", help="parquet folder, hub layout")
    parser.add_argument("--model", default="config/models/tiny-whisper-de", help="local folder")
    parser.add_argument("--n-mels", type=int, default=128, help="128 = large-v3/turbo")
    parser.add_argument("--copies", type=int, default=4, help="times the train split is repeated")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--passes", type=int, default=3, help="timed epochs each; median kept")
    args = parser.parse_args()
    torch.set_num_threads(1)  # one core for the main process, like a rank beside its workers
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        model = model_with_bins(args.model, args.n_mels, workdir)
        built = build_shards(args.dataset, model, workdir / "shards")
        split_dir = replicate_split(built, args.copies, workdir / "bench-train")
        n_mels = load_manifest(split_dir)["features"]["n_mels"]
        assert n_mels == args.n_mels, f"shards hold {n_mels} mel bins, not {args.n_mels}"
        cache = build_padded_cache(split_dir, workdir)
        shard_bytes = sum(s["bytes"] for s in load_manifest(split_dir)["shards"])
        cache_bytes = (workdir / "padded.arrow").stat().st_size
        passes = range(args.passes)
        for workers in (1, 2):
            rates = [
                median_rate([time_new(split_dir, args.batch_size, workers, p, pad) for p in passes])
                for pad in (False, True)
            ]
            rates.append(median_rate([time_old(cache, args.batch_size, workers) for _ in passes]))
            results.append((workers, *rates))
    report(results, shard_bytes, cache_bytes, args)


def report(results, shard_bytes: int, cache_bytes: int, args) -> None:
    print(
        f"\n{args.n_mels} mel bins, batch size {args.batch_size}, median of {args.passes} "
        f"epochs, main process on 1 thread; {os.cpu_count()} CPU cores"
    )
    print(
        f"bytes on disk: shards {shard_bytes / 1e6:.1f} MB, padded Arrow {cache_bytes / 1e6:.1f} MB"
    )
    print("| workers | samples/epoch | new: shards, loader only | new: + pad to 3000 on CPU | "
          "old: padded float32 Arrow | new (padded) / old |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for workers, (bare, count), (padded, _), (old, _) in results:
        print(
            f"| {workers} | {count} | {bare:.0f} samples/s | {padded:.0f} samples/s "
            f"| {old:.0f} samples/s | {padded / old:.1f}x |"
        )


if __name__ == "__main__":
    main()
