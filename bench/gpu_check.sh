#!/usr/bin/env bash
# What to run when an NVIDIA GPU is lent (H100/H200, about 8 minutes in all):
#   bash bench/gpu_check.sh                 (from the repository root, the CUDA torch installed in .venv)
# 1. the test suite's gpu marker; 2. the demo on CUDA (one local worker, 100 steps); 3. bench.peers on a
# ~1B random-init Llama with the NF4 base on CUDA (tokens/s, MFU, peak CUDA memory against HF + PEFT);
# 4. bench.preconditioner_overhead (tiny workload; that bench builds its models on the host CPU).
# Each step has its own timeout, so one hang does not eat the budget; a failed step is recorded with its
# exit code (124: timed out) and the next one runs. Everything lands under bench/results/ with the
# device's name (nvidia-smi --query-gpu=name) in the file names: gpu_check_<device>.json sums it up.
# A dry run of the plumbing on a CPU (tiny sizes, a few steps): GPU_CHECK_DRY=1 bash bench/gpu_check.sh
set -u

# On a lent machine (no .venv, no registry): the image's python3, with the wheels scripts/gpu_wheels.sh
# fetched installed into /tmp/site as they arrive (.whl/a in a first call with --install-only, .whl/b in
# the call that runs the check; scripts/gpu_wheels.sh says why two). With $OUT set (the device tool), every
# result file also lands in $OUT/gpu_check_<device>.tgz, one file, as the tool brings back only a few.
cd "$(dirname "$0")/.." || exit 1
if [ -x .venv/bin/python ]; then
    PY=${PY:-.venv/bin/python}
else
    PY=${PY:-python3}
    for batch in .whl/a .whl/b; do
        if compgen -G "$batch/*.whl" >/dev/null; then
            "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
                --target /tmp/site "$batch"/*.whl || { echo "gpu_check: installing $batch failed"; exit 1; }
        fi
    done
    if [ -d /tmp/site ]; then export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}; fi
fi
if [ "${1:-}" = --install-only ]; then echo "gpu_check: installed into /tmp/site"; exit 0; fi
RESULTS=bench/results
DRY=${GPU_CHECK_DRY:-0}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export MLFLOW_DISABLE_TELEMETRY=true DO_NOT_TRACK=true RAY_USAGE_STATS_ENABLED=0
export HF_HOME=${HF_HOME:-$PWD/.cache/huggingface} TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}

if [ "$DRY" = 1 ]; then
    DEVICE_NAME="dry-run-cpu"
    GPU=false; PEERS=(--device cpu --model demo --base nf4 --precondition off --rounds 1 --steps 2 --warmup 1)
    DEMO_STEPS=4; PRECOND=(--workload tiny --ranks 8 --rounds 2)
else
    DEVICE_NAME=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)
    DEVICE_NAME=${DEVICE_NAME:-unknown-gpu}
    GPU=true; PEERS=(--device cuda --model 1b --base nf4 --precondition off --rounds 2 --steps 10 --warmup 3)
    DEMO_STEPS=100; PRECOND=(--workload tiny --ranks 8 16 --rounds 10)
fi
DEV=$(echo "$DEVICE_NAME" | tr -c 'A-Za-z0-9\n' '_' | sed 's/__*/_/g; s/_$//')
WORK=$(mktemp -d)
SUMMARY=$RESULTS/gpu_check_$DEV.json
STEPS=()
mkdir -p "$RESULTS"
echo "gpu_check on $DEVICE_NAME (files: $RESULTS/*_$DEV.*)"

# step NAME TIMEOUT_S COMMAND...: run it under its own timeout, its output in gpu_check_<device>_NAME.log
step() {
    local name=$1 limit=$2 start rc
    shift 2
    start=$(date +%s)
    timeout --kill-after=15 "$limit" "$@" >"$RESULTS/gpu_check_${DEV}_$name.log" 2>&1
    rc=$?
    local seconds=$(($(date +%s) - start))
    echo "  $name: exit $rc after ${seconds}s (limit ${limit}s)"
    STEPS+=("{\"step\": \"$name\", \"exit_code\": $rc, \"seconds\": $seconds, \"timeout_s\": $limit}")
}

step gpu_tests 90 "$PY" -m pytest -m gpu -q -p no:cacheprovider tests/test_gpu.py
step demo 90 "$PY" -m launch train configs/tiny-cpu.yaml distributed.backend=local \
    distributed.num_workers=1 distributed.use_gpu=$GPU train.max_steps=$DEMO_STEPS \
    train.eval_every_n_steps=$((DEMO_STEPS / 2)) checkpoint.every_n_steps=0 tracking.enabled=false \
    output.dir="$WORK/demo"
cp "$WORK/demo/summary.json" "$RESULTS/gpu_check_${DEV}_demo_summary.json" 2>/dev/null
step peers_1b_nf4 240 "$PY" -m bench.peers "${PEERS[@]}" --name "peers_1b_nf4_$DEV"
step preconditioner_overhead 60 "$PY" -m bench.preconditioner_overhead "${PRECOND[@]}"
for ext in json png; do
    mv -f "$RESULTS/preconditioner_overhead_tiny.$ext" "$RESULTS/preconditioner_overhead_tiny_$DEV.$ext" 2>/dev/null
done
rm -rf "$WORK"

joined=$(IFS=,; echo "${STEPS[*]}")
echo "{\"device\": \"$DEVICE_NAME\", \"date\": \"$(date -u +%FT%TZ)\", \"steps\": [$joined]}" >"$SUMMARY"
echo "wrote $SUMMARY"
if [ -n "${OUT:-}" ]; then
    tar czf "$OUT/gpu_check_$DEV.tgz" "$RESULTS"/*"$DEV"* && echo "packed $OUT/gpu_check_$DEV.tgz"
fi
