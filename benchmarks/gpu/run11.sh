#!/usr/bin/env bash
# GPU session 2026-12-02, third call: Nsight Compute on the first-level quantize kernel, the
# "count" and "f16x2" encoders at their best tiles (both stop near 70 us).
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
O=${OUT:-/tmp/out}; mkdir -p $O
timeout 300 ncu --clock-control none --section SpeedOfLight --section Occupancy --section LaunchStats \
  --section WarpStateStats --section SchedulerStats --section MemoryWorkloadAnalysis -k regex:quantize_blocks \
  --launch-skip 1 --launch-count 1 python3 benchmarks/ncu_probe.py --quantize-configs count:128:8 > $O/ncu_count.txt 2>&1
for c in f16x2:128:8 f16x2:64:8; do
timeout 200 ncu --clock-control none --section SpeedOfLight --section Occupancy --section LaunchStats \
  --section WarpStateStats --section SchedulerStats --section MemoryWorkloadAnalysis -k regex:quantize_blocks \
  --launch-skip 1 --launch-count 1 python3 benchmarks/ncu_probe.py --quantize-configs $c > $O/ncu_${c//:/_}.txt 2>&1
done
for f in $O/ncu_*.txt; do echo "== $f"; grep -E "Duration|Memory Throughput|DRAM Throughput|Compute \(SM\) Throughput|Registers Per|Achieved Occupancy|Theoretical Occupancy|Issue Slots Busy|No Eligible|Warp Cycles Per Issued|L1/TEX Hit|L2 Hit|Mem Busy|Max Bandwidth" $f | head -20; grep -E "^    (----|[A-Z][a-z]+ ).*(stall|Stall)" $f | head -5; done
