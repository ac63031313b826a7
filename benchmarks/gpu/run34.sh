#!/usr/bin/env bash
# GPU session 2026-12-03 (third), call 5: the register-operand Mosaic GPU forward kernel with its
# wgmma left in flight across the next step's decode (mma_overlap), stages 4-5, walk bands 8-16.
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
O=${OUT:-/tmp/out}; mkdir -p $O
timeout 540 python3 benchmarks/gpu/mgpu_probe.py --out $O/mgpu_probe.json --check-configs 2 \
  --check 256,512,256 4096,4096,4096 --cases 4096,4096,11008 4096,4096,4096 2048,4096,11008 4096,11008,4096 \
  --configs 256,64,64,4,8,prmt,ro 256,64,64,5,8,prmt,ro 256,64,64,4,8,prmt,r 256,64,64,5,8,prmt,r \
            256,64,64,4,16,prmt,ro 256,64,64,4,8,prmt32,ro 2>&1 | grep -v -i warn | tee $O/mgpu_probe.log | cut -c1-400
