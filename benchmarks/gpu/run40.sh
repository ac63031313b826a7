#!/usr/bin/env bash
# GPU session 2026-12-04, call 3: every GPU test with the new forward row (the Mosaic GPU kernel
# above M=512: 128-wide K steps, 2 stages, clusters of 2, band 16) and its float32 output (two
# bf16 parts); the probe at M=512 (where the table keeps dequant_first) and with float32 output;
# the QLoRA training step on the auto dispatch (losses against run23's XLA path).
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
O=${OUT:-/tmp/out}; mkdir -p $O
timeout 220 python3 -m pytest -q -m gpu -n 4 tests/ 2>&1 | tail -8 | tee $O/gpu_tests.log
T=block_k=128,num_stages=2,cluster_n=2,group_m=16
timeout 120 python3 benchmarks/gpu/mgpu_probe.py --out $O/mgpu_probe.json --check-configs 0 --check --float32 \
  --cases 512,4096,11008 512,4096,4096 512,11008,4096 2048,4096,11008 --configs $T \
  2>&1 | grep -v -i warn | tee $O/mgpu_probe.log | cut -c1-300
A=benchmarks/results/torch_anchor_train_nvidia-h200_2026-11-30.json
timeout 200 python3 experiments/bench_train.py --shapes tinyllama-1.1b,llama2-7b --backend auto --anchor $A \
  --out $O/train_auto.json --plot $O/train_auto.png 2>&1 | grep -v Warn | tee $O/train_auto.log | tail -5 | cut -c1-250
python3 -c "
import json
for r in json.load(open('$O/train_auto.json'))['rows']: print('auto', r['shape'], [round(v, 3) for v in r.get('losses', [])])"
