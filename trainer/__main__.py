"""`python -m trainer` or `torchrun --nproc_per_node=N -m trainer`: see docs/training.md."""

import sys

from trainer.config import load_config
from trainer.loop import main


def run(argv: list[str] | None = None) -> int:
    try:
        config = load_config(argv)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return main(config)


if __name__ == "__main__":
    sys.exit(run())
