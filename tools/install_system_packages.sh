#!/usr/bin/env bash
# Installs the Debian packages the test suite needs (SLURM + munge for the cluster test, Chromium for the
# report test, libseccomp2 for the sandbox) when they are missing. Needs root or passwordless sudo; otherwise says what to install.
set -euo pipefail
need=()
command -v slurmctld >/dev/null 2>&1 || need+=(slurm-wlm)
command -v munged   >/dev/null 2>&1 || need+=(munge)
command -v chromium >/dev/null 2>&1 || need+=(chromium)
# the sandbox's seccomp layer (pyseccomp) loads this library
ldconfig -p 2>/dev/null | grep -q libseccomp.so.2 || need+=(libseccomp2)
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -eq 0 ]; then sudo=""; elif sudo -n true 2>/dev/null; then sudo="sudo -n"; else
  echo "note: missing system packages: ${need[*]} (install them with apt to run every test)"; exit 0
fi
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
