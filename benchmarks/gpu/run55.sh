#!/usr/bin/env bash
# GPU session 2026-12-04 (third), call 3: forward and input-gradient sweep round 7 (dequant_first's
# dot now asks for x's dtype) at M = 2048 and 4096 over the three shapes, and the GPU tests of the
# training paths.
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
O=${OUT:-/tmp/out}; mkdir -p $O
nvidia-smi --query-gpu=name,clocks.max.sm,memory.total --format=csv | tee $O/gpu.txt
timeout 120 python3 -m pytest -q -m gpu -n 4 tests/test_pallas_kernels.py -k "dequant_first or matmul or grad" 2>&1 | tail -3 | tee $O/gpu_tests.log
timeout 420 python3 experiments/bench_kernels.py --sweep --sweep-ops forward input_grad --m 2048 4096 --kn 4096 4096 \
  --kn 4096 11008 --kn 11008 4096 --out $O/sweep_train.json 2>&1 \
  | grep -v Warn | tee $O/sweep_train.log | grep -E "forward|input_grad|BEST|rror" | cut -c1-230
