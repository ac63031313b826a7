#!/usr/bin/env bash
# GPU session 2026-12-01 (second session), last call: the kernel table with bitsandbytes in the
# same run (the new decode entry for M = 1), a sweep of its neighbours, the quantize table, the
# dispatch GPU tests.
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
O=${OUT:-/tmp/out}; mkdir -p $O
timeout 220 python3 experiments/bench_kernels.py --quick --check --bnb-path .whl/bnb --out $O/bench_kernels_quick.json 2>&1 | grep -v Warn > $O/bench_kernels.log; sed -n '/summary/,$p' $O/bench_kernels.log | head -40
timeout 150 python3 experiments/bench_kernels.py --sweep --sweep-ops decode --kn 4096 11008 --kn 4096 4096 --m 1 --out $O/bench_kernels_sweep_decode2.json 2>&1 | grep -v Warn > $O/sweep_decode2.log; grep -E "BEST| prmt:" $O/sweep_decode2.log | head -24
timeout 130 python3 experiments/bench_quantize.py --backend both --timing loop --reps 50 --save --out $O 2>&1 | grep -v Warn | tee $O/bench_quantize.log | tail -22
timeout 80 python3 -m pytest -q -m gpu -n 4 tests/test_ops.py tests/test_pallas_kernels.py 2>&1 | tail -3 | tee $O/gpu_tests_ops.log
