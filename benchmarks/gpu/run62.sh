#!/usr/bin/env bash
# GPU session 2026-12-04 (third), call 10: after the review mends (the in-kernel scale decode through
# _common's helpers), its tests compiled, bit for bit against the library.
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
O=${OUT:-/tmp/out}; mkdir -p $O
timeout 150 python3 -m pytest -q -n 4 tests/test_quantize_pallas.py tests/test_pallas_kernels.py \
  -k "decodes_double_quant or public_api or dequant_first or gpu_decode or gpu_kernels_match" 2>&1 | tail -3 | tee $O/gpu_tests.log
