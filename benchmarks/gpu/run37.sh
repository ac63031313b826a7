#!/usr/bin/env bash
# GPU session 2026-12-03 (third), call 8: the register-operand Mosaic GPU kernel with its wgmma
# left in flight over the next step's decode again (mma_overlap), now with the last operand kept
# alive through the loop carry and an empty inline-PTX use after the wait; the Mosaic GPU tests.
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
O=${OUT:-/tmp/out}; mkdir -p $O
timeout 100 python3 -m pytest -q -m gpu -n 4 tests/test_pallas_kernels.py -k "mgpu" 2>&1 | tail -3 | tee $O/gpu_tests.log
timeout 300 python3 benchmarks/gpu/mgpu_probe.py --out $O/mgpu_probe.json --check-configs 3 \
  --check 256,512,256 4096,4096,4096 --cases 4096,4096,11008 4096,4096,4096 2048,4096,11008 4096,11008,4096 \
  --configs 256,64,64,4,8,prmt,o 256,64,64,4,8,prmt32,o 256,64,64,4,8,prmt 256,64,64,5,8,prmt,o \
  2>&1 | grep -v -i warn | tee $O/mgpu_probe.log | cut -c1-300
