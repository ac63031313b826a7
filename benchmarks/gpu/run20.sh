#!/usr/bin/env bash
# GPU session 2026-12-02c, call 4: the pair dot now takes the packed weight as int32 words (one
# asm call a word, no byte unpacking of the double-buffered tiles): GPU tests of byte_lut and
# the decode cases, the decode sweep at M = 1, 4, 16, then the kernel table with the sweep's
# best configs and bitsandbytes in the same run.
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
O=${OUT:-/tmp/out}; mkdir -p $O
timeout 120 python3 -m pytest -q -m gpu -n 4 tests/test_byte_lut.py tests/test_pallas_kernels.py -k "decode or pair or ptx" 2>&1 | tail -4 | tee $O/gpu_tests.log
timeout 270 python3 experiments/bench_kernels.py --sweep --sweep-ops decode --m 1 4 16 --out $O/sweep_decode.json 2>&1 | grep -v Warn | tee $O/sweep_decode.log | grep -E "BEST|device|Error|error"
timeout 190 python3 experiments/bench_kernels.py --quick --check --configs-from $O/sweep_decode.json --bnb-path .whl/bnb --out $O/table.json 2>&1 | grep -v Warn | tee $O/table.log | tail -10
