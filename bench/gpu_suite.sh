#!/usr/bin/env bash
# The GPU checks in one go, for a machine with one (or more) CUDA GPUs: the tests/gpu suite, then training and
# sampling throughput (images/s, Tflop/s, MFU) of edm2-img512-xs and -s at their per-GPU batch of 64 latents
# 64x64x4, fp16 and bf16, with and without --compile, and the memory/speed trade of --checkpointing.
# About 10 minutes on one H200; every step has its own time limit so the whole stays under ~12.
#
#   bash bench/gpu_suite.sh [LOGDIR]          # prints every result line and keeps them in LOGDIR/gpu_suite.log
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
logdir=${1:-.}
mkdir -p "$logdir"
log="$logdir/gpu_suite.log"
: > "$log"
step() {  # step SECONDS COMMAND...: run with a time limit, keep its output, never stop the suite
    local limit=$1
    shift
    echo "\$ $*" | tee -a "$log"
    timeout "$limit" "$@" 2>&1 | tee -a "$log" | tail -n 25
    echo "(exit ${PIPESTATUS[0]})" | tee -a "$log"
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$log"
python -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)' | tee -a "$log"

step 240 python -m pytest -q -p no:cacheprovider tests/gpu

latents=(--resolution=64 --channels-in=4 --label-dim=1000 --steps=10)
for preset in edm2-img512-xs edm2-img512-s; do
    for precision in fp16 bf16; do
        step 45 python bench/train_speed.py --preset=$preset --batch=64 --precision=$precision "${latents[@]}"
        step 45 python bench/sample_speed.py --preset=$preset --batch=64 --precision=$precision "${latents[@]}"
    done
done
step 180 python bench/train_speed.py --preset=edm2-img512-s --batch=64 --precision=bf16 --compile "${latents[@]}"
step 100 python bench/sample_speed.py --preset=edm2-img512-s --batch=64 --precision=bf16 --compile "${latents[@]}"
step 45 python bench/train_speed.py --preset=edm2-img512-s --batch=64 --precision=bf16 --checkpointing "${latents[@]}"
step 120 python bench/train_speed.py --preset=edm2-img512-xs --batch=64 --precision=fp16 --compile "${latents[@]}"
echo "Results in $log"
