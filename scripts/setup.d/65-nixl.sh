#!/usr/bin/env bash
# NIXL for disaggregated serving (vLLM's NixlConnector moves the KV cache from the context to the
# generation engine). nixl + nixl-cu12 1.5.1 (~70 MB, UCX bundled) run on CPU buffers without a
# GPU (shared/FIELD-NOTES.md, "Disaggregated prefill/decode works on CPU"); the same wheels serve
# GPUs. Pure additions (no shared package changes: checked with pip install --dry-run).
# Idempotent: no pip resolve when already installed. TDIST_SKIP_VLLM=1 or TDIST_SKIP_NIXL=1 skip it
# (the disaggregated tests then skip with a reason).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=.venv/bin/python
PIP=.venv/bin/pip
[ -x "$PY" ] || { echo "65-nixl: no .venv (run scripts/setup.sh)" >&2; exit 1; }
if [ "${TDIST_SKIP_VLLM:-0}" = 1 ] || [ "${TDIST_SKIP_NIXL:-0}" = 1 ]; then echo "65-nixl: skipped"; exit 0; fi
NIXL_VERSION=1.5.1
have=$("$PY" - <<'PYEOF'
from importlib import metadata
out = []
for d in ("nixl", "nixl-cu12"):
    try:
        out.append(metadata.version(d))
    except metadata.PackageNotFoundError:
        out.append("-")
print(" ".join(out))
PYEOF
)
if [ "$have" != "$NIXL_VERSION $NIXL_VERSION" ]; then
  echo "65-nixl: installing nixl==$NIXL_VERSION nixl-cu12==$NIXL_VERSION (have: $have)"
  "$PIP" install -q "nixl==$NIXL_VERSION" "nixl-cu12==$NIXL_VERSION"
  "$PY" -c "import nixl; print('65-nixl: nixl imports')"
fi
