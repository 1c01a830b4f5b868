#!/usr/bin/env bash
# Proves the lowest versions pyproject.toml declares: a separate virtualenv gets every direct
# dependency of the core list and of the builder and export extras at exactly its floor (the
# machine's torch instead of torch's floor, see docs/training.md, "Minimum versions"), then runs
# the journey on the demo corpus there: build shards → train the tiny preset on 2 CPU ranks with
# an evaluation and checkpoints → SIGKILL → resume, bit-identical to an uninterrupted run →
# trainer.evaluate → export to CTranslate2 → evaluate the export. Exits non-zero on any failure.
# Also resolves every extra (remote and dev too) at its floors, so that no floor is uninstallable.
#
# Needs the package registry, and uv (the one on PATH, else it installs one into the
# virtualenv). OUT= (default out/min-versions) holds the virtualenv, logs and runs; it is
# emptied first. PYTHON= picks the interpreter (3.11 or newer). Timings: docs/training.md.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
OUT=${OUT:-out/min-versions}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
EXTRAS=(builder export)  # installed and run at their floors; remote and dev are resolved only

step() { printf '\n==> [%3d s] %s\n' "$((SECONDS - started))" "$*"; }
fail() {
    printf '\nMINIMUM VERSIONS FAILED: %s\n' "$*" >&2
    exit 1
}
STEP_LIMIT_S=${STEP_LIMIT_S:-300}  # no step takes a tenth of it; a hang must not eat CI's hour
set -m  # each background job gets a process group of its own: a hang is signalled as a whole
# bounded LOG CMD...: runs CMD with its output in LOG and returns its status; past STEP_LIMIT_S
# every process it started (torchrun, the ranks, their loader workers) gets SIGABRT, which
# makes Python's faulthandler write each one's thread stacks into LOG, then the group is killed
# and the status is 124. A hang is then a failure that names where each process waits.
bounded() {
    local log=$1 waited=0 status=0
    shift
    : >"$log"  # appended to, by the command and by this function alike
    PYTHONFAULTHANDLER=1 "$@" <&0 >>"$log" 2>&1 &
    local pid=$!
    while kill -0 "$pid" 2>/dev/null; do
        if ((waited >= STEP_LIMIT_S)); then
            {
                printf '\n=== still running after %d s; its processes:\n' "$waited"
                ps -o pid,ppid,stat,etime,args -p "$(pgrep -d, -g "$pid")" || true
                printf '=== their Python stacks (faulthandler, on SIGABRT):\n'
            } >>"$log"
            kill -ABRT -- "-$pid" 2>/dev/null || true
            sleep 5
            kill -KILL -- "-$pid" 2>/dev/null || true
            wait "$pid" 2>/dev/null || true
            return 124
        fi
        sleep 1
        waited=$((waited + 1))
    done
    wait "$pid" || status=$?
    return "$status"
}
# run NAME CMD...: the output goes to $OUT/NAME.log, and its tail to the screen if it fails.
run() { run_step "" "$@"; }
# run_fresh DIR NAME CMD...: the same for a step that writes DIR, emptied before a retry.
run_fresh() { run_step "$@"; }
# A step that hangs is retried once, after its stacks are printed: a rare hang must be seen and
# diagnosed (the CI log keeps the stacks) without failing every check after it; a second hang,
# or any failure, fails the run.
run_step() {
    local clean=$1 name=$2 status=0
    shift 2
    bounded "$OUT/$name.log" "$@" || status=$?
    if ((status == 124)); then
        tail -n 400 "$OUT/$name.log" >&2
        printf '\nWARNING: %s hung (no exit in %d s; its stacks are above); once more\n' \
            "$name" "$STEP_LIMIT_S" >&2
        mv "$OUT/$name.log" "$OUT/$name.hung.log"
        [ -n "$clean" ] && rm -rf "$clean"
        status=0
        bounded "$OUT/$name.log" "$@" || status=$?
    fi
    if ((status != 0)); then
        tail -n 400 "$OUT/$name.log" >&2
        ((status == 124)) && fail "$name hung twice (log: $OUT/$name.log)"
        fail "$name (log: $OUT/$name.log)"
    fi
}

rm -rf "$OUT"  # an old virtualenv: tens of thousands of files, not counted in the timings
mkdir -p "$OUT"
started=$SECONDS
step "1/8 a fresh virtualenv ($("$PYTHON" --version)), and uv to resolve and install with"
"$PYTHON" -m venv "$OUT/venv"
VENV_PYTHON=$OUT/venv/bin/python
if uv --version >/dev/null 2>&1; then
    UV=(uv)
else
    run pip-uv "$VENV_PYTHON" -m pip install uv
    UV=("$VENV_PYTHON" -m uv)
fi

# floors --all | EXTRA...: every direct dependency of the core list and those extras pinned to
# its floor (the number after >=). torch is left out: the machine's build is installed instead
# (another torch pulls several GB of CUDA packages).
floors() {
    "$VENV_PYTHON" - "$@" <<'EOF'
import re, sys, tomllib

project = tomllib.load(open("pyproject.toml", "rb"))["project"]
extras = project["optional-dependencies"]
groups = ["dependencies", *(extras if sys.argv[1:] == ["--all"] else sys.argv[1:])]
requirements = [r for g in groups for r in (project[g] if g == "dependencies" else extras[g])]
for requirement in requirements:
    match = re.fullmatch(r"([A-Za-z0-9._-]+)(\[[^]]*\])?\s*>=\s*([0-9][^,;\s]*)(,.*)?", requirement)
    if not match:
        sys.exit(f"pyproject.toml: {requirement!r} declares no floor (name>=version)")
    if match[1] != "torch":
        print(f"{match[1]}=={match[3]}")
EOF
}
compile_floors() {  # compile_floors OUTPUT [--extra NAME | --all-extras]...
    local output=$1
    shift
    "${UV[@]}" pip compile pyproject.toml "$@" --python "$VENV_PYTHON" \
        --resolution lowest-direct --constraint "$OUT/floors.txt" \
        --override requirements/lock-overrides.txt --no-emit-package torch --quiet -o "$output"
}

step "2/8 resolve: every direct dependency at its floor (all extras, then core + ${EXTRAS[*]})"
# Across all extras the floors are lower bounds, not pins: one extra's floor may lift a core
# package's (s3fs 2026.9, the remote extra's floor, needs fsspec 2026.9, while the core alone
# runs on fsspec 2023.6); lowest-direct then proves every floor installable beside the others.
floors --all | sed 's/==/>=/' | sort -u >"$OUT/floors.txt"
run resolve-all-extras compile_floors "$OUT/all-extras.txt" --all-extras
floors "${EXTRAS[@]}" | sort -u >"$OUT/floors.txt"
extra_flags=()
for extra in "${EXTRAS[@]}"; do extra_flags+=(--extra "$extra"); done
run resolve compile_floors "$OUT/requirements.txt" "${extra_flags[@]}"

step "3/8 install torch==$TORCH_VERSION and the resolved set"
# pip finds the machine's torch build (its configured wheel folders and indexes); uv installs it
# with the rest, several times faster than pip (parallel downloads, a cache reused next time).
run torch-wheel "$VENV_PYTHON" -m pip download --no-deps -d "$OUT/wheels" "torch==$TORCH_VERSION"
torch_wheel=("$OUT"/wheels/torch-*.whl)
run install "${UV[@]}" pip install --python "$VENV_PYTHON" "${torch_wheel[0]}" \
    -r "$OUT/requirements.txt"
# The project itself, without letting pip change any version (setuptools comes from the set).
run pip-project "$VENV_PYTHON" -m pip install --no-deps --no-build-isolation -e .
run pip-check "$VENV_PYTHON" -m pip check
# What was installed, each direct dependency marked with its floor; any other version fails.
if ! "$VENV_PYTHON" - "$OUT/floors.txt" <<'EOF' | tee "$OUT/installed.txt"; then
import importlib.metadata, re, sys
from packaging.version import Version

def canonical(name):
    return re.sub(r"[-_.]+", "-", name).lower()


floors = dict(line.strip().split("==") for line in open(sys.argv[1]) if line.strip())
floors = {canonical(name): floor for name, floor in floors.items()}
installed = {canonical(d.metadata["Name"]): d.version for d in importlib.metadata.distributions()}
wrong = [f"{n} {installed.get(n)} installed, floor {f}" for n, f in floors.items()
         if n not in installed or Version(installed[n]) != Version(f)]
print(f"installed ({len(installed)} distributions; * = a direct dependency, at its floor):")
for name, version in sorted(installed.items()):
    print(f"  {'*' if name in floors else ' '} {name}=={version}")
if wrong:
    sys.exit("not at the floor pyproject.toml declares: " + "; ".join(wrong))
EOF
    fail "a direct dependency is not installed at its floor"
fi

# Everything below runs in the virtualenv; the demo corpus and the tiny preset are offline.
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
unset RUNS_DIR SHARDS_DIR
SHARDS=$OUT/shards
step "4/8 build shards from demo/corpus (builder extra at its floors)"
run build "$VENV_PYTHON" -m shard_builder --dataset demo/corpus \
    --model config/models/tiny-whisper-de --out "$SHARDS" --shard-size 64 --workers 2

# Short, on 2 gloo ranks: packed windows (prompts, timestamps), gradient checkpointing, dropout
# (the resume must restore the RNG), an evaluation at steps 3 and 6, checkpoints at 2, 4 and 6.
TRAIN=(--config config/demo-tiny.toml --device cpu --shards "$SHARDS" --batch-size 2
    --bucket-buffer 8 --num-workers 1 --grad-accum 2 --lr 3e-3 --warmup-steps 0
    --eval-batch-size 8 --eval-limit 8 --max-new-tokens 8 --log-every 1 --progress false
    --sample-log true --max-steps 6 --save-every 2 --eval-every 3 --keep-last 2
    --pack true --prompt-probability 0.5 --gradient-checkpointing true --dropout 0.1)
train() {  # train RUN_DIR
    # A static rendezvous on 127.0.0.1 and a free port, as the tests and gpu_check launch: the
    # host's own name (which --standalone's c10d rendezvous hands the ranks) is not needed.
    local port
    port=$("$VENV_PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])')
    "$VENV_PYTHON" -m torch.distributed.run --nproc_per_node 2 --master_addr 127.0.0.1 \
        --master_port "$port" -m trainer "${TRAIN[@]}" --output-dir "$1"
}
step "5/8 train 6 steps on 2 ranks, uninterrupted (the reference)"
run_fresh "$OUT/reference" train-reference train "$OUT/reference"
step "6/8 train again, SIGKILL rank 0 in step 5, resume from step 4"
killed=0
TRAINER_DEBUG_KILL_AT_STEP=5 bounded "$OUT/train-killed.log" train "$OUT/resumed" || killed=$?
if ((killed == 124)); then
    tail -n 400 "$OUT/train-killed.log" >&2
    printf '\nWARNING: the run to be killed hung (stacks above); once more\n' >&2
    mv "$OUT/train-killed.log" "$OUT/train-killed.hung.log"
    rm -rf "$OUT/resumed"
    killed=0
    TRAINER_DEBUG_KILL_AT_STEP=5 bounded "$OUT/train-killed.log" train "$OUT/resumed" || killed=$?
fi
if ((killed == 0)); then
    fail "the run to be killed finished: the kill hook did not fire"
elif ((killed == 124)); then
    tail -n 400 "$OUT/train-killed.log" >&2
    fail "the run to be killed hung instead of dying (log: $OUT/train-killed.log)"
fi
run train-resumed train "$OUT/resumed"
run check-resume "$VENV_PYTHON" - "$OUT/reference" "$OUT/resumed" <<'EOF'
import json, sys
from pathlib import Path

import torch
from safetensors.torch import load_file

reference, resumed = map(Path, sys.argv[1:])
log = (resumed / "training.log").read_text()
assert "resuming from" in log and "step-4" in log, "the second run did not resume from step-4"
rows = [json.loads(line) for line in (reference / "metrics.jsonl").read_text().splitlines()]
losses = [row["loss"] for row in rows if row["kind"] == "train"]
assert len(losses) == 6 and losses[-1] < losses[0], f"the loss did not fall: {losses}"
evals = [row["step"] for row in rows if row["kind"] == "eval"]
assert evals == [3, 6], f"evaluations at steps {evals}, expected [3, 6]"
expected, final = (load_file(run / "checkpoints/step-6/model.safetensors") for run in
                   (reference, resumed))
assert expected.keys() == final.keys()
different = [name for name in expected if not torch.equal(expected[name], final[name])]
assert not different, f"the resumed run's weights differ from the reference: {different[:5]}"
print(f"resumed run bit-identical to the reference; loss {losses[0]:.3f} -> {losses[-1]:.3f}")
EOF
cat "$OUT/check-resume.log"

step "7/8 trainer.evaluate the best checkpoint (per utterance and packed with timestamps)"
run evaluate "$VENV_PYTHON" -m trainer.evaluate --model "$OUT/resumed/best" \
    --shards "$SHARDS/test" --limit 16 --batch-size 8 --max-new-tokens 8 --packed \
    --packed-windows 4 --output "$OUT/eval-best.json"
step "8/8 export to CTranslate2 (export extra at its floors) and evaluate the export"
run export "$VENV_PYTHON" -m trainer.export --model "$OUT/resumed/best" --out "$OUT/ct2-int8" \
    --quantization int8
run evaluate-export "$VENV_PYTHON" -m trainer.evaluate --model "$OUT/ct2-int8" \
    --shards "$SHARDS/test" --limit 16 --batch-size 8 --max-new-tokens 8 \
    --output "$OUT/eval-ct2.json"
run check-reports "$VENV_PYTHON" - "$OUT/eval-best.json" "$OUT/eval-ct2.json" <<'EOF'
import json, sys

best, ct2 = (json.load(open(path)) for path in sys.argv[1:])
assert (best["backend"], ct2["backend"]) == ("transformers", "ctranslate2"), "wrong backends"
assert best["num_utterances"] == ct2["num_utterances"] == 16, "not 16 utterances evaluated"
assert best["packed_windows"] == 4, "the packed evaluation did not run"
EOF

printf '\nminimum versions proven in %d s (torch %s; logs in %s)\n' "$((SECONDS - started))" \
    "$("$VENV_PYTHON" -c 'import torch; print(torch.__version__)')" "$OUT"
