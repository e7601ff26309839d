# Sourced by build.sh and variant.sh: compile_one SRC OBJ [EXTRA NVCC FLAGS...] compiles one kernel file the way the
# package's CMake does (cmake/cuda.cmake: -O3 --use_fast_math -lineinfo): *_sm90a.cu only for sm_90a, the rest for
# sm_90a + sm_80 with ATTNSEL_HAVE_SM90A defined. ptxas' resource report goes to OBJ.log.
compile_one() {
  local src=$1 obj=$2 arch
  shift 2
  case "$src" in
    *_sm90a.cu) arch="-gencode=arch=compute_90a,code=sm_90a" ;;
    *) arch="-gencode=arch=compute_90a,code=sm_90a -gencode=arch=compute_80,code=sm_80 -DATTNSEL_HAVE_SM90A" ;;
  esac
  # shellcheck disable=SC2086  # arch is a list of flags
  nvcc -std=c++17 -O3 --use_fast_math -lineinfo -Xcompiler -fPIC $arch --resource-usage "$@" -c "$src" -o "$obj" \
    > "$obj.log" 2>&1
}
