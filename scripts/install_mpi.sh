#!/usr/bin/env bash
# Install Open MPI from Debian/Ubuntu packages when mpirun is missing.
set -euo pipefail
if command -v mpirun >/dev/null 2>&1 && command -v mpicc >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" != 0 ]; then
  echo "error: mpirun/mpicc not found and not root: install an MPI (e.g. 'sudo apt-get install openmpi-bin libopenmpi-dev', or 'module load openmpi' on a cluster), then rerun make install" >&2
  exit 1
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "error: mpirun not found and no apt-get: install Open MPI with your system's package manager" >&2
  exit 1
fi
echo "installing Open MPI from apt"
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openmpi-bin libopenmpi-dev >/dev/null
