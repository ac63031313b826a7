#!/usr/bin/env bash
# GPU session 2026-12-04 (third), call 9: every GPU test after the in-kernel scale decode (dequantize kernel).
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
O=${OUT:-/tmp/out}; mkdir -p $O
nvidia-smi --query-gpu=name,clocks.max.sm,memory.total --format=csv | tee $O/gpu.txt
timeout 500 python3 -m pytest -q -m gpu -n 4 tests/ 2>&1 | tail -15 | tee $O/gpu_tests.log
