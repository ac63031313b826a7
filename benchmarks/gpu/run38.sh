#!/usr/bin/env bash
# GPU session 2026-12-04, call 1: every GPU test (the review mends of cbad412 and the Mosaic GPU
# kernel's clusters, cluster_n=2: a pair of CTAs along N loading their shared rows of x once by
# TMA multicast), then the probe: clusters and 128-wide K steps against the table's row.
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
O=${OUT:-/tmp/out}; mkdir -p $O
timeout 200 python3 -m pytest -q -m gpu -n 4 tests/ 2>&1 | tail -8 | tee $O/gpu_tests.log
timeout 370 python3 benchmarks/gpu/mgpu_probe.py --out $O/mgpu_probe.json --check-configs 2 \
  --check 256,512,256 4096,4096,4096 \
  --cases 2048,4096,11008 2048,4096,4096 2048,11008,4096 4096,4096,11008 4096,4096,4096 4096,11008,4096 \
  --configs "" "cluster_n=2" "block_k=128,num_stages=2" "block_k=128,num_stages=2,cluster_n=2" \
    "num_stages=3,cluster_n=2" "group_m=16,cluster_n=2" \
  2>&1 | grep -v -i warn | tee $O/mgpu_probe.log | cut -c1-300
