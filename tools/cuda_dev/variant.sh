#!/bin/bash
# One kernel file rebuilt with extra nvcc flags and linked against a finished dev build's other objects, so a
# compile-time experiment costs one file's compile (~45 s) instead of a whole build:
#   bash tools/cuda_dev/build.sh /tmp/base            # the reference (e.g. main's tree)
#   bash tools/cuda_dev/variant.sh /tmp/base /tmp/v_s "-DATTNSEL_SERIAL=1" [flash_fwd_wg64_sm90a]
#   python tools/cuda_dev/ab.py --libs main=/tmp/base/libattnsel_dev.so,s=/tmp/v_s/libattnsel_dev.so ...
# The file is taken from this checkout; prints the file's ptxas serialisation notes (C7515) and spill sizes.
set -e
[ $# -ge 3 ] || { echo "usage: variant.sh BASEDIR OUTDIR \"NVCC FLAGS\" [FILE (no .cu)]" >&2; exit 2; }
BASE=$1 OUT=$2 FLAGS=$3 FILE=${4:-flash_fwd_wg64_sm90a}
cd "$(dirname "$0")/../.."
[ -f "csrc/kernels/cuda/$FILE.cu" ] || { echo "variant.sh: no csrc/kernels/cuda/$FILE.cu" >&2; exit 2; }
[ -f "$BASE/$FILE.o" ] || { echo "variant.sh: $BASE has no $FILE.o (run build.sh there first)" >&2; exit 2; }
mkdir -p "$OUT"
source tools/cuda_dev/compile.sh
# shellcheck disable=SC2086  # FLAGS is a list of flags
compile_one "csrc/kernels/cuda/$FILE.cu" "$OUT/$FILE.o" $FLAGS || { grep -i error "$OUT/$FILE.o.log"; exit 1; }
echo "$FILE $FLAGS: C7515 notes $(grep -c C7515 "$OUT/$FILE.o.log" || true); spills:" \
  "$(grep -o '[0-9]* bytes spill stores' "$OUT/$FILE.o.log" | sort | uniq -c | tr -s ' \n' ' ')"
objs=()
for o in "$BASE"/*.o; do [ "$(basename "$o")" = "$FILE.o" ] || objs+=("$o"); done
nvcc -shared -Xcompiler -fPIC -o "$OUT/libattnsel_dev.so" "${objs[@]}" "$OUT/$FILE.o"
echo "built $OUT/libattnsel_dev.so"
