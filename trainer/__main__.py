"""`python -m trainer` or `torchrun --nproc_per_node=N -m trainer`: see docs/training.md.

`--dry-run` prints the training plan (memory per GPU, FLOPs, step time, hours per epoch:
`python -m trainer.plan`) for the same settings and exits without training; the plan's own
options (`--gpu`, `--world-size`, `--json`, ...) are accepted after it.
"""

import os
import sys

# The loaders fork their workers after the tokenizer has run; with its thread pool started, a
# fork can deadlock (tokenizers warns of it): an evaluation loader's worker hung this way in the
# minimum-versions CI run. Off unless the user set it.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from trainer.config import load_config  # noqa: E402


def run(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--dry-run" in argv:
        from trainer import plan

        return plan.main([arg for arg in argv if arg != "--dry-run"])
    from trainer.loop import main

    try:
        config = load_config(argv)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return main(config)


if __name__ == "__main__":
    sys.exit(run())
