#!/usr/bin/env bash
# Installs the Debian packages the project needs when they are missing. Needs root or passwordless sudo;
# otherwise says what to install.
#   tools/install_system_packages.sh        everything the test suite needs (`make system`, run by `make test`)
#   tools/install_system_packages.sh jail   only the sandbox's jail (`make jail`): runs that execute untrusted
#                                           programs (LLM explainers, user files) need it; the default offline
#                                           run does not (its programs are the project's own, run in-process)
set -euo pipefail
need=()
# The sandbox's jail: bubblewrap, util-linux (unshare, setpriv, mount) and libseccomp2, which pyseccomp loads
# to compile the system-call allow-lists.
command -v bwrap    >/dev/null 2>&1 || need+=(bubblewrap)
command -v setpriv  >/dev/null 2>&1 || need+=(util-linux)
command -v mount    >/dev/null 2>&1 || need+=(mount)
ldconfig -p 2>/dev/null | grep -q libseccomp.so.2 || need+=(libseccomp2)
if [ "${1:-all}" != "jail" ]; then
  # SLURM + munge for the cluster test, Chromium for the report test
  command -v slurmctld >/dev/null 2>&1 || need+=(slurm-wlm)
  command -v munged   >/dev/null 2>&1 || need+=(munge)
  command -v chromium >/dev/null 2>&1 || need+=(chromium)
fi
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -eq 0 ]; then sudo=""; elif sudo -n true 2>/dev/null; then sudo="sudo -n"; else
  echo "note: missing system packages: ${need[*]} (install them with apt to run every test)"; exit 0
fi
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
