#!/usr/bin/env bash
# GPU session 2026-12-03 (second), call 3: decode sweep round 9b (x_planes splits and rows around
# run26's best), then the decode rows of the kernel table (M=1, 4, 16 on three shapes) with the
# sweep's best configs, plain XLA and bitsandbytes in the same run.
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
O=${OUT:-/tmp/out}; mkdir -p $O
timeout 260 python3 experiments/bench_kernels.py --sweep --sweep-ops decode --out $O/sweep_decode.json 2>&1 \
  | grep -v Warn | tee $O/sweep_decode.log | grep -E "BEST|rror|decode" | cut -c1-190
timeout 200 python3 experiments/bench_kernels.py --quick --check --m 1 4 16 --kn 4096 4096 --kn 4096 11008 --kn 11008 4096 \
  --configs-from $O/sweep_decode.json --bnb-path .whl/bnb --out $O/table.json 2>&1 | grep -v Warn | tee $O/table.log \
  | grep -A14 summary | cut -c1-330
