#!/usr/bin/env bash
# GPU session 2026-12-01 (second session), call 4: decode tile sweep with the word-pair path at
# M = 1 and 4 (K=4096 N=11008) and M = 1 (K=N=4096); the kernel GPU tests.
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
O=${OUT:-/tmp/out}; mkdir -p $O
timeout 400 python3 experiments/bench_kernels.py --sweep --sweep-ops decode --kn 4096 11008 --kn 4096 4096 --m 1 4 --out $O/bench_kernels_sweep_decode.json 2>&1 | grep -v Warn > $O/sweep_decode.log; grep -E "BEST|rror|decode" $O/sweep_decode.log | head -45
timeout 120 python3 -m pytest -q -m gpu -n 4 tests/test_pallas_kernels.py 2>&1 | tail -3 | tee $O/gpu_tests_kernels.log
