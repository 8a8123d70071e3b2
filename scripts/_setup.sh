#!/usr/bin/env bash
# Makes .venv hold mfserve (editable) with the given extras: `bash scripts/_setup.sh train,server`.
# Shared by run.sh, test.sh and .ci/run, so the scripts work in any order: each asks for what it
# needs, and only what no earlier run installed is installed. A stamp in .venv records the extras
# installed against this pyproject.toml, so a run with nothing to add costs no pip call at all.
set -euo pipefail
cd "$(dirname "$0")/.."

wanted="${1:?usage: scripts/_setup.sh EXTRA[,EXTRA...]}"
stamp=.venv/.mfserve-extras
# A changed pyproject.toml (new dependencies) invalidates everything the stamp says.
# (Hashed by python3, which the venv needs anyway: sha256sum is not on every system.)
key="pyproject $(python3 -c 'import hashlib; print(hashlib.sha256(open("pyproject.toml", "rb").read()).hexdigest()[:16])')"

have=""
if [ -x .venv/bin/python ] && [ -f "$stamp" ] && [ "$(head -n1 "$stamp")" = "$key" ]; then
  have="$(tail -n +2 "$stamp")"
fi
missing=()
for extra in ${wanted//,/ }; do
  if ! grep -qx -e "$extra" -e all <<<"$have"; then
    missing+=("$extra")
  fi
done
[ ${#missing[@]} -eq 0 ] && exit 0

if [ ! -x .venv/bin/python ]; then
  echo "mfserve: creating .venv" >&2
  python3 -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
fi
extras="$(IFS=,; echo "${missing[*]}")"
echo "mfserve: installing torch 2.13.0 and mfserve[$extras] into .venv (a first install takes a few minutes)" >&2
# torch first and exactly: 2.13.0 is the CPU wheel; a looser spec could pull a multi-GB CUDA build.
# No -q: a first install is minutes of downloads, and pip's progress shows it is not stuck.
.venv/bin/python -m pip install torch==2.13.0
.venv/bin/python -m pip install -e ".[$extras]"

{
  echo "$key"
  printf '%s\n' $have "${missing[@]}" | sort -u
} >"$stamp.tmp"
mv "$stamp.tmp" "$stamp"
