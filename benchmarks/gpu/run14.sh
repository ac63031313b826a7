#!/usr/bin/env bash
# GPU session 2026-12-02b, call 1: the kernels' GPU tests after the vector-load fix of the tile
# offsets (pallas_kernels._common.k_offsets), then the decode tile sweep (round 4).
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
O=${OUT:-/tmp/out}; mkdir -p $O
timeout 150 python3 -m pytest -q -m gpu -n 4 tests/test_pallas_kernels.py 2>&1 | tail -4 | tee $O/gpu_tests.log
timeout 400 python3 experiments/bench_kernels.py --sweep --sweep-ops decode --out $O/sweep_decode.json 2>&1 | grep -v Warn | tee $O/sweep_decode.log | grep -E "BEST|device|Error|error" 
