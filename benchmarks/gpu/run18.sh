#!/usr/bin/env bash
# GPU session 2026-12-02c, call 2: GPU tests of the decode cases (the register double buffer is
# new), then the M=1 and M=4 decode sweep with its candidates.
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
O=${OUT:-/tmp/out}; mkdir -p $O
timeout 120 python3 -m pytest -q -m gpu -n 4 tests/test_pallas_kernels.py -k decode 2>&1 | tail -4 | tee $O/gpu_tests.log
timeout 420 python3 experiments/bench_kernels.py --sweep --sweep-ops decode --m 1 4 --out $O/sweep_decode.json 2>&1 | grep -v Warn | tee $O/sweep_decode.log | grep -E "BEST|device|Error|error|prefetch"
