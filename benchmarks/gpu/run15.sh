#!/usr/bin/env bash
# GPU session 2026-12-02b, call 2: forward and input-gradient tile sweeps with vector loads, and
# wider dot tiles for decode (M = 1 and 16).
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
O=${OUT:-/tmp/out}; mkdir -p $O
timeout 250 python3 experiments/bench_kernels.py --sweep --sweep-ops forward input_grad --out $O/sweep_train.json 2>&1 | grep -v Warn | tee $O/sweep_train.log | grep -E "BEST|device|  (forward|input_grad)"
timeout 300 python3 experiments/bench_kernels.py --sweep --sweep-ops decode --kn 4096 11008 --kn 4096 4096 --m 1 16 --out $O/sweep_decode2.json 2>&1 | grep -v Warn | tee $O/sweep_decode2.log | grep -E "BEST|device| dot:"
