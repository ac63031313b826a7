#!/usr/bin/env bash
# GPU session 2026-12-01, call 3: quantize throughput (new loop timing) with the torch copy
# reference, decode sweep round 2, the GPU test suite.
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
O=${OUT:-/tmp/out}; mkdir -p $O
timeout 60 python3 benchmarks/copy_ref.py 2>&1 | grep -v Warn | tee $O/copy_ref.log
timeout 150 python3 experiments/bench_quantize.py --backend both --reps 20 --save --out $O 2>&1 | grep -v Warn | tee $O/bench_quantize.log | tail -24
timeout 150 python3 experiments/bench_kernels.py --sweep --sweep-ops decode --out $O/sweep_decode.json 2>&1 | grep -v Warn > $O/sweep_decode.log; grep BEST $O/sweep_decode.log
timeout 260 python3 -m pytest -q -m gpu tests/ -x 2>&1 | tail -15 | tee $O/gpu_tests.log
