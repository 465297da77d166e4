# shellcheck shell=bash
# A Ray cluster across a Slurm allocation, and a run against it. Sourced by ray-cpu.sbatch and
# ray-gpu.sbatch (read their headers for the options); not run on its own.
#
# The batch script runs on the allocation's first node: the Ray head starts there, one Ray worker node
# starts on every other node (one srun step each), and the run waits until every node has joined.
# The cluster is torn down when the script exits, whatever the cause. On a signal (preemption, or
# --signal=B:USR1@T before the time limit) the job is requeued: its next start continues from the last
# checkpoint (resume=auto).
#
# Nothing here runs `ray stop`: it would kill every Ray process on the node, other jobs' included.

# shellcheck source=slurm/common.sh
source slurm/common.sh

RAY_STEPS=()
: "${RAY_PORT:=6379}"
: "${RAY_DASHBOARD_HOST:=127.0.0.1}"   # the dashboard and Jobs API: remote code execution for whoever reaches it
: "${RAY_DASHBOARD_PORT:=8265}"
: "${RAY_TOKEN_AUTH:=1}"
: "${RAY_TMP:=/tmp/ray-${SLURM_JOB_ID}}"
: "${JOIN_TIMEOUT:=300}"
: "${RAY_JOB_DIR:=${SLURM_SUBMIT_DIR:-$PWD}/runs/slurm-${SLURM_JOB_ID}}"
export RAY_USAGE_STATS_ENABLED="${RAY_USAGE_STATS_ENABLED:-0}"
export RAY_USAGE_STATS_REPORT_URL="${RAY_USAGE_STATS_REPORT_URL:-http://127.0.0.1:9/}"
# At teardown the run has ended (or checkpointed): nothing is worth Ray's default 30 s of draining.
export RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="${RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S:-5}"

# How the other nodes reach the head: RAY_HEAD_IP, else Slurm's NodeAddr or the node's first address.
_head_ip() { if [[ -n ${RAY_HEAD_IP:-} ]]; then echo "$RAY_HEAD_IP"; else _node_ip "$1"; fi; }

# HOME of the Ray processes: a ray_bootstrap_config.yaml there tells Ray it runs on a local provider, so
# its dashboard does not probe cloud metadata addresses; with RAY_TOKEN_AUTH=1 a fresh per-job token
# (never printed) is required by every Ray connection.
_ray_home() {
  RAY_HOME="$RAY_JOB_DIR/ray-home"
  mkdir -p "$RAY_HOME/.ray"
  echo "provider: {type: local}" > "$RAY_HOME/ray_bootstrap_config.yaml"
  if [[ $RAY_TOKEN_AUTH == 1 ]]; then
    (umask 077 && "$PYTHON" -c 'import secrets; print(secrets.token_hex(32))' > "$RAY_HOME/.ray/auth_token")
    export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH="$RAY_HOME/.ray/auth_token"
  fi
}

ray_cluster_up() {  # ray_cluster_up CPUS_PER_NODE GPUS_PER_NODE
  local cpus=$1 gpus=$2 nodes head others node
  mapfile -t nodes < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
  head="${SLURMD_NODENAME:-${nodes[0]}}"
  others=()
  for node in "${nodes[@]}"; do [[ $node != "$head" ]] && others+=("$node"); done
  RAY_HEAD_IP=$(_head_ip "$head")
  RAY_NODES=${#nodes[@]}
  if [[ $RAY_HEAD_IP == 127.* || $RAY_HEAD_IP == ::1 ]]; then
    # A one-node cluster on loopback: Ray must keep 127.0.0.1 rather than swap in the host's address.
    (( RAY_NODES == 1 )) || { _log "head address $RAY_HEAD_IP is loopback but the job has $RAY_NODES nodes"; return 1; }
    export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
  fi
  RAY_ADDRESS_HEAD="$RAY_HEAD_IP:$RAY_PORT"
  _ray_home
  RAY_STEPS=()
  local common=(--block --num-cpus="$cpus" --num-gpus="$gpus" --temp-dir="$RAY_TMP" --disable-usage-stats)
  [[ -n ${RAY_CLIENT_SERVER_PORT:-} ]] && common+=(--ray-client-server-port="$RAY_CLIENT_SERVER_PORT")
  _log "Ray head on $head ($RAY_ADDRESS_HEAD); dashboard and Jobs API on $RAY_DASHBOARD_HOST:$RAY_DASHBOARD_PORT"
  HOME="$RAY_HOME" srun --overlap --nodes=1 --ntasks=1 -w "$head" ray start --head "${common[@]}" \
    --node-ip-address="$RAY_HEAD_IP" --port="$RAY_PORT" \
    --dashboard-host="$RAY_DASHBOARD_HOST" --dashboard-port="$RAY_DASHBOARD_PORT" &
  RAY_STEPS+=($!)
  for node in "${others[@]}"; do
    _log "worker node $node"
    HOME="$RAY_HOME" srun --overlap --nodes=1 --ntasks=1 -w "$node" \
      ray start --address="$RAY_ADDRESS_HEAD" "${common[@]}" &
    RAY_STEPS+=($!)
  done
  _wait_for_nodes
}

_wait_for_nodes() {  # until all RAY_NODES nodes are alive, or JOIN_TIMEOUT
  "$PYTHON" - "$RAY_ADDRESS_HEAD" "$RAY_NODES" "$JOIN_TIMEOUT" <<'PY'
import sys, time
address, want, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
deadline = time.monotonic() + timeout
import ray
while True:
    try:
        ray.init(address=address, logging_level="WARNING", log_to_driver=False)
        break
    except (ConnectionError, RuntimeError) as e:
        if time.monotonic() > deadline:
            sys.exit(f"the Ray head at {address} did not come up in {timeout:.0f} s: {e}")
        time.sleep(3)
while (alive := sum(bool(n["Alive"]) for n in ray.nodes())) < want:
    if time.monotonic() > deadline:
        sys.exit(f"only {alive} of {want} nodes joined the Ray cluster in {timeout:.0f} s")
    time.sleep(2)
print(f"[ray-cluster] {alive} of {want} nodes joined", file=sys.stderr)
PY
}

ray_cluster_down() {
  trap - EXIT
  [[ ${#RAY_STEPS[@]} -eq 0 ]] && return 0
  local step
  for step in "${RAY_STEPS[@]}"; do kill -TERM "$step" 2>/dev/null || true; done
  for step in "${RAY_STEPS[@]}"; do wait "$step" 2>/dev/null || true; done
  RAY_STEPS=()
  _log "Ray cluster stopped"
}

# ray_cluster_train CPUS_PER_NODE GPUS_PER_NODE WORKERS CPUS_PER_WORKER CONFIG [overrides...]
ray_cluster_train() {
  local cpus=$1 gpus=$2 workers=$3 cpus_per_worker=$4 config=$5
  shift 5
  _activate
  CLEANUP=ray_cluster_down
  trap ray_cluster_down EXIT
  trap _on_signal USR1 TERM INT
  ray_cluster_up "$cpus" "$gpus"
  # The script's choices first, so the user's overrides win; then what this launch requires.
  _run_requeueable "$PYTHON" -m launch train "$config" \
    distributed.num_workers="$workers" distributed.cpus_per_worker="$cpus_per_worker" resume=auto \
    "$@" distributed.backend=ray distributed.ray_address="$RAY_ADDRESS_HEAD"
}
