#!/usr/bin/env bash
# GPU session 2026-12-03, call 2: the tuning table's training rows now say dequant_first (the
# single-pass dequantize kernel, then cuBLAS). Every GPU test (qlora_matmul's gradient through
# the new dispatch included), then the kernel table with bitsandbytes in the same run, M from 1
# to 8192 on 4096x4096 and 4096x11008, with the dequant_first call's two halves timed alone.
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
O=${OUT:-/tmp/out}; mkdir -p $O
timeout 200 python3 -m pytest -q -m gpu -n 4 tests/ 2>&1 | tail -8 | tee $O/gpu_tests.log
timeout 330 python3 experiments/bench_kernels.py --quick --check --m 1 4 16 64 512 2048 4096 8192 \
  --bnb-path .whl/bnb --out $O/table.json 2>&1 | grep -v Warn | tee $O/table.log | grep -A40 summary | cut -c1-330
