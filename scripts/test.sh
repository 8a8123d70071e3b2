#!/usr/bin/env bash
# Sets up (if needed) and runs the whole test suite: the README's test command.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q torch==2.13.0
  .venv/bin/python -m pip install -q -e '.[all]'
fi
exec .venv/bin/python -m pytest "$@"
