#!/usr/bin/env bash
# GPU session 2026-12-04 (third), call 2: the dot forms behind dequant_first (float32 result
# rounded after, or a bf16 result; [N, K] weight against the bf16 model's [K, N]) at M = 2048-8192.
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
O=${OUT:-/tmp/out}; mkdir -p $O
nvidia-smi --query-gpu=name,clocks.max.sm,memory.total --format=csv | tee $O/gpu.txt
timeout 500 python3 benchmarks/gpu/dot_forms.py --out $O 2>&1 | grep -v Warn | tee $O/dot_forms.log
