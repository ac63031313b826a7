#!/usr/bin/env bash
# GPU session 2026-12-03, call 1: every kernel GPU test (with the new swap_ab and dequant_first
# training paths and the deeper decode pipeline), the training sweep (round 3: swap_ab tiles,
# the round-2 row, dequant_first) at M=4096 on 4096x11008 and 4096x4096, then the decode sweep
# at M=1 (round 8: prefetch = K steps carried ahead, fewer splits) on 4096x11008.
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
O=${OUT:-/tmp/out}; mkdir -p $O
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee $O/device.txt
python3 -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__)" | tee -a $O/device.txt
timeout 170 python3 -m pytest -q -m gpu -n 4 tests/test_pallas_kernels.py 2>&1 | tail -6 | tee $O/gpu_tests.log
timeout 260 python3 experiments/bench_kernels.py --sweep --sweep-ops forward input_grad --out $O/sweep_train.json 2>&1 \
  | grep -v Warn | tee $O/sweep_train.log | grep -E "BEST|device|rror|forward|input_grad" | cut -c1-160
timeout 140 python3 experiments/bench_kernels.py --sweep --sweep-ops decode --m 1 --kn 4096 11008 --out $O/sweep_decode.json 2>&1 \
  | grep -v Warn | tee $O/sweep_decode.log | grep -E "BEST|rror|decode" | cut -c1-160
