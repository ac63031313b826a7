#!/usr/bin/env bash
# GPU session 2026-12-03, call 3 (run twice: the first run showed the auto path's losses leaving
# the XLA path's after one step, from rounding each base product to bf16; the dispatch now takes
# the float32 result): the GPU tests of the dispatch and the dequant_first path, then the QLoRA
# training step with the new dispatch (the 4-bit forward and input-gradient matmuls above M=16
# on dequant_first: dequantize kernel, then cuBLAS) against the plain XLA path (--backend xla),
# TinyLlama-1.1B and Llama-2-7B shapes.
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
O=${OUT:-/tmp/out}; mkdir -p $O
timeout 120 python3 -m pytest -q -m gpu -n 4 tests/test_ops.py tests/test_pallas_kernels.py -k "auto or dequant_first or training_paths or matmul_nt_nn" 2>&1 | tail -3 | tee $O/gpu_tests.log
A=benchmarks/results/torch_anchor_train_nvidia-h200_2026-11-30.json
for b in auto xla; do
  timeout 200 python3 experiments/bench_train.py --shapes tinyllama-1.1b,llama2-7b --backend $b --anchor $A \
    --out $O/train_$b.json --plot $O/train_$b.png 2>&1 | grep -v Warn | tee $O/train_$b.log | tail -5 | cut -c1-250
done
python3 -c "
import json
for b in ('auto', 'xla'):
    for r in json.load(open('$O/train_' + b + '.json'))['rows']: print(b, r['shape'], [round(v, 3) for v in r.get('losses', [])])"
