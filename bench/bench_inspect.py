"""How long `python -m shard_builder.inspect` takes on the demo corpus and on its shards.

    python bench/bench_inspect.py [--shards OUT] [--repeats 3]

Times the whole command (interpreter start and imports included) and the inspector's own
reading time (the `seconds` of its JSON report). Without --shards the demo shards are built
first into a temporary folder (not timed).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEMO_CORPUS = REPO / "demo" / "corpus"
TINY_MODEL = REPO / "config" / "models" / "tiny-whisper-de"


def run(target: Path, *extra: str) -> tuple[float, float]:
    """(wall seconds of the command, seconds the inspector reports)."""
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "shard_builder.inspect", str(target), "--json", *extra],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    return time.perf_counter() - started, json.loads(result.stdout)["seconds"]


def build_demo_shards(out: Path) -> None:
    command = [sys.executable, "-m", "shard_builder", "--dataset", str(DEMO_CORPUS)]
    command += ["--model", str(TINY_MODEL), "--out", str(out), "--workers", "1"]
    subprocess.run([*command, "--shard-size", "64"], cwd=REPO, capture_output=True, check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shards", type=Path, default=None, help="demo shards already built")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        shards = args.shards or Path(scratch) / "demo-shards"
        if args.shards is None:
            build_demo_shards(shards)
        cases = {
            "demo corpus (330 rows, parquet)": (DEMO_CORPUS, "--model", str(TINY_MODEL)),
            "demo shards (324 samples, 6 shards)": (shards,),
        }
        for name, (target, *extra) in cases.items():
            times = [run(target, *extra) for _ in range(args.repeats)]
            wall = statistics.median(t[0] for t in times)
            own = statistics.median(t[1] for t in times)
            print(
                f"{name}: {wall:.2f} s for the command, {own:.2f} s reading "
                f"(median of {len(times)})"
            )


if __name__ == "__main__":
    main()
