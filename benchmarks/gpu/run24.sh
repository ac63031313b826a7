#!/usr/bin/env bash
# GPU session 2026-12-03, call 5: the dequant_first path with the [K, N] tile decoder
# (decode_kn). GPU tests of the dequant_first cases, the real-shape training paths and the
# lowering cases; training sweep round 4 (decoder tiles, beside the [N, K] dequantize kernel) at
# M=4096 on 4096x11008 and 4096x4096; then the table rows M=2048..8192 with the sweep's best.
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
O=${OUT:-/tmp/out}; mkdir -p $O
timeout 75 python3 -m pytest -q -m gpu -n 4 tests/test_pallas_kernels.py -k "dequant_first or training_paths or matmul_nt_nn" 2>&1 | tail -3 | tee $O/gpu_tests.log
timeout 150 python3 experiments/bench_kernels.py --sweep --sweep-ops forward input_grad --out $O/sweep_train.json 2>&1 \
  | grep -v Warn | tee $O/sweep_train.log | grep -E "BEST|rror|forward|input_grad" | cut -c1-170
timeout 100 python3 experiments/bench_kernels.py --quick --no-bnb --m 2048 4096 8192 --configs-from $O/sweep_train.json \
  --out $O/table.json 2>&1 | grep -v Warn | tee $O/table.log | grep -A8 summary | cut -c1-330
