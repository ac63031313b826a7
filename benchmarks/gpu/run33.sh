#!/usr/bin/env bash
# GPU session 2026-12-03 (third), call 4: the Mosaic GPU forward kernel with the decoded tile as
# wgmma's register operand (swap_ab: y^T = deq(W) x^T, 4-bit relayout to the WGMMA layout, the
# epilogue stored through a transposed smem view) against the shared-smem-tile design.
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
O=${OUT:-/tmp/out}; mkdir -p $O
timeout 520 python3 benchmarks/gpu/mgpu_probe.py --out $O/mgpu_probe.json --check-configs 5 \
  --check 256,512,256 4096,4096,4096 --cases 4096,4096,11008 4096,4096,4096 2048,4096,11008 \
  --configs 256,64,64,5,16,prmt,r 128,128,64,5,16,prmt,r 256,64,64,5,16,prmt32,r 256,64,64,4,16,prmt,r \
            128,128,64,4,16,prmt 256,64,64,5,8,prmt,r 2>&1 | grep -v -i warn | tee $O/mgpu_probe.log | cut -c1-400
