#!/usr/bin/env bash
# GPU session 2026-12-03 (third), call 2: the Mosaic GPU forward kernel with the two computing
# warpgroups sharing one weight tile (swap_ab: each decodes half of it, a barrier a step, three
# tile slots, one wgmma in flight) against the run30 best (each its own tile).
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
O=${OUT:-/tmp/out}; mkdir -p $O
timeout 500 python3 benchmarks/gpu/mgpu_probe.py --out $O/mgpu_probe.json --check-configs 3 \
  --check 256,512,256 4096,4096,4096 --cases 4096,4096,11008 4096,4096,4096 2048,4096,11008 \
  --configs 128,128,64,3,8,prmt,s 128,128,64,3,8,prmt32,s 128,128,64,4,16,prmt 128,128,64,3,16,prmt,s \
            128,128,64,2,8,prmt,s 2>&1 | grep -v -i warn | tee $O/mgpu_probe.log | cut -c1-400
