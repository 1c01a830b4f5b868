#!/usr/bin/env bash
# Sets everything up, then runs the linter and the whole test suite (offline, CPU only).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PYTHON=${PYTHON:-python3}
# The real-model tests use ../shared/models/whisper-base when it is there; they skip otherwise.
if [ -z "${WHISPER_BASE_DIR:-}" ] && [ -f ../shared/models/whisper-base/config.json ]; then
    export WHISPER_BASE_DIR="$(cd ../shared/models/whisper-base && pwd)"
fi
"$PYTHON" -m ruff check .
"$PYTHON" -m pytest -q -rs "$@"
