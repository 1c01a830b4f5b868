#!/usr/bin/env bash
# The whole journey on the bundled German demo corpus, offline, on CPU, in a few minutes:
# build shards → check them → train the tiny preset on 2 ranks → evaluate → export for
# faster-whisper → evaluate the export. Everything lands in out/demo/.
#
# MODEL=/path/to/whisper-base bash scripts/demo.sh  fine-tunes a real pretrained Whisper instead
# (see docs/benchmarks.md for the WER it reaches). TRAIN_ARGS adds trainer flags, for example
# TRAIN_ARGS="--pack true" trains on packed 30 s windows with timestamps and prompts.
# The demo's long rows (over the window) are split at pauses: with the tiny preset by the
# model-free sentence method (its random weights cannot align), with MODEL by that model;
# ALIGN_MODEL=/path/to/whisper-base names another aligner (docs/shards.md, "Long clips").
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PYTHON=${PYTHON:-python3}
OUT=${OUT:-out/demo}
MODEL=${MODEL:-}
ALIGN_MODEL=${ALIGN_MODEL:-}
rm -rf "$OUT"
mkdir -p "$OUT"

ALIGN_ARGS=()
if [ -n "$ALIGN_MODEL" ]; then
    ALIGN_ARGS=(--align-model "$ALIGN_MODEL")
elif [ -z "$MODEL" ]; then
    ALIGN_ARGS=(--align-method sentences)
fi
if [ -z "$MODEL" ]; then
    MODEL=config/models/tiny-whisper-de
    TRAIN_CONFIG=config/demo-tiny.toml
else
    TRAIN_CONFIG=config/demo-whisper-base.toml
fi

step() { printf '\n==> %s\n' "$*"; }

step "1/6 build shards from demo/corpus for $MODEL"
"$PYTHON" -m shard_builder --dataset demo/corpus --model "$MODEL" --out "$OUT/shards" \
    --shard-size 64 --workers 2 "${ALIGN_ARGS[@]}"

step "2/6 prove the shards whole"
"$PYTHON" scripts/check_shards.py "$OUT/shards" --deep --workers 2

step "3/6 train on 2 CPU ranks (gloo)"
OMP_NUM_THREADS=1 "$PYTHON" -m torch.distributed.run --nproc_per_node=2 -m trainer \
    --config "$TRAIN_CONFIG" --model "$MODEL" --shards "$OUT/shards" \
    --output-dir "$OUT/run" ${TRAIN_ARGS:-}

step "4/6 evaluate the best checkpoint on the demo test split"
"$PYTHON" -m trainer.evaluate --model "$OUT/run/best" --shards "$OUT/shards/test" \
    --output "$OUT/eval-best.json" --worst 5

step "5/6 export to CTranslate2, the faster-whisper format (int8)"
"$PYTHON" -m trainer.export --model "$OUT/run/best" --out "$OUT/ct2-int8" --quantization int8

step "6/6 evaluate the export on the same shards"
"$PYTHON" -m trainer.evaluate --model "$OUT/ct2-int8" --shards "$OUT/shards/test" \
    --output "$OUT/eval-ct2.json"

printf '\nDone. Run folder: %s/run (tensorboard --logdir %s/run), reports: %s/eval-*.json\n' \
    "$OUT" "$OUT" "$OUT"
