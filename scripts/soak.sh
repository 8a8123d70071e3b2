#!/usr/bin/env bash
# The long reliability run: the tests/reliability suite for 60 s a load test (CI runs 10 s) and
# the hostile-input suite, with 5x the fuzzed examples. Figures go to the report file (JSON lines,
# one per test; default reliability-report.jsonl) for docs/reliability.md. Extra arguments go to
# pytest. Takes about 15 minutes on two cores.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/_setup.sh all
report="${MFSERVE_RELIABILITY_REPORT:-$PWD/reliability-report.jsonl}"
: > "$report"
MFSERVE_RELIABILITY_SECONDS="${MFSERVE_RELIABILITY_SECONDS:-60}" \
MFSERVE_FUZZ_EXAMPLES="${MFSERVE_FUZZ_EXAMPLES:-1000}" \
MFSERVE_RELIABILITY_REPORT="$report" \
  .venv/bin/python -m pytest tests/reliability tests/server/test_hostile_input.py -s -p no:cacheprovider "$@"
echo "soak: figures in $report" >&2
