#!/usr/bin/env bash
# GPU session 2026-12-04 (second), call 4: every GPU test; decode sweep round 12c (x_direct with
# K splits at K=11008 N=4096); the table at M=1, 4, 16 (the tuning table's rows: x_direct for
# K <= N, x_planes past that) with plain XLA and bitsandbytes in the same run.
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
O=${OUT:-/tmp/out}; mkdir -p $O
nvidia-smi --query-gpu=name,clocks.max.sm,memory.total --format=csv | tee $O/gpu.txt
timeout 280 python3 -m pytest -q -m gpu -n 4 tests/ 2>&1 | tail -4 | tee $O/gpu_tests.log
timeout 90 python3 experiments/bench_kernels.py --sweep --sweep-ops decode --m 1 --kn 11008 4096 --out $O/sweep_decode.json 2>&1 \
  | grep -v Warn | tee $O/sweep_decode.log | grep -E "decode K|rror" | cut -c1-190
timeout 150 python3 experiments/bench_kernels.py --quick --check --m 1 4 16 --kn 4096 4096 --kn 4096 11008 --kn 11008 4096 \
  --bnb-path .whl/bnb --out $O/table.json 2>&1 | grep -v Warn | tee $O/table.log | grep -A14 summary | cut -c1-330
