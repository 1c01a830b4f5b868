#!/usr/bin/env bash
# Installs the project and everything its demo and tests need into the current Python
# environment (activate a virtualenv first if you want one). Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

# A bare `torch` requirement pulls the CUDA build and several GB of CUDA packages. Keep a torch
# that is already installed (a GPU box has its own); otherwise install the pinned CPU-capable one.
if ! "$PYTHON" -c "import torch" 2>/dev/null; then
    "$PYTHON" -m pip install --quiet "torch==${TORCH_VERSION:-2.13.0}"
fi
"$PYTHON" -m pip install --quiet -e ".[builder,export,remote,dev]"
"$PYTHON" -c "import torch, transformers; print(f'ready: torch {torch.__version__}, transformers {transformers.__version__}')"
