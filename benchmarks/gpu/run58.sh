#!/usr/bin/env bash
# GPU session 2026-12-04 (third), call 6: dequant_first's decode by parts (the scales' decode in
# XLA, the dequantize kernel over its launch knobs, the [K, N] decoder, a copy of the same bytes).
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
O=${OUT:-/tmp/out}; mkdir -p $O
nvidia-smi --query-gpu=name,clocks.max.sm,memory.total --format=csv | tee $O/gpu.txt
timeout 400 python3 benchmarks/gpu/dequant_probe.py --out $O 2>&1 | grep -v Warn | tee $O/dequant_probe.log
