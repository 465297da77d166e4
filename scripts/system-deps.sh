#!/usr/bin/env bash
# System packages some tests use, from Debian's registry, installed only where missing and possible
# (root with apt). Tests that need one skip with a clear reason where it could not be installed.
set -u
want=()
command -v strace >/dev/null 2>&1 || want+=(strace)
# a one-node Slurm on localhost (tests/test_slurm.py); munge authenticates its daemons
command -v slurmctld >/dev/null 2>&1 && command -v slurmd >/dev/null 2>&1 && command -v sbatch >/dev/null 2>&1 \
  || want+=(slurm-wlm)
command -v munged >/dev/null 2>&1 || want+=(munge)
command -v shellcheck >/dev/null 2>&1 || want+=(shellcheck)  # lints slurm/ (tests/test_slurm_scripts.py)
# headless, for the MLflow UI test and scripts/mlflow_screenshot.py (docs/mlflow-*.png)
command -v chromium >/dev/null 2>&1 || want+=(chromium)
[ ${#want[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "system-deps: cannot install ${want[*]} (needs root and apt); the tests that use them will skip" >&2
  exit 0
fi
echo "system-deps: installing ${want[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get install -y -q --no-install-recommends "${want[@]}" >/dev/null 2>&1 \
  || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q --no-install-recommends "${want[@]}" >/dev/null 2>&1; } \
  || echo "system-deps: installing ${want[*]} failed; the tests that use them will skip" >&2
exit 0
