#!/usr/bin/env bash
# GPU session 2026-12-01 (second session), call 2: quantize with the mirror FP4 encoder and the
# faster second level (rcp.rn, 3 constant levels + 4 gathers): the table (xla and pallas), the
# stage breakdown, the second-level sweep; the quantize GPU tests.
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
O=${OUT:-/tmp/out}; mkdir -p $O
timeout 240 python3 experiments/bench_quantize.py --backend both --breakdown --sweep-dq --reps 20 --save --out $O 2>&1 | grep -v Warn | tee $O/bench_quantize.log | tail -50
timeout 200 python3 -m pytest -q -m gpu -n 4 tests/test_quantize_pallas.py tests/test_byte_lut.py tests/test_quantize_gpu.py 2>&1 | tail -4 | tee $O/gpu_tests_quantize.log
