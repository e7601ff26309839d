#!/bin/sh
# Builds the standalone harness with the same per-file ISA flags as the extension's CMake rules.
# Usage: ./build.sh [extra flags, e.g. -fsanitize=address,undefined -g]
set -e
here=$(cd "$(dirname "$0")" && pwd)
src="$here/../../csrc/kernels/cpu"
out="$here/build"
mkdir -p "$out"
CXX=${CXX:-g++}
objs=""
for f in "$src"/*.cpp "$here/emu_isa.cpp"; do
  case "$f" in
    *_avx2.cpp) fl="-mavx2 -mfma -mf16c" ;;
    *_avx512.cpp) fl="-mavx512f -mavx512bw -mavx512vl -mavx512dq -mfma -mf16c" ;;
    *_avx512bf16.cpp) fl="-mavx512f -mavx512bw -mavx512vl -mavx512dq -mfma -mf16c -mavx512bf16" ;;
    *emu_isa.cpp) fl="-O1" ;;  # test emulation: heavy to compile at -O3 (especially with sanitizers)
    *) fl="" ;;
  esac
  o="$out/$(basename "$f" .cpp).o"
  $CXX -std=c++17 -O3 -Wall -Wextra -fPIC $fl "$@" -c "$f" -o "$o" &
  objs="$objs $o"
done
wait
$CXX -std=c++17 -O2 -Wall "$@" "$here/harness.cpp" $objs -o "$out/harness" -pthread
echo "built $out/harness"
