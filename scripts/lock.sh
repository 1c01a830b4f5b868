#!/usr/bin/env bash
# Regenerates requirements/lock.txt, the pinned set scripts/setup.sh installs, from pyproject.toml
# (all extras, Python 3.11 and newer, every platform). Run it after changing a dependency in
# pyproject.toml; tests/test_lock.py fails while the two disagree. Needs uv (`pip install uv`).
# Extra arguments go to uv, e.g. `bash scripts/lock.sh --upgrade-package transformers`.
set -euo pipefail
cd "$(dirname "$0")/.."
uv pip compile pyproject.toml --all-extras --universal --python-version 3.11 \
    --override requirements/lock-overrides.txt --no-emit-package torch \
    --custom-compile-command "bash scripts/lock.sh" \
    -o requirements/lock.txt "$@"
