#!/usr/bin/env bash
# GPU session 2026-12-01, last call: quantize throughput with the counting encoder, the
# quantize GPU tests, the kernel table with bitsandbytes, the rest of the GPU tests.
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
O=${OUT:-/tmp/out}; mkdir -p $O
timeout 110 python3 experiments/bench_quantize.py --backend both --reps 20 --save --out $O 2>&1 | grep -v Warn | tee $O/bench_quantize.log | tail -16
timeout 150 python3 -m pytest -q -m gpu -n 4 tests/test_quantize_pallas.py tests/test_byte_lut.py tests/test_quantize_gpu.py 2>&1 | tail -4 | tee $O/gpu_tests_quantize.log
timeout 170 python3 experiments/bench_kernels.py --quick --check --bnb-path .whl/bnb --out $O/bench_kernels_quick.json 2>&1 | grep -v Warn > $O/bench_kernels.log; sed -n '/summary/,$p' $O/bench_kernels.log
timeout 150 python3 -m pytest -q -m gpu -n 4 tests/ --ignore tests/test_quantize_pallas.py --ignore tests/test_byte_lut.py --ignore tests/test_quantize_gpu.py 2>&1 | tail -6 | tee $O/gpu_tests_rest.log
