#!/usr/bin/env bash
# GPU session 2026-12-04 (second), call 5: the kernel table at M=1, 4, 16 for the four shapes of
# issue 4 (the tuning table's rows: x_direct for K <= N, x_planes past that), plain XLA and
# bitsandbytes in the same run (run44-47 lost bitsandbytes: .whl/bnb held the package itself, not
# a folder holding it).
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
O=${OUT:-/tmp/out}; mkdir -p $O
nvidia-smi --query-gpu=name,clocks.max.sm,memory.total --format=csv | tee $O/gpu.txt
timeout 240 python3 experiments/bench_kernels.py --quick --check --m 1 4 16 --kn 4096 4096 --kn 4096 11008 --kn 11008 4096 \
  --kn 8192 8192 --bnb-path .whl/bnb --out $O/table.json 2>&1 | grep -v Warn | tee $O/table.log | grep -E -A14 "summary|bitsandbytes" | cut -c1-330
