#!/usr/bin/env bash
# Sets up (if needed) and runs the test suite: the README's test command. Arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/_setup.sh all
exec .venv/bin/python -m pytest "$@"
