#!/usr/bin/env bash
# GPU session 2026-12-02, first call: the "f16x2" quantize encoder compiled (GPU tests of the
# quantize kernels, both encoders), the quantize table with the stage breakdown (each encoder's
# first level), the torch copy reference, the ncu per-kernel times of the NF4+DQ call.
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
O=${OUT:-/tmp/out}; mkdir -p $O
timeout 200 python3 -m pytest -q -m gpu -n 4 tests/test_quantize_pallas.py 2>&1 | tail -15 | tee $O/gpu_tests_quantize.log
timeout 150 python3 experiments/bench_quantize.py --backend both --timing loop --reps 50 --breakdown --save --out $O 2>&1 | grep -v Warn | tee $O/bench_quantize.log | tail -32
timeout 40 python3 benchmarks/copy_ref.py 2>&1 | tail -3 | tee $O/copy_ref.log
command -v ncu >/dev/null && timeout 120 ncu --clock-control none --metrics gpu__time_duration.sum python3 benchmarks/ncu_probe.py --pipeline 2>&1 | grep -E "^  [a-z_]+ \(|gpu__time_duration" | tail -24 | tee $O/ncu_pipeline.log
