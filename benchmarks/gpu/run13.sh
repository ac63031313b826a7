#!/usr/bin/env bash
# GPU session 2026-12-02, last call: every GPU-marked test compiled; the quantize table with the
# stage breakdown (default encoder "f16x2" for bf16 NF4/Int4) and the torch copy reference in
# the same call; the NF4+DQ call's kernels under ncu.
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
O=${OUT:-/tmp/out}; mkdir -p $O
timeout 240 python3 -m pytest -q -m gpu -n 4 tests/ 2>&1 | tail -4 | tee $O/gpu_tests.log
timeout 40 python3 benchmarks/copy_ref.py 2>&1 | tail -3 | tee $O/copy_ref.log
for i in 1 2; do
timeout 150 python3 experiments/bench_quantize.py --backend both --timing loop --reps 50 --breakdown --save --out $O/run$i 2>&1 | grep -v Warn > $O/bench_quantize_run$i.log; grep -E "pallas|copy" $O/bench_quantize_run$i.log | tail -22
done
timeout 40 python3 benchmarks/copy_ref.py 2>&1 | tail -3 | tee -a $O/copy_ref.log
command -v ncu >/dev/null && timeout 120 ncu --clock-control none --metrics gpu__time_duration.sum python3 benchmarks/ncu_probe.py --pipeline 2>&1 | grep -E "^  [a-z_]+ \(|gpu__time_duration" | tail -12 | tee $O/ncu_pipeline.log
