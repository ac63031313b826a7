#!/usr/bin/env bash
# GPU session 2026-12-03 (second), call 2: the decode kernel with x in byte planes (x_planes).
# GPU tests of the decode cases (x_planes ones included); decode sweep round 9 (M=1 on three
# shapes, the dot rows at M=4 and 16); Nsight Compute on the table's row against two x_planes
# configs at M=1 K=4096 N=11008, and the per-kernel times of one x_planes call.
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
O=${OUT:-/tmp/out}; mkdir -p $O
timeout 120 python3 -m pytest -q -m gpu -n 4 tests/test_pallas_kernels.py -k "decode" 2>&1 | tail -3 | tee $O/gpu_tests.log
timeout 260 python3 experiments/bench_kernels.py --sweep --sweep-ops decode --out $O/sweep_decode.json 2>&1 \
  | grep -v Warn | tee $O/sweep_decode.log | grep -E "BEST|rror|decode" | cut -c1-200
S="--section SpeedOfLight --section Occupancy --section WarpStateStats --section SchedulerStats --section MemoryWorkloadAnalysis"
timeout 120 ncu --clock-control none $S -k regex:nf4_decode python3 benchmarks/ncu_probe.py --decode-configs table \
  x_planes=1,block_n=16,block_k=1024,split_k=1,num_warps=4 x_planes=1,block_n=8,block_k=1024,split_k=1,num_warps=2 \
  2>&1 | grep -v Warn > $O/ncu_decode.txt
grep -E "ran decode|  nf4_decode|Duration|DRAM Throughput|L1/TEX Cache|Registers Per|Achieved Occ|Issued Warp|No Eligible" $O/ncu_decode.txt | head -60
timeout 60 ncu --clock-control none --metrics gpu__time_duration.sum python3 benchmarks/ncu_probe.py --decode-configs \
  x_planes=1,block_n=16,block_k=1024,split_k=1,num_warps=4 2>&1 | grep -E "^  [A-Za-z_0-9.]+|gpu__time_duration" | tail -6
