#!/usr/bin/env bash
# GPU session 2026-12-04 (second), call 9: the decode and pack-4 GPU tests after the review mends
# (byte_lut's pair-dot programs through one _run_dot).
export PYTHONPATH=$PWD XLA_PYTHON_CLIENT_PREALLOCATE=false
timeout 150 python3 -m pytest -q -m gpu -n 4 tests/test_pallas_kernels.py tests/test_byte_lut.py -k "decode or dot or matmul_nt_nn" 2>&1 | tail -2
