#!/bin/bash
# Builds the torch-free dev library from the repository root of this checkout, the way the lead's CMake
# does (cmake/cuda.cmake: -O3 --use_fast_math -lineinfo): *_sm90a.cu only for sm_90a, the rest for sm_90a + sm_80,
# ATTNSEL_HAVE_SM90A defined.
set -e
cd "$(dirname "$0")/../.."
OUTDIR=${1:-tools/cuda_dev/build}
mkdir -p "$OUTDIR"
pids=()
for f in csrc/kernels/cuda/*.cu tools/cuda_dev/capi.cu; do
  o="$OUTDIR/$(basename "$f" .cu).o"
  case "$f" in
    *_sm90a.cu) arch="-gencode=arch=compute_90a,code=sm_90a" ;;
    *) arch="-gencode=arch=compute_90a,code=sm_90a -gencode=arch=compute_80,code=sm_80 -DATTNSEL_HAVE_SM90A" ;;
  esac
  nvcc -std=c++17 -O3 --use_fast_math -lineinfo -Xcompiler -fPIC $arch --resource-usage -c "$f" -o "$o" > "$o.log" 2>&1 &
  pids+=($!)
done
fail=0
for p in "${pids[@]}"; do wait "$p" || fail=1; done
if [ $fail = 1 ]; then grep -l -i error "$OUTDIR"/*.log | xargs cat; exit 1; fi
nvcc -shared -Xcompiler -fPIC -o "$OUTDIR/libattnsel_dev.so" "$OUTDIR"/*.o
echo "built $OUTDIR/libattnsel_dev.so"
