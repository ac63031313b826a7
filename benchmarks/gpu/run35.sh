#!/usr/bin/env bash
# GPU session 2026-12-03 (third), call 6: the GPU tests of the Mosaic GPU forward kernel (compiled
# interpret cases, real shapes, qlora_matmul values and gradients with it as the table's row) and
# the training paths; forward sweep round 5 (Mosaic GPU kernel against dequant_first at M=2048,
# 4096); the kernel table at M=2048, 4096 with the sweep's best and bitsandbytes in the same run.
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
O=${OUT:-/tmp/out}; mkdir -p $O
timeout 170 python3 -m pytest -q -m gpu -n 4 tests/test_pallas_kernels.py tests/test_ops.py \
  -k "mgpu or mosaic or training_paths or matmul_nt_nn or auto_backend" 2>&1 | tail -4 | tee $O/gpu_tests.log
timeout 230 python3 experiments/bench_kernels.py --sweep --sweep-ops forward --m 2048 4096 \
  --out $O/sweep_forward.json 2>&1 | grep -v Warn | tee $O/sweep_forward.log | grep -E "BEST|rror" | cut -c1-200
timeout 180 python3 experiments/bench_kernels.py --quick --check --m 2048 4096 --kn 4096 4096 --kn 4096 11008 \
  --kn 11008 4096 --configs-from $O/sweep_forward.json --bnb-path .whl/bnb --out $O/table.json 2>&1 \
  | grep -v Warn | tee $O/table.log | grep -A12 summary | cut -c1-330
