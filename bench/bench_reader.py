"""The shard reader against an earlier checkout's: same shards, same loader, interleaved runs.

Issue #12 replaced the trainer's hand-written tar and .npy header parsers with the standard
library's (`tarfile.TarInfo.frombuf`, `numpy.lib.format`, in `shard_builder/reader.py`). This
times one training epoch of `TrainData.batches()` (unpacked, shuffled within shards, bucketed,
no padding) with this checkout and with `--baseline` (a checkout of the code before, e.g.
`git worktree add /tmp/base c5b778b`), alternating A, B, A, B so that the box's drift hits
both alike. Each timed epoch runs in a fresh interpreter that imports only that checkout.

    python bench/bench_reader.py --baseline /tmp/base --copies 8 --passes 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

from bench_common import model_with_bins  # noqa: E402
from bench_loader import build_shards, replicate_split  # noqa: E402

EPOCH = """
import json, sys, time
sys.path.insert(0, {checkout!r})
import torch
torch.set_num_threads(1)
from trainer.data.loader import DataConfig, TrainData
config = DataConfig(batch_size={batch}, num_workers={workers}, bucket_buffer=64, pack=False)
data = TrainData({split!r}, config, rank=0, world_size=1)
start = time.perf_counter()
samples = sum(len(batch["keys"]) for batch in data.batches({epoch}))
print(json.dumps({{"seconds": time.perf_counter() - start, "samples": samples}}))
"""


def time_epoch(checkout: Path, split: Path, workers: int, batch: int, epoch: int) -> float:
    """Samples per second of one epoch, loader start-up included."""
    code = EPOCH.format(
        checkout=str(checkout), split=str(split), workers=workers, batch=batch, epoch=epoch
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=checkout, capture_output=True, text=True, check=True
    )
    row = json.loads(result.stdout.strip().splitlines()[-1])
    return row["samples"] / row["seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", type=Path, required=True, help="checkout to compare with")
    parser.add_argument("--dataset", default="demo/corpus")
    parser.add_argument("--model", default="config/models/tiny-whisper-de")
    parser.add_argument("--n-mels", type=int, default=128, help="128 = large-v3/turbo")
    parser.add_argument("--copies", type=int, default=8, help="times the train split is repeated")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--passes", type=int, default=5)
    args = parser.parse_args()
    checkouts = {"this checkout": REPO, "baseline": args.baseline.resolve()}
    rates: dict[tuple[str, int], list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        model = model_with_bins(args.model, args.n_mels, workdir)
        built = build_shards(args.dataset, model, workdir / "shards")
        split = replicate_split(built, args.copies, workdir / "bench-train")
        samples = json.loads((split / "manifest.json").read_text())["num_samples"]
        for workers in (0, 1, 2):
            for epoch in range(args.passes):
                for name, checkout in checkouts.items():
                    rate = time_epoch(checkout, split, workers, args.batch_size, epoch)
                    rates.setdefault((name, workers), []).append(rate)
    print(
        f"\n{args.n_mels} mel bins, {samples} samples per epoch, batch "
        f"{args.batch_size}, median of {args.passes} interleaved epochs"
    )
    print("| loader workers | this checkout | baseline | this / baseline |")
    print("|---|---|---|---|")
    for workers in (0, 1, 2):
        ours = statistics.median(rates[("this checkout", workers)])
        theirs = statistics.median(rates[("baseline", workers)])
        print(
            f"| {workers} | {ours:.0f} samples/s | {theirs:.0f} samples/s | {ours / theirs:.2f} |"
        )


if __name__ == "__main__":
    main()
