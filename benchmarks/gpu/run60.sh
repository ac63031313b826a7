#!/usr/bin/env bash
# GPU session 2026-12-04 (third), call 8: the kernel table at M = 2048-8192 twice more, once with
# XLA's default GEMMs (its Triton GEMM emitter or cuBLAS, autotuned per compile) and once with
# --xla_gpu_enable_triton_gemm=false, so that every XLA dot (the bf16 baseline and dequant_first's
# second half alike) is a cuBLAS call: how much of the run-to-run spread is XLA's GEMM choice.
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
O=${OUT:-/tmp/out}; mkdir -p $O
nvidia-smi --query-gpu=name,clocks.max.sm,memory.total --format=csv | tee $O/gpu.txt
for mode in default cublas; do
  if [ $mode = cublas ]; then export XLA_FLAGS=--xla_gpu_enable_triton_gemm=false; fi
  timeout 260 python3 experiments/bench_kernels.py --quick --check --m 2048 4096 8192 --kn 4096 4096 --kn 4096 11008 \
    --kn 11008 4096 --kn 8192 8192 --bnb-path .whl/bnb --out $O/table_$mode.json 2>&1 | grep -v Warn | tee $O/table_$mode.log \
    | grep -E -A16 "summary|bitsandbytes" | cut -c1-330
done
