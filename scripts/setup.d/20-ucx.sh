#!/usr/bin/env bash
# UCX data plane: ucxx from PyPI (ucxx-cu12 bundles libucx; runs without a GPU).
# Not ucx-py-cu12: on PyPI that is a placeholder pointing at an index these machines cannot reach.
# Idempotent: does nothing when ucxx already imports.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=.venv/bin/python
if "$PY" -c "import ucxx" >/dev/null 2>&1; then
  echo "ucxx present: $("$PY" -c 'import ucxx; print(ucxx.__version__)')"
  exit 0
fi
.venv/bin/pip install -q "ucxx-cu12>=0.52"
UCX_TLS=tcp,self UCX_NET_DEVICES=lo UCX_WARN_UNUSED_ENV_VARS=n "$PY" -c "import ucxx; print('ucxx', ucxx.__version__, 'UCX', ucxx.get_ucx_version())"
