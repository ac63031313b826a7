#!/usr/bin/env bash
# GPU session 2026-12-03 (second), call 5: each call timed whole (bench_kernels.timing_loop: the
# loop's outputs pass a barrier and each call has its own x). The loop's compiled kernels; the
# decode GPU tests; decode sweep round 10 (M=1, and the dot at M=4, 16 with fewer splits); the
# decode table rows with its best, plain XLA and bitsandbytes in the same run.
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
O=${OUT:-/tmp/out}; mkdir -p $O
timeout 50 python3 benchmarks/gpu/loop_hlo.py 2>&1 | grep -v Warn | tee $O/loop_hlo.txt | tail -8
timeout 80 python3 -m pytest -q -m gpu -n 4 tests/test_pallas_kernels.py -k "decode or matmul_nt_nn" 2>&1 | tail -2 | tee $O/gpu_tests.log
timeout 190 python3 experiments/bench_kernels.py --sweep --sweep-ops decode --out $O/sweep_decode.json 2>&1 \
  | grep -v Warn | tee $O/sweep_decode.log | grep -E "BEST|rror" | cut -c1-190
timeout 110 python3 experiments/bench_kernels.py --quick --check --m 1 4 16 --kn 4096 4096 --kn 4096 11008 --kn 11008 4096 \
  --configs-from $O/sweep_decode.json --bnb-path .whl/bnb --out $O/table.json 2>&1 | grep -v Warn | tee $O/table.log \
  | grep -A14 summary | cut -c1-330
