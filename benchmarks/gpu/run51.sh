#!/usr/bin/env bash
# GPU session 2026-12-04 (second), call 8: Nsight Compute on the decode kernel's M=1 table row
# (x_direct) at K=4096 N=11008: speed of light, occupancy, scheduler and warp-state (stall)
# statistics, for the next step on the 0.40x target.
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
O=${OUT:-/tmp/out}; mkdir -p $O
S="--section SpeedOfLight --section Occupancy --section WarpStateStats --section SchedulerStats --section MemoryWorkloadAnalysis --section LaunchStats"
timeout 150 ncu --clock-control none $S -k regex:nf4_decode python3 benchmarks/ncu_probe.py --decode-configs table \
  2>&1 | grep -v Warn > $O/ncu_decode.txt
grep -E "ran decode|  nf4_decode|Duration|DRAM Throughput|L1/TEX Cache|L2 Cache Th|Registers Per|Achieved Occ|Theoretical Occ|Issued Warp|No Eligible|Active Warps|Eligible Warps|Stall|SM Frequency|Block Limit|Waves" $O/ncu_decode.txt | head -60
