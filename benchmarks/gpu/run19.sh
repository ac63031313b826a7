#!/usr/bin/env bash
# GPU session 2026-12-02c, call 3: every GPU-marked kernel test with the round-6 tuning table,
# then the kernel table (bitsandbytes in the same run; M=4 now in the quick table).
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
O=${OUT:-/tmp/out}; mkdir -p $O
timeout 200 python3 -m pytest -q -m gpu -n 4 tests/test_pallas_kernels.py tests/test_byte_lut.py tests/test_ops.py 2>&1 | tail -4 | tee $O/gpu_tests.log
timeout 370 python3 experiments/bench_kernels.py --quick --check --bnb-path .whl/bnb --out $O/table.json 2>&1 | grep -v Warn | tee $O/table.log | tail -14
