#!/usr/bin/env bash
# GPU session 2026-12-04, call 6: the dispatch leaves float32 products to dequant_first (run42):
# the GPU tests of the dispatch and the Mosaic GPU kernel.
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
O=${OUT:-/tmp/out}; mkdir -p $O
timeout 110 python3 -m pytest -q -m gpu -n 4 tests/test_ops.py tests/test_pallas_kernels.py \
  -k "mosaic or mgpu or auto or training_paths" 2>&1 | tail -3 | tee $O/gpu_tests.log
