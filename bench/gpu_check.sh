#!/usr/bin/env bash
# Prove the GPU path on whatever GPU is at hand, in ~10 minutes (docs/benchmarks.md, "GPU check"):
# shards → the real trainer on 2 ranks sharing the GPU (each held to a 16 GB card) → evaluation →
# checkpoint → SIGKILL → resume → per-phase peak memory beside trainer.plan → bench/bench_gpu.py
# against Seq2SeqTrainer. One JSON summary, its path printed last; exit 1 if any phase fails.
#
#   bash bench/gpu_check.sh                       # CUDA if there is one, else the CPU mode (CI)
#   GPU_CHECK_BATCH_SIZE=2 bash bench/gpu_check.sh   # a fixed micro-batch instead of `auto`
#
# Without CUDA it runs the same sequence on the CPU with the tiny preset (a few minutes).
# A GPU machine without network installs the wheels it lacks from .whl/ (git-ignored; fill it
# beforehand with bash bench/fetch_wheels.sh on a machine with network).
# Environment: PYTHON (python3), GPU_CHECK_DIR (out/gpu-check), GPU_CHECK_BATCH_SIZE (auto on
# CUDA, 8 on the CPU), GPU_CHECK_CARD_GIB (16), GPU_CHECK_MODE (auto, cuda or cpu).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

if "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    if compgen -G ".whl/*.whl" > /dev/null; then
        # Into a folder of their own, found through PYTHONPATH (the trainer's processes inherit
        # it): the image's own packages stay as they are.
        SITE=${GPU_CHECK_SITE:-/tmp/gpu-check-site}
        echo "gpu_check: installing the carried wheels from .whl/ into $SITE (no index)"
        "$PYTHON" -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir \
            --upgrade --target "$SITE" .whl/*.whl
        export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    fi
fi

exec "$PYTHON" bench/gpu_check.py --work "${GPU_CHECK_DIR:-out/gpu-check}" \
    --mode "${GPU_CHECK_MODE:-auto}" "$@"
