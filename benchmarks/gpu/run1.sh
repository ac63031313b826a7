#!/usr/bin/env bash
# GPU session 2026-12-01, call 1: prmt LUT correctness, kernel tile sweep, quantize sweep, ncu.
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
O=${OUT:-/tmp/out}; mkdir -p $O
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,memory.used --format=csv
python3 -c "import jax, jaxlib, triton; print('jax', jax.__version__, 'triton', triton.__version__, jax.devices())"
timeout 90 python3 -m pytest -q -m gpu tests/test_byte_lut.py -x 2>&1 | tail -5 | tee $O/lut_tests.log
timeout 300 python3 experiments/bench_kernels.py --sweep --out $O/sweep.json 2>&1 | grep -v Warning | tee $O/sweep.log
timeout 120 python3 experiments/bench_quantize.py --backend pallas --sweep --reps 30 2>&1 | tee $O/qsweep.log | tail -45
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
echo "ncu: $NCU"
timeout 150 $NCU --clock-control none --section SpeedOfLight --section Occupancy --section LaunchStats \
  --section SchedulerStats --section WarpStateStats -k regex:'quantize|nf4_' \
  python3 benchmarks/ncu_probe.py > $O/ncu.txt 2>&1; echo "ncu rc $?"
grep -E "^  [a-z_]+.*\(|Duration|Memory Throughput|Compute \(SM\) Throughput|Achieved Occupancy|Registers Per|Issue Slots Busy|No Eligible|Theoretical Occ|Block Size|Grid Size" $O/ncu.txt | head -120
