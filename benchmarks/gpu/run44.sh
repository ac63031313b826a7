#!/usr/bin/env bash
# GPU session 2026-12-04 (second), call 1: the decode kernel's x_direct path (x in its own
# order, one kernel a call) and the scale codes loaded ahead: the kernel GPU tests for decode and
# the pack-4 program; decode sweep round 11 (M=1 and M=4); the decode table rows with the
# sweep's best, plain XLA and bitsandbytes in the same run.
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
O=${OUT:-/tmp/out}; mkdir -p $O
nvidia-smi --query-gpu=name,clocks.max.sm,memory.total --format=csv | tee $O/gpu.txt
timeout 120 python3 -m pytest -q -m gpu -n 4 tests/test_pallas_kernels.py tests/test_byte_lut.py -k "decode or dot or matmul_nt_nn" 2>&1 | tail -4 | tee $O/gpu_tests.log
timeout 260 python3 experiments/bench_kernels.py --sweep --sweep-ops decode --m 1 4 --out $O/sweep_decode.json 2>&1 \
  | grep -v Warn | tee $O/sweep_decode.log | grep -E "BEST|rror" | cut -c1-190
timeout 150 python3 experiments/bench_kernels.py --quick --check --m 1 4 16 --kn 4096 4096 --kn 4096 11008 --kn 11008 4096 \
  --configs-from $O/sweep_decode.json --bnb-path .whl/bnb --out $O/table.json 2>&1 | grep -v Warn | tee $O/table.log \
  | grep -A14 summary | cut -c1-330
