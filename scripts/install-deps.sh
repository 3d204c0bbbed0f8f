#!/usr/bin/env bash
# Install the Debian packages surveyproc needs, only those that are missing.
# Idempotent: when everything is present it does nothing and never calls apt-get.
# Usage: scripts/install-deps.sh [--with-peers] [--with-slurm]
set -euo pipefail

PKGS=(build-essential pkg-config libopenmpi-dev openmpi-bin libcfitsio-dev wcslib-dev
      libfftw3-dev libfftw3-mpi-dev libopenblas-dev liblapacke-dev libhdf5-openmpi-dev
      hdf5-tools libyaml-dev libcmocka-dev python3-numpy python3-h5py python3-astropy
      python3-matplotlib)
for a in "$@"; do
  case "$a" in
    --with-peers) PKGS+=(source-extractor psfex python3-photutils python3-sep python3-scipy python3-matplotlib) ;;
    --with-slurm) PKGS+=(slurm-wlm munge slurm-wlm-torque) ;;
    --with-qa)    PKGS+=(python3-matplotlib chromium) ;;
    *) echo "install-deps: unknown option '$a' (allowed: --with-peers --with-slurm --with-qa)" >&2; exit 2 ;;
  esac
done

missing=()
for p in "${PKGS[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done
[ ${#missing[@]} -eq 0 ] && exit 0

echo "install-deps: installing ${missing[*]}"
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null || { echo "install-deps: need root or sudo to install: ${missing[*]}" >&2; exit 1; }
  SUDO=sudo
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get -o DPkg::Lock::Timeout=900 update -qq
$SUDO apt-get -o DPkg::Lock::Timeout=900 install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
echo "install-deps: done"
