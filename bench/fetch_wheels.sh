#!/usr/bin/env bash
# Download, on a machine with network, the wheels bench/gpu_check.sh installs on a GPU machine
# that has none: into .whl/ (git-ignored), for CPython 3.12 on x86_64 Linux.
#
#   bash bench/fetch_wheels.sh            # then carry .whl/ to the GPU machine with the checkout
#
# The lent GPU machines' image already has torch, transformers, accelerate, safetensors, numpy,
# fsspec, huggingface_hub, pyarrow, tqdm, click, psutil and tensorboard, so only what the trainer
# and the shard builder import beyond those is fetched (~5 MB), without dependency resolution
# (--no-deps: resolving would fetch numpy and friends again): each wheel's own needs that the image
# lacks are named too. datasets (hub sources only), webdataset (interop tests only) and
# ctranslate2 (export only) are not needed by the check.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${DEST:-.whl}
PYTHON=${PYTHON:-python3}
PACKAGES=(
    jiwer rapidfuzz                 # WER (trainer.watch.metrics); jiwer's click is on the image
    python-dotenv                   # the .env layer of the config
    soundfile cffi pycparser        # the shard builder's audio decoding
    soxr                            # resampling
)
mkdir -p "$DEST"
platforms=()
for tag in manylinux_2_28 manylinux_2_27 manylinux_2_17 manylinux2014 manylinux1; do
    platforms+=(--platform "${tag}_x86_64")
done
"$PYTHON" -m pip download --only-binary :all: --no-deps --python-version 3.12 \
    --implementation cp "${platforms[@]}" -d "$DEST" "${PACKAGES[@]}"
du -sh "$DEST"
