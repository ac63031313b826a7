#!/usr/bin/env bash
# GPU session 2026-12-04, call 2: the Mosaic GPU tests again (test_ops' Mosaic case now clears
# jit caches first), then the probe around run38's best (128-wide K steps, 2 stages, clusters of
# 2 along N) at M = 1024-8192 and K = N = 8192.
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
O=${OUT:-/tmp/out}; mkdir -p $O
timeout 150 python3 -m pytest -q -m gpu -n 4 tests/ -k "mgpu or mosaic" 2>&1 | tail -3 | tee $O/gpu_tests.log
B=block_k=128,num_stages=2,cluster_n=2
timeout 400 python3 benchmarks/gpu/mgpu_probe.py --out $O/mgpu_probe.json --check-configs 2 \
  --check 4096,4096,4096 \
  --cases 1024,4096,11008 1024,4096,4096 1024,11008,4096 2048,4096,11008 2048,4096,4096 2048,11008,4096 \
    2048,8192,8192 4096,4096,11008 4096,4096,4096 4096,11008,4096 8192,4096,11008 \
  --configs $B $B,lut=prmt32 $B,group_m=4 $B,group_m=16 block_m=128,block_k=128,num_stages=4,cluster_n=2 \
    block_m=128,block_k=256,num_stages=2,cluster_n=2 block_k=128,num_stages=2 \
  2>&1 | grep -v -i warn | tee $O/mgpu_probe.log | cut -c1-300
