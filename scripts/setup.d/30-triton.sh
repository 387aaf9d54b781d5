#!/usr/bin/env bash
# Triton for tdist's `kind: triton` operators (docs/triton.md). Idempotent.
# - tritonclient comes with the package's `triton` extra.
# - nvidia-pytriton ships a real tritonserver (2.51) + python backend + stubs, but its metadata
#   pins numpy<2: install it --no-deps so the shared venv keeps its numpy.
# - the models' Python env (numpy<2 for Triton 2.51's python-backend stub) is a small venv
#   at .venv/tdist-triton-env (python -m tdist.operators.triton.install).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=.venv/bin/python
[ -x "$PY" ] || PY=python3
"$PY" -m pip show tritonclient >/dev/null 2>&1 || "$PY" -m pip install -q 'tritonclient[all]>=2.50'
"$PY" -m pip show nvidia-pytriton >/dev/null 2>&1 || "$PY" -m pip install -q --no-deps 'nvidia-pytriton>=0.7'
"$PY" -m tdist.operators.triton.install
# The stub links libpython3.X.so.1.0: this Python's own (shared builds, e.g. pyenv) or the system's.
"$PY" - <<'PYEOF' || { command -v apt-get >/dev/null && apt-get update -q && apt-get install -y -q "libpython$("$PY" -c 'import sys;print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"; }
import ctypes.util, sys, sysconfig, pathlib
v = f"{sys.version_info[0]}.{sys.version_info[1]}"
own = pathlib.Path(sysconfig.get_config_var("LIBDIR") or "/nonexistent") / f"libpython{v}.so.1.0"
sys.exit(0 if own.exists() or ctypes.util.find_library(f"python{v}") else 1)
PYEOF
