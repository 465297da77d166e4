# shellcheck shell=bash
# Shared by the sbatch scripts (sourced, never run on its own): offline defaults, the virtualenv, the
# first node's address, and requeue on a signal.

# Offline and quiet unless the caller says otherwise (the CLI sets the same for its own process).
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" HF_DATASETS_OFFLINE="${HF_DATASETS_OFFLINE:-1}"
export TRANSFORMERS_OFFLINE="${TRANSFORMERS_OFFLINE:-1}" TOKENIZERS_PARALLELISM="${TOKENIZERS_PARALLELISM:-false}"
export MLFLOW_DISABLE_TELEMETRY="${MLFLOW_DISABLE_TELEMETRY:-true}" DO_NOT_TRACK="${DO_NOT_TRACK:-true}"

_log() { echo "[riemann-tune $(date +%H:%M:%S)] $*" >&2; }

_activate() {
  local venv="${VENV:-}"
  [[ -z $venv && -x .venv/bin/python ]] && venv=.venv
  # shellcheck disable=SC1091
  [[ -n $venv ]] && source "$venv/bin/activate"
  PYTHON="${PYTHON:-python}"
}

# How the other nodes reach node $1: Slurm's NodeAddr when it is an IP address, else the first address
# of this (the batch) node; no name lookup either way.
_node_ip() {
  local addr
  addr=$(scontrol show node "$1" | sed -n 's/.*NodeAddr=\([^ ]*\).*/\1/p')
  if [[ $addr =~ ^[0-9.]+$ || $addr == *:* ]]; then echo "$addr"; return; fi
  hostname -I | awk '{print $1}'
}

# On a signal (preemption; --signal=B:USR1@T before the time limit) stop the run, clean up (CLEANUP,
# e.g. the Ray cluster) and only then requeue the job, since the requeue makes Slurm kill what is left
# of it at once. The next start continues from the last checkpoint (resume=auto).
_on_signal() {
  trap - USR1 TERM INT
  _log "signal received: requeueing job $SLURM_JOB_ID (the next start resumes from the last checkpoint)"
  if [[ -n ${RUN_PID:-} ]]; then
    kill -TERM "$RUN_PID" 2>/dev/null || true
    wait "$RUN_PID" 2>/dev/null || true  # its failure status must not end the script (set -e) here
  fi
  "${CLEANUP:-true}"
  scontrol requeue "$SLURM_JOB_ID" || _log "requeue refused (already requeued, or the job is not requeueable)"
  exit 143
}

# Run "$@" in the background and wait for it, so that a signal's trap runs at once (bash runs traps only
# between commands); its exit status is the script's.
_run_requeueable() {
  trap _on_signal USR1 TERM INT
  "$@" &
  RUN_PID=$!
  wait "$RUN_PID"
}
