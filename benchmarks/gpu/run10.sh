#!/usr/bin/env bash
# GPU session 2026-12-02, second call: the bare NF4 quantize kernel over encoder x tile x warps
# x pipelining (the "f16x2" encoder was slower than "count" at the old default tile).
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
O=${OUT:-/tmp/out}; mkdir -p $O
timeout 400 python3 experiments/bench_quantize.py --backend pallas --timing loop --reps 20 --sweep-quantize --out $O --save 2>&1 | grep -v Warn > $O/sweep_quantize.log; grep -E "ms|copy" $O/sweep_quantize.log | grep -v "^op\|dq\|stages" | head -40
