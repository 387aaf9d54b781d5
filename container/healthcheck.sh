#!/usr/bin/env bash
# tdist-healthcheck: the image's HEALTHCHECK.
#
# With TDIST_HEALTH_URL set (for example http://127.0.0.1:8000/health of a tdist frontend, or
# Triton's http://127.0.0.1:8000/v2/health/ready) the container is healthy when that URL answers
# 2xx within TDIST_HEALTH_TIMEOUT_S (default 5). Without it, healthy means the tdist runtime imports
# and the bundled nats-server and etcd binaries run: the image itself is sound.
set -euo pipefail

timeout_s="${TDIST_HEALTH_TIMEOUT_S:-5}"

if [[ -n "${TDIST_HEALTH_URL:-}" ]]; then
  exec python3 - "${TDIST_HEALTH_URL}" "${timeout_s}" <<'PY'
import sys
import urllib.error
import urllib.request

url, timeout_s = sys.argv[1], float(sys.argv[2])
try:
    with urllib.request.urlopen(url, timeout=timeout_s) as response:
        status = response.status
except urllib.error.HTTPError as err:
    sys.exit(f"unhealthy: {url} answered HTTP {err.code}")
except (urllib.error.URLError, OSError) as err:
    sys.exit(f"unhealthy: {url} unreachable: {err}")
if not 200 <= status < 300:
    sys.exit(f"unhealthy: {url} answered HTTP {status}")
print(f"healthy: {url} answered HTTP {status}")
PY
fi

python3 -c 'import tdist' || { echo "unhealthy: python3 cannot import tdist" >&2; exit 1; }
for server in nats-server etcd; do
  if ! "${server}" --version >/dev/null 2>&1; then
    echo "unhealthy: '${server} --version' failed (is it on PATH?)" >&2
    exit 1
  fi
done
echo "healthy: tdist imports; nats-server and etcd run"
