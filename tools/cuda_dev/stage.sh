#!/bin/bash
# Copies this worktree's CUDA dev files into /work/main/.devcuda (the device call carries that folder).
set -e
SRC=$(cd "$(dirname "$0")/../.." && pwd)
DST=/work/main/.devcuda
rm -rf "$DST"
mkdir -p "$DST/tools"
cp -r "$SRC/csrc" "$SRC/benchmarks" "$DST/"
cp -r "$SRC/tools/cuda_dev" "$DST/tools/"
[ -d "$SRC/tests" ] && cp -r "$SRC/tests" "$DST/"
find "$DST" \( -name '*.o' -o -name '*.log' -o -name '__pycache__' \) -prune -exec rm -rf {} +
du -sh "$DST"
