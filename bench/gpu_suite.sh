#!/usr/bin/env bash
# The GPU checks in one go, for a machine with one (or more) CUDA GPUs. speed: training and sampling throughput
# (images/s, Tflop/s, MFU) of edm2-img512-xs and -s at their per-GPU batch of 64 latents 64x64x4, fp16 and bf16,
# of DiT-XL/2 at its per-GPU batch of 32 latents 32x32x4, img512-s with --checkpointing and with channels-last
# activations; tests: the tests/gpu suite; compile: img512-s with --compile. Every step has its own time limit
# and the fastest, most wanted figures come first, so a machine lent for ten minutes returns what it reached.
# On one H200 the parts took about 3 min (speed, before the channels-last rows), 2 min (tests) and over 5 min
# (compile: training img512-s compiled for more than 3 min). With ten minutes of machine, run `compile` alone.
#
#   bash bench/gpu_suite.sh [LOGDIR [PART...]]  # PART: speed, tests, compile [default: all three, in that order]
#   PYTHON=python bash bench/gpu_suite.sh       # the interpreter to use [default: python3]
#
# Every result line is printed and kept in LOGDIR/gpu_suite.log.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
py=${PYTHON:-python3}
logdir=${1:-.}
parts=" ${*:2} "
[ "$parts" = "  " ] && parts=" speed tests compile "
mkdir -p "$logdir"
log="$logdir/gpu_suite.log"
: > "$log"
step() {  # step SECONDS COMMAND...: run with a time limit, keep its output, never stop the suite
    local limit=$1
    shift
    echo "\$ $* [$(date +%T)]" | tee -a "$log"
    timeout "$limit" "$@" 2>&1 | tee -a "$log" | tail -n 25
    echo "(exit ${PIPESTATUS[0]})" | tee -a "$log"
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$log"
$py -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda)' |
    tee -a "$log"

latents=(--resolution=64 --channels-in=4 --label-dim=1000 --steps=10)
dit=(--preset=dit-xl-2 --batch=32 --resolution=32 --channels-in=4 --label-dim=1000 --steps=10 --precision=bf16)
if [[ $parts == *" speed "* ]]; then
    for preset in edm2-img512-xs edm2-img512-s; do
        for precision in bf16 fp16; do
            step 45 $py bench/train_speed.py --preset=$preset --batch=64 --precision=$precision "${latents[@]}"
            step 45 $py bench/sample_speed.py --preset=$preset --batch=64 --precision=$precision "${latents[@]}"
        done
    done
    step 45 $py bench/train_speed.py "${dit[@]}"
    step 45 $py bench/sample_speed.py "${dit[@]}"
    step 45 $py bench/train_speed.py --preset=edm2-img512-s --batch=64 --precision=bf16 --checkpointing "${latents[@]}"
    for precision in bf16 fp16; do  # the activation layout tensor-core convolutions prefer, against NCHW above
        step 45 $py bench/train_speed.py --preset=edm2-img512-s --batch=64 --precision=$precision --channels-last=True \
            "${latents[@]}"
        step 45 $py bench/sample_speed.py --preset=edm2-img512-s --batch=64 --precision=$precision --channels-last=True \
            "${latents[@]}"
    done
fi
if [[ $parts == *" tests "* ]]; then
    step 240 $py -m pytest -q -p no:cacheprovider tests/gpu
fi
if [[ $parts == *" compile "* ]]; then  # training first: its figure is the one still missing
    step 420 $py bench/train_speed.py --preset=edm2-img512-s --batch=64 --precision=bf16 --compile "${latents[@]}"
    step 100 $py bench/sample_speed.py --preset=edm2-img512-s --batch=64 --precision=bf16 --compile "${latents[@]}"
fi
echo "Results in $log"
