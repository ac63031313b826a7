#!/usr/bin/env bash
# GPU session 2026-12-04 (second), call 6: every GPU test on the final code of the session (the
# x_direct fallback for float16 x and M > 4; test_byte_lut's shared pair-dot test kernel).
export PYTHONPATH=$PWD XLA_PYTHON_CLIENT_PREALLOCATE=false
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 300 python3 -m pytest -q -m gpu -n 4 tests/ 2>&1 | tail -4
