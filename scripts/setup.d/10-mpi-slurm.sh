#!/usr/bin/env bash
# Open MPI + a single-node Slurm (with munge) for the multi-node launch tests, and mpi4py in the venv.
# Idempotent: installs only what is missing. Needs root (or sudo) for apt-get.
set -euo pipefail
cd "$(dirname "$0")/../.."
export DEBIAN_FRONTEND=noninteractive

SUDO=""
if [ "$(id -u)" != 0 ]; then
  if command -v sudo >/dev/null 2>&1; then SUDO="sudo -n"; else
    echo "10-mpi-slurm: not root and no sudo: skipping apt packages" >&2; SUDO=skip; fi
fi

missing=()
for pkg in openmpi-bin libopenmpi-dev slurmctld slurmd slurm-client munge; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ "${#missing[@]}" -gt 0 ] && [ "$SUDO" != skip ]; then
  echo "10-mpi-slurm: installing ${missing[*]}"
  $SUDO apt-get update -q
  $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
  # The packages' own services are not used: scripts/cluster.sh runs munged/slurmctld/slurmd
  # with its own key and config in a temp dir. Stop anything a postinst may have started.
  for svc in slurmctld slurmd munge; do
    $SUDO systemctl stop "$svc" >/dev/null 2>&1 || true
  done
fi

if [ -x .venv/bin/pip ] && ! .venv/bin/python -c "import mpi4py" >/dev/null 2>&1; then
  if command -v mpicc >/dev/null 2>&1; then
    echo "10-mpi-slurm: pip install mpi4py"
    .venv/bin/pip install -q mpi4py
  else
    echo "10-mpi-slurm: no mpicc: skipping mpi4py" >&2
  fi
fi
