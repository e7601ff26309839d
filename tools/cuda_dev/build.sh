#!/bin/bash
# Builds the torch-free dev library (sm_90a + sm_80) from the repository root of this checkout.
set -e
cd "$(dirname "$0")/../.."
OUTDIR=${1:-tools/cuda_dev/build}
mkdir -p "$OUTDIR"
pids=()
for f in csrc/kernels/cuda/*.cu tools/cuda_dev/capi.cu; do
  o="$OUTDIR/$(basename "$f" .cu).o"
  nvcc -std=c++17 -O3 -Xcompiler -fPIC -gencode=arch=compute_90a,code=sm_90a -gencode=arch=compute_80,code=sm_80 \
    --resource-usage -c "$f" -o "$o" > "$o.log" 2>&1 &
  pids+=($!)
done
for p in "${pids[@]}"; do wait "$p"; done
nvcc -shared -Xcompiler -fPIC -o "$OUTDIR/libattnsel_dev.so" "$OUTDIR"/*.o
echo "built $OUTDIR/libattnsel_dev.so"
