"""Point webdataset and wids at a built split: shard URLs, and wids's shard-list descriptor.

The shards are plain WebDataset tars, so the libraries read them as they are; all they need is
where the shards live and, for wids's indexed access, how many samples each one holds. Both come
from the split's manifest, so nothing here opens a shard. Only the standard library is imported:
webdataset and wids are dev dependencies, never imported by the package.

    python -m shard_builder.interop /raid/shards/train --base-url s3://bucket/shards/train \\
        --out train.wids.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from shard_builder import contract

WIDS_KIND = "wids-shard-index-v1"  # what wids's own `widsindex create` writes
WIDS_VERSION = 1  # the only version wids 0.2.x accepts


def join_url(base: str, name: str) -> str:
    """`base/name`, for a local folder or a URL prefix alike (`s3://bucket/shards/train`)."""
    return f"{base.rstrip('/')}/{name}" if base else name


def shard_urls(split_dir: str | Path, base_url: str | None = None) -> list[str]:
    """The split's shards in manifest order, for `webdataset.WebDataset(urls)`.

    Without `base_url` they are the local paths under `split_dir`; with it, `base_url/NAME`
    (where the same files were copied, e.g. `https://host/shards/train`).
    """
    manifest = contract.load_manifest(split_dir)
    base = str(split_dir) if base_url is None else base_url
    return [join_url(base, shard["name"]) for shard in manifest["shards"]]


def shard_pattern(split_dir: str | Path, base_url: str | None = None) -> str:
    """The same URLs as one brace pattern, `BASE/shard-{000000..000969}.tar`."""
    manifest = contract.load_manifest(split_dir)
    names = [shard["name"] for shard in manifest["shards"]]
    if not names or names != [contract.shard_name(i) for i in range(len(names))]:
        raise contract.ContractError(
            f"{split_dir}: the manifest's shards are not shard-000000.tar onwards without gaps; "
            "use shard_urls() for a list"
        )
    base = str(split_dir) if base_url is None else base_url
    if len(names) == 1:
        return join_url(base, names[0])
    # the names were just checked against contract.shard_name: shard-NNNNNN.tar
    return join_url(base, f"shard-{{{0:06d}..{len(names) - 1:06d}}}{contract.SHARD_SUFFIX}")


def wids_descriptor(
    split_dir: str | Path, base_url: str | None = None, name: str | None = None
) -> dict[str, Any]:
    """The split as a wids shard-list descriptor (the JSON `wids.ShardListDataset` loads).

    Each shard gets `url`, `nsamples` (all wids needs: it maps a global index to a shard from
    these counts and never checks them), `filesize`, and the manifest's `sha256` (wids ignores
    it). Without `base_url` the URLs are bare shard names, which wids resolves against the
    folder the descriptor is loaded from, or against `ShardListDataset(..., base=...)`.
    """
    manifest = contract.load_manifest(split_dir)
    if not manifest["shards"]:
        raise contract.ContractError(f"{split_dir}: the manifest lists no shards")
    return {
        "__kind__": WIDS_KIND,
        "wids_version": WIDS_VERSION,
        "name": name or manifest.get("split") or Path(split_dir).name,
        "shardlist": [
            {
                "url": join_url(base_url or "", shard["name"]),
                "nsamples": shard["num_samples"],
                "filesize": shard["bytes"],
                "sha256": shard["sha256"],
            }
            for shard in manifest["shards"]
        ],
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m shard_builder.interop",
        description="Write a split's wids shard-list descriptor (JSON), read from its manifest.",
    )
    parser.add_argument("split_dir", type=Path, help="a split folder holding manifest.json")
    parser.add_argument(
        "--base-url",
        default=None,
        help="prefix of every shard URL: a folder or a URL such as s3://bucket/shards/train "
        "(default: bare shard names, resolved by wids against the descriptor's own folder)",
    )
    parser.add_argument(
        "--name", default=None, help="the dataset's name (default: the manifest's split)"
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="write the JSON to this file (default: stdout)"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        descriptor = wids_descriptor(args.split_dir, args.base_url, args.name)
    except contract.ContractError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    text = json.dumps(descriptor, indent=2) + "\n"
    if args.out is None:
        sys.stdout.write(text)
    else:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
