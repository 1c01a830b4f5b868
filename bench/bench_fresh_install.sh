#!/usr/bin/env bash
# Times what a new user meets first: a fresh clone of this checkout's HEAD, a new empty
# virtualenv, then `bash scripts/demo.sh`, until the demo reaches its first build step (setup
# done). Stops the demo there and prints the seconds. Figures go to docs/benchmarks.md.
#   bash bench/bench_fresh_install.sh            # locked install (the default)
#   LOCK= bash bench/bench_fresh_install.sh      # pyproject.toml's ranges alone
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
git clone --quiet "$repo" "$work/clone"
python3 -m venv "$work/venv"
started=$SECONDS
# Its own process group, so that stopping it stops the builder's worker processes too.
setsid bash -c 'source "$1/venv/bin/activate" && cd "$1/clone" && exec bash scripts/demo.sh' \
    _ "$work" >"$work/demo.log" 2>&1 &
demo=$!
until grep -q '^==> 1/6' "$work/demo.log" 2>/dev/null; do
    if ! kill -0 "$demo" 2>/dev/null; then
        cat "$work/demo.log" >&2
        echo "the demo stopped before its first build step" >&2
        exit 1
    fi
    sleep 1
done
elapsed=$((SECONDS - started))
kill -- "-$demo" 2>/dev/null || true
wait "$demo" 2>/dev/null || true
grep -E '^(ready|setup took)' "$work/demo.log" || true
echo "fresh clone + new virtualenv: demo.sh reached its first build step after ${elapsed} s (LOCK=${LOCK-default})"
