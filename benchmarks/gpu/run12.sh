#!/usr/bin/env bash
# GPU session 2026-12-02, fourth call: the "f16x2" encoder with its table word-major and the
# two thresholds of a midpoint in one word (ncu had it bound by the L1 pipe): the quantize
# kernel sweep again, then ncu on its best tile.
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
O=${OUT:-/tmp/out}; mkdir -p $O
timeout 300 python3 experiments/bench_quantize.py --backend pallas --timing loop --reps 20 --sweep-quantize --out $O --save 2>&1 | grep -v Warn > $O/sweep_quantize.log; grep -E "ms" $O/sweep_quantize.log | grep "encoder=" | head -30
for c in f16x2:128:8 f16x2:64:4; do
timeout 200 ncu --clock-control none --section SpeedOfLight --section Occupancy --section LaunchStats \
  --section WarpStateStats --section SchedulerStats --section MemoryWorkloadAnalysis -k regex:quantize_blocks \
  --launch-skip 1 --launch-count 1 python3 benchmarks/ncu_probe.py --quantize-configs $c > $O/ncu_${c//:/_}.txt 2>&1
done
for f in $O/ncu_*.txt; do echo "== $f"; grep -E "Duration|Compute \(SM\) Throughput|Mem Busy|DRAM Throughput|Achieved Occupancy|No Eligible|L1/TEX Hit" $f | head -8; done
