#!/usr/bin/env bash
# GPU session 2026-12-02c, call 1: the kernels' GPU tests with the bf16x2 pair dot of the decode
# word path (byte_lut.pair_dot_program), then the decode sweep (round 6) at M = 1, 4, 16.
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
O=${OUT:-/tmp/out}; mkdir -p $O
timeout 170 python3 -m pytest -q -m gpu -n 4 tests/test_pallas_kernels.py tests/test_byte_lut.py 2>&1 | tail -6 | tee $O/gpu_tests.log
timeout 400 python3 experiments/bench_kernels.py --sweep --sweep-ops decode --out $O/sweep_decode.json 2>&1 | grep -v Warn | tee $O/sweep_decode.log | grep -E "BEST|device|Error|error"
