#!/usr/bin/env bash
# Wheels for a lent GPU machine, which reaches no package registry: its image holds Python 3.12, a CUDA
# torch, accelerate, peft, tokenizers, safetensors, pyarrow and the rest, but not DeepSpeed, bitsandbytes,
# datasets, pydantic or this project's transformers (device tool: KINDS.md). Run here, where pip works:
#   bash scripts/gpu_wheels.sh        # -> .whl/a (bitsandbytes, DeepSpeed) and .whl/b (the rest)
# A call to the machine carries at most 64 MiB with the working tree (about 4 MB), so the wheels travel in
# two calls: the first carries .whl/a and installs it (bash bench/gpu_check.sh --install-only), the second,
# while the machine is still warm, carries .whl/b and runs the check. Ray's wheel (79 MB) cannot travel at
# all: the check trains through the local backend, and the gpu test that needs Ray fails for it, recorded.
# MLflow is not needed: the check runs with tracking off.
set -euo pipefail
cd "$(dirname "$0")/.."
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64)
fetch() {  # fetch DIR SPEC...: binary wheels for CPython 3.12 on x86_64 Linux, without their dependencies
    local dir=$1
    shift
    mkdir -p "$dir"
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        "${PLATFORMS[@]}" -d "$dir" "$@"
}
rm -rf .whl
fetch .whl/a bitsandbytes==0.50.2 hjson
# DeepSpeed publishes no wheel: build its pure-Python one (the ops compile on first use, as here)
python3 -m pip wheel -q --no-deps --no-build-isolation -w .whl/a deepspeed==0.19.8
fetch .whl/b transformers==5.23.0 datasets==5.2.0 dill multiprocess pydantic==2.14.4 pydantic-core==2.50.5 \
    peft==0.21.2
du -sh .whl/a .whl/b
