#!/usr/bin/env bash
# GPU session 2026-12-04, call 5: the training step with the 4-bit forward on the Mosaic GPU
# kernel (the tuning table, at least 128 tiles) and on dequant_first (--no-mosaic), in one call.
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
O=${OUT:-/tmp/out}; mkdir -p $O
A=benchmarks/results/torch_anchor_train_nvidia-h200_2026-11-30.json
for v in no_mosaic mosaic no_mosaic2 mosaic2; do
  f=""; case $v in no_mosaic*) f=--no-mosaic;; esac
  timeout 100 python3 experiments/bench_train.py --shapes tinyllama-1.1b,llama2-7b --backend auto $f --anchor $A \
    --out $O/train_$v.json --plot $O/train_$v.png 2>&1 | grep -v Warn | tee $O/train_$v.log | tail -3 | cut -c1-160
done
