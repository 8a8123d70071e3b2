#!/usr/bin/env bash
# The main job on a fresh machine: set up, train on the bundled MovieLens data if no model exists, then serve.
# Extra arguments go to `mfserve serve` (for example --port 50052).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/mfserve ]; then
  python3 -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q torch==2.13.0   # the CPU wheel; install it before anything can ask for torch
  .venv/bin/python -m pip install -q -e '.[train,server]'
fi
model="${MFSERVE_MODEL:-models/movielens}"
if ! ls -d "$model"/[0-9]* >/dev/null 2>&1; then
  .venv/bin/mfserve train --out "$model"
fi
exec .venv/bin/mfserve serve --model "$model" "$@"
