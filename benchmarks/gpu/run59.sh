#!/usr/bin/env bash
# GPU session 2026-12-04 (third), call 7: the dequantize kernel decoding double-quantized scales
# itself: its tests compiled (bit for bit against the library), dequant_first's decode by parts,
# then the kernel table at M = 2048-8192 again, bitsandbytes beside it.
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
O=${OUT:-/tmp/out}; mkdir -p $O
nvidia-smi --query-gpu=name,clocks.max.sm,memory.total --format=csv | tee $O/gpu.txt
timeout 150 python3 -m pytest -q -n 4 tests/test_quantize_pallas.py tests/test_pallas_kernels.py \
  -k "decodes_double_quant or public_api or dequant_first or gpu_kernels_match or double_quantize_1m" 2>&1 | tail -3 | tee $O/gpu_tests.log
timeout 100 python3 benchmarks/gpu/dequant_probe.py --out $O 2>&1 | grep -v Warn | tee $O/dequant_probe.log
timeout 300 python3 experiments/bench_kernels.py --quick --check --m 2048 4096 8192 --kn 4096 4096 --kn 4096 11008 \
  --kn 11008 4096 --kn 8192 8192 --bnb-path .whl/bnb --out $O/table.json 2>&1 | grep -v Warn | tee $O/table.log \
  | grep -E -A16 "summary|bitsandbytes" | cut -c1-330
