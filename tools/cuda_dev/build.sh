#!/bin/bash
# Builds the torch-free dev library from the repository root of this checkout: every kernel file and capi.cu,
# compiled in parallel as the package's CMake compiles them (compile.sh), linked into OUTDIR/libattnsel_dev.so.
set -e
cd "$(dirname "$0")/../.."
source tools/cuda_dev/compile.sh
OUTDIR=${1:-tools/cuda_dev/build}
mkdir -p "$OUTDIR"
pids=()
for f in csrc/kernels/cuda/*.cu tools/cuda_dev/capi.cu; do
  compile_one "$f" "$OUTDIR/$(basename "$f" .cu).o" &
  pids+=($!)
done
fail=0
for p in "${pids[@]}"; do wait "$p" || fail=1; done
if [ $fail = 1 ]; then grep -l -i error "$OUTDIR"/*.log | xargs cat; exit 1; fi
nvcc -shared -Xcompiler -fPIC -o "$OUTDIR/libattnsel_dev.so" "$OUTDIR"/*.o
echo "built $OUTDIR/libattnsel_dev.so"
