#!/usr/bin/env bash
# Download, on a machine with network, the wheels bench/gpu_check.sh installs on a GPU machine
# that has none: into .whl/ (git-ignored), for CPython 3.12 on x86_64 Linux.
#
#   bash bench/fetch_wheels.sh            # then carry .whl/ to the GPU machine with the checkout
#
# The GPU image already has torch, transformers, accelerate, safetensors, numpy, fsspec,
# huggingface_hub, psutil and tensorboard, so only what the trainer and the shard builder import
# beyond those is fetched, without dependency resolution (--no-deps): resolving would also pull
# numpy and friends, and the folder has to stay small (the device tool carries 64 MiB in all).
# datasets (hub sources only), webdataset (interop tests only) and ctranslate2 (export only) are
# not needed by the check and are left out.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${DEST:-.whl}
PYTHON=${PYTHON:-python3}
PACKAGES=(
    jiwer rapidfuzz click           # WER (trainer.metrics)
    python-dotenv                   # .env layer of the config
    tqdm                            # progress bars (usually present already)
    soundfile cffi pycparser        # the shard builder's audio decoding
    soxr                            # resampling
    pyarrow                         # the demo corpus is parquet
)
mkdir -p "$DEST"
"$PYTHON" -m pip download --only-binary :all: --no-deps --python-version 3.12 \
    --implementation cp --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 \
    -d "$DEST" "${PACKAGES[@]}"
du -sh "$DEST"
