"""Check shard folders against their manifests before training; see docs/checking.md.

    python scripts/check_shards.py /raid/shards                 # every split, fast
    python scripts/check_shards.py /raid/shards/train --deep    # decode every sample too

Exit status 0 only when everything holds. The same CLI is `python -m shard_builder.check`.
"""

import sys
from pathlib import Path

# run from a checkout without installing the package
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from shard_builder.check import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
