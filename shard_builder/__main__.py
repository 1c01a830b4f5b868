"""`python -m shard_builder`: build the shards once; see `--help`."""

import sys

from shard_builder.build import BuildError, build
from shard_builder.config import parse_args
from shard_builder.source import MissingColumnError


def main(argv: list[str] | None = None) -> int:
    config = parse_args(argv)
    try:
        summaries = build(config)
    except (BuildError, MissingColumnError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0 if all(s["complete"] for s in summaries.values()) or config.part_count > 1 else 1


if __name__ == "__main__":
    sys.exit(main())
