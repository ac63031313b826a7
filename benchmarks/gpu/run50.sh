#!/usr/bin/env bash
# GPU session 2026-12-04 (second), call 7: x_direct's table operands loaded in the weight tile's
# layout (no shared-memory conversion, 8 -> 2 CTA barriers in the kernel): the decode and
# pack-4 GPU tests, then the M=1 table for the four shapes with bitsandbytes in the same run.
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
O=${OUT:-/tmp/out}; mkdir -p $O
nvidia-smi --query-gpu=name --format=csv,noheader | tee $O/gpu.txt
timeout 100 python3 -m pytest -q -m gpu -n 4 tests/test_pallas_kernels.py tests/test_byte_lut.py -k "decode or dot or matmul_nt_nn" 2>&1 | tail -3 | tee $O/gpu_tests.log
timeout 150 python3 experiments/bench_kernels.py --quick --check --m 1 --kn 4096 4096 --kn 4096 11008 --kn 11008 4096 \
  --kn 8192 8192 --bnb-path .whl/bnb --out $O/table.json 2>&1 | grep -v Warn | tee $O/table.log | grep -E -A6 "summary|bitsandbytes" | cut -c1-330
