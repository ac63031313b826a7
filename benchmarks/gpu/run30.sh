#!/usr/bin/env bash
# GPU session 2026-12-03 (third), call 1: first compiled run of the Mosaic GPU forward kernel
# (pallas_kernels.nf4_matmul_mgpu): correctness at two shapes, then a few configs beside XLA bf16
# and the table's dequant_first path at M=4096.
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
O=${OUT:-/tmp/out}; mkdir -p $O
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
timeout 420 python3 benchmarks/gpu/mgpu_probe.py --out $O/mgpu_probe.json \
  --configs 128,128,64,4,8,prmt32 128,128,64,4,8,prmt 128,64,64,4,8,prmt 64,128,64,4,8,prmt \
            128,128,64,3,8,prmt 128,128,64,4,16,prmt 2>&1 | grep -v -i warn | tee $O/mgpu_probe.log | cut -c1-400
