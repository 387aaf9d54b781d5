#!/usr/bin/env bash
# The main job on a fresh machine, end to end on the embedded defaults:
# install tdist into .venv, deploy the hello-world graph (embedded nats-server), send one request
# and a load of them, show status, stop everything. Set GRAPH=... to try another graph.
set -euo pipefail
cd "$(dirname "$0")/.."
GRAPH=${GRAPH:-graphs/hello_world.yaml}
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
  .venv/bin/pip install -q -U pip
fi
.venv/bin/pip install -q -e .
if grep -q "kind: triton" "$GRAPH"; then bash scripts/setup.d/30-triton.sh; fi
export TDIST_HOME=${TDIST_HOME:-$PWD/.tdist}
T=.venv/bin/tdist
cleanup() { $T stop --name "$NAME" >/dev/null 2>&1 || true; }
NAME=$(.venv/bin/python -c "import sys,yaml; print(yaml.safe_load(open(sys.argv[1]))['name'])" "$GRAPH")
trap cleanup EXIT
echo "== tdist deploy $GRAPH --detach"
$T deploy "$GRAPH" --detach
echo "== tdist infer --component encoder_decoder --input 'input=[1,2,3]'"
$T infer --component encoder_decoder --input 'input=[1,2,3]'
echo "== tdist infer ... --requests 500 --concurrency 16"
$T infer --component encoder_decoder --input 'input=[1,2,3,4,5,6,7,8]' --requests 500 --concurrency 16
echo "== tdist status"
$T status
echo "== tdist stop"
trap - EXIT
$T stop
