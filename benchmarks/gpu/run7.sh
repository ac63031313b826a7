#!/usr/bin/env bash
# GPU session 2026-12-01 (second session), call 3: quantize table with the unrolled timing
# (xla and pallas, stage breakdown), then the loop timing once more, and the torch copy reference.
# (As run. The "unrolled" timing mode timed out compiling and was then removed from
# bench_quantize.py, so its second command no longer runs as written.)
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
O=${OUT:-/tmp/out}; mkdir -p $O
timeout 150 python3 benchmarks/copy_ref.py 2>&1 | tail -3 | tee $O/copy_ref.log
timeout 300 python3 experiments/bench_quantize.py --backend both --breakdown --timing unrolled --save --out $O 2>&1 | grep -v Warn | tee $O/bench_quantize_unrolled.log | tail -30
mv $O/bench_quantize_gpu_2026-12-01.json $O/bench_quantize_unrolled.json 2>/dev/null
timeout 100 python3 experiments/bench_quantize.py --backend pallas --timing loop --reps 50 2>&1 | grep -v Warn | tee $O/bench_quantize_loop.log | tail -14
