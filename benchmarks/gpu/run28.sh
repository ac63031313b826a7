#!/usr/bin/env bash
# GPU session 2026-12-03 (second), call 4: x_planes with the table words one register a thread.
# Every GPU test (the tuning table's M=1 row is x_planes now); the kernels XLA compiles for the
# timing loop around one decode call; decode sweep round 9c; the decode table rows with its
# best, plain XLA and bitsandbytes in the same run.
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
O=${OUT:-/tmp/out}; mkdir -p $O
timeout 220 python3 -m pytest -q -m gpu -n 4 tests/ 2>&1 | tail -6 | tee $O/gpu_tests.log
timeout 60 python3 benchmarks/gpu/loop_hlo.py 2>&1 | grep -v Warn | tee $O/loop_hlo.txt | tail -12
timeout 170 python3 experiments/bench_kernels.py --sweep --sweep-ops decode --out $O/sweep_decode.json 2>&1 \
  | grep -v Warn | tee $O/sweep_decode.log | grep -E "BEST|rror| M=    1" | cut -c1-150
timeout 120 python3 experiments/bench_kernels.py --quick --check --m 1 4 16 --kn 4096 4096 --kn 4096 11008 --kn 11008 4096 \
  --configs-from $O/sweep_decode.json --bnb-path .whl/bnb --out $O/table.json 2>&1 | grep -v Warn | tee $O/table.log \
  | grep -A14 summary | cut -c1-330
