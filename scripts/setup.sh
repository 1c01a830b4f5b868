#!/usr/bin/env bash
# Installs the project and everything its demo and tests need into the current Python
# environment (activate a virtualenv first if you want one). Safe to run again.
#
# The versions come from requirements/lock.txt (regenerate it with scripts/lock.sh), given to
# pip as constraints: every package is pinned, so pip's resolver has nothing to search and a
# fresh environment installs in about a minute. LOCK= (empty) installs from pyproject.toml's
# ranges alone, as `pip install -e ".[...]"` would.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
LOCK=${LOCK-requirements/lock.txt}
EXTRAS=${EXTRAS:-builder,export,remote,wandb,dev}
started=$SECONDS

# A bare `torch` requirement pulls the CUDA build and several GB of CUDA packages. Keep a torch
# that is already installed (a GPU box has its own); otherwise install the pinned CPU-capable one.
# torch is not in the lock for the same reason.
if ! "$PYTHON" -c "import torch" 2>/dev/null; then
    "$PYTHON" -m pip install --quiet "torch==${TORCH_VERSION:-2.13.0}"
fi
constraints=()
if [ -n "$LOCK" ]; then
    constraints=(--constraint "$LOCK")
fi
"$PYTHON" -m pip install --quiet "${constraints[@]}" -e ".[$EXTRAS]"
"$PYTHON" -c "import torch, transformers; print(f'ready: torch {torch.__version__}, transformers {transformers.__version__}')"
echo "setup took $((SECONDS - started)) s"
