#!/usr/bin/env bash
# GPU session 2026-12-04 (third), call 4: the kernel table at M = 2048, 4096, 8192 for the four
# shapes of issue 4 with the new training rows (the Mosaic GPU kernel up to M = 2048,
# dequant_first with a bf16 result above; the input gradient dequant_first), plain XLA and
# bitsandbytes in the same run.
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
O=${OUT:-/tmp/out}; mkdir -p $O
nvidia-smi --query-gpu=name,clocks.max.sm,memory.total --format=csv | tee $O/gpu.txt
timeout 540 python3 experiments/bench_kernels.py --quick --check --m 2048 4096 8192 --kn 4096 4096 --kn 4096 11008 \
  --kn 11008 4096 --kn 8192 8192 --bnb-path .whl/bnb --out $O/table.json 2>&1 | grep -v Warn | tee $O/table.log \
  | grep -E -A16 "summary|bitsandbytes" | cut -c1-330
