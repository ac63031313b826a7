#!/usr/bin/env bash
# GPU session 2026-12-04 (third), call 1: decode sweep round 13 (x_direct with row_blocks: a
# program taking several row blocks in turn, its loads ahead running on across them) at the four
# shapes, then the decode GPU tests (the row_blocks cases compiled for real). The row_blocks code
# was not kept: apply run53_row_blocks.patch (against 4a2ad6e) to run this again.
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
O=${OUT:-/tmp/out}; mkdir -p $O
nvidia-smi --query-gpu=name,clocks.max.sm,memory.total --format=csv | tee $O/gpu.txt
timeout 100 python3 -m pytest -q -m gpu -n 4 tests/test_pallas_kernels.py -k "decode" 2>&1 | tail -3 | tee $O/gpu_tests.log
timeout 420 python3 experiments/bench_kernels.py --sweep --sweep-ops decode --m 1 --kn 4096 4096 --kn 4096 11008 \
  --kn 11008 4096 --kn 8192 8192 --out $O/sweep_decode.json 2>&1 \
  | grep -v Warn | tee $O/sweep_decode.log | grep -E "x_direct|x_planes|BEST|rror" | cut -c1-190
