#!/usr/bin/env bash
# One-stop install for a fresh machine (and for CI): a venv at .venv with tdist and everything the
# tests need, then every scripts/setup.d/*.sh in order (Debian packages, engine fix-ups, ...).
# Idempotent: re-running only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
  .venv/bin/pip install -q -U pip
fi
export PATH="$PWD/.venv/bin:$PATH"
.venv/bin/pip install -q -e ".[test,frontend,etcd,triton]"
for f in scripts/setup.d/*.sh; do
  [ -e "$f" ] || continue
  echo "== setup: $f"
  bash "$f"
done
echo "== setup done: activate with '. .venv/bin/activate'"
