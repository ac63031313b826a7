#!/usr/bin/env bash
# GPU session 2026-12-03 (second), call 1: where the decode kernel's time goes. Nsight Compute
# on the decode kernel at M=1, K=4096 N=11008 (the table's config and split-K variants), and the
# per-kernel times of one whole decode call (the kernel and XLA's split-K sum).
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
O=${OUT:-/tmp/out}; mkdir -p $O
nvidia-smi --query-gpu=name,clocks.max.sm,clocks.max.mem --format=csv | tee $O/device.txt
S="--section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats --section SchedulerStats --section MemoryWorkloadAnalysis"
timeout 240 ncu --clock-control none $S -k regex:nf4_decode python3 benchmarks/ncu_probe.py --decode-configs \
  table split_k=1 block_n=16,split_k=1 block_n=8,split_k=1,num_warps=1 2>&1 | grep -v Warn > $O/ncu_decode.txt
grep -E "ran decode|Duration|DRAM Throughput|Registers Per|Achieved Occ|Grid Size|Block Size|Issued Warp|No Eligible|L1/TEX Hit|L2 Hit|Mem Busy|Max Bandwidth|Theoretical Occ|Stall" $O/ncu_decode.txt | head -120
timeout 120 ncu --clock-control none --metrics gpu__time_duration.sum python3 benchmarks/ncu_probe.py --decode-configs table 2>&1 \
  | grep -E "^  [A-Za-z_0-9.]+|gpu__time_duration|ran decode" | tail -12 | tee $O/ncu_decode_call.txt
