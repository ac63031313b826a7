#!/usr/bin/env bash
# GPU session 2026-12-03 (third), call 3: the Mosaic GPU forward kernel with deeper pipelines
# (the shared tile's one-step delayed release had left 3 stages one step of prefetch), the
# epilogue in 64x64 tiles to make room.
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
O=${OUT:-/tmp/out}; mkdir -p $O
timeout 520 python3 benchmarks/gpu/mgpu_probe.py --out $O/mgpu_probe.json --check-configs 3 \
  --check 256,512,256 4096,4096,4096 --cases 4096,4096,11008 4096,4096,4096 2048,4096,11008 \
  --configs 128,128,64,4,16,prmt,s 128,128,64,5,16,prmt 128,128,64,4,16,prmt32,s 128,128,64,4,8,prmt,s \
            128,128,64,6,16,prmt 128,128,64,3,16,prmt,s 2>&1 | grep -v -i warn | tee $O/mgpu_probe.log | cut -c1-400
