#!/usr/bin/env bash
# Installs SLURM and munge (Debian's slurm-wlm) so that the test suite can start a real
# single-node cluster (tests/clusters.py). Runs only as root on a machine with apt-get; a
# second run with the binaries present does nothing.
set -euo pipefail
if [[ $(id -u) -ne 0 ]] || ! command -v apt-get >/dev/null 2>&1; then
  echo "install_slurm: not root or no apt-get; the SLURM tests will skip." >&2
  exit 0
fi
if command -v slurmctld >/dev/null && command -v slurmd >/dev/null \
  && command -v sbatch >/dev/null && command -v munged >/dev/null; then
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null
apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
# the packages' own services are not wanted: the tests start private daemons
if command -v systemctl >/dev/null 2>&1; then
  systemctl disable --now slurmctld slurmd munge >/dev/null 2>&1 || true
fi
