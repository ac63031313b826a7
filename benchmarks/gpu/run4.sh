#!/usr/bin/env bash
# GPU session 2026-12-01 (second session), call 1: the NF4+DQ quantize stage by stage (gather vs
# select-tree second level), a per-kernel ncu breakdown of the whole quantize call, the GPU tests
# of the quantize and decode kernels, then the decode tile sweep with the word-pair path.
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
O=${OUT:-/tmp/out}; mkdir -p $O
python3 -c "import jax, jaxlib; print(jax.__version__, jax.devices())" 2>&1 | tail -1
timeout 120 python3 experiments/bench_quantize.py --backend pallas --breakdown --reps 20 --save --out $O 2>&1 | grep -v Warn | tee $O/bench_quantize_breakdown.log | tail -16
timeout 60 ncu --clock-control none --metrics gpu__time_duration.sum python3 benchmarks/ncu_probe.py --pipeline 2>&1 | grep -v Warn > $O/ncu_pipeline.log; grep -E "^  [a-zA-Z_].*\(|gpu__time_duration" $O/ncu_pipeline.log | tail -24
timeout 120 python3 -m pytest -q -m gpu -n 4 tests/test_quantize_pallas.py tests/test_pallas_kernels.py -k "dq or double or decode or dynamic" 2>&1 | tail -4 | tee $O/gpu_tests.log
