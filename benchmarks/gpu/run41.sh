#!/usr/bin/env bash
# GPU session 2026-12-04, call 4: the tuning table keeps the Mosaic GPU row to shapes of at
# least 132 output tiles (run40's TinyLlama step ran its K/V projections, 32 tiles, on a quarter
# of the SMs): test_ops' Mosaic case, the training step again, then the kernel table as the
# tuning table now picks, with bitsandbytes in the same run.
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
O=${OUT:-/tmp/out}; mkdir -p $O
timeout 60 python3 -m pytest -q -m gpu tests/test_ops.py -k "mosaic or auto_backend" 2>&1 | tail -2 | tee $O/gpu_tests.log
A=benchmarks/results/torch_anchor_train_nvidia-h200_2026-11-30.json
timeout 120 python3 experiments/bench_train.py --shapes tinyllama-1.1b,llama2-7b --backend auto --anchor $A \
  --out $O/train_auto.json --plot $O/train_auto.png 2>&1 | grep -v Warn | tee $O/train_auto.log | tail -4 | cut -c1-250
timeout 400 python3 experiments/bench_kernels.py --quick --check --m 1024 2048 4096 8192 --kn 4096 4096 \
  --kn 4096 11008 --kn 11008 4096 --bnb-path .whl/bnb --out $O/table.json 2>&1 | grep -v Warn | tee $O/table.log \
  | grep -A16 summary | cut -c1-330
