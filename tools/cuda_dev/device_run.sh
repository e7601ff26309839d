#!/bin/bash
# One device call: (optionally rebuild), correctness sweep, benchmark. Run from .devcuda/.
# Usage: device_run.sh "<sweep args>" "<bench args>"
set -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv | tee "$OUT/gpu.txt"
if [ -n "$REBUILD" ]; then tools/cuda_dev/build.sh 2>&1 | tail -3; fi
if [ "$1" != "skip" ]; then
  (cd tools/cuda_dev && python3 sweep.py --out "$OUT/sweep.json" $1) 2>&1 | tee "$OUT/sweep.log" | grep -v "^FAIL" | tail -30
  grep -c "^FAIL" "$OUT/sweep.log"; grep "^FAIL" "$OUT/sweep.log" | head -5
fi
if [ "$2" != "skip" ]; then
  python3 benchmarks/bench_cuda_attention.py --impl dev $2 2>&1 | tee "$OUT/bench.log" | tail -60
fi
