// Hopper warp-specialised kernel (flash_fwd_wg_sm90a.cuh): tensor maps and the choice of padded head size.
#include "flash_fwd_wg_sm90a.cuh"

namespace attnsel::cuda::detail {
namespace {

// cuTensorMapEncodeTiled through the runtime's driver entry point (no link-time dependency on libcuda).
using EncodeTiledFn = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*, const cuuint64_t*,
                                   const cuuint64_t*, const cuuint32_t*, const cuuint32_t*, CUtensorMapInterleave,
                                   CUtensorMapSwizzle, CUtensorMapL2promotion, CUtensorMapFloatOOBfill);
EncodeTiledFn encode_tiled() {
  static const EncodeTiledFn fn = [] {
    void* p = nullptr;
    cudaDriverEntryPointQueryResult q{};
#if CUDART_VERSION >= 12050
    const cudaError_t e = cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &p, 12000, cudaEnableDefault, &q);
#else
    const cudaError_t e = cudaGetDriverEntryPoint("cuTensorMapEncodeTiled", &p, cudaEnableDefault, &q);
#endif
    if (e != cudaSuccess || q != cudaDriverEntryPointSuccess)
      return static_cast<EncodeTiledFn>(nullptr);
    return reinterpret_cast<EncodeTiledFn>(p);
  }();
  return fn;
}

}  // namespace

// Rows past seq and columns past d (up to the padded head size) read as zeros (OOB fill); strides of size-1 dims
// are never stepped, so any valid value does. A box row of `cols` elements is the swizzle span (64 columns: 128 B,
// 32: 64 B, 16: 32 B).
bool make_map(CUtensorMap* m, const void* base, bool bf16, int d, int seq, int heads, int batch, std::int64_t ss,
              std::int64_t sh, std::int64_t sb, int rows, int cols) {
  const EncodeTiledFn fn = encode_tiled();
  if (fn == nullptr) return false;
  auto bytes = [](std::int64_t st, int n) -> cuuint64_t { return n > 1 ? static_cast<cuuint64_t>(st) * 2 : 16; };
  const cuuint64_t dims[4] = {static_cast<cuuint64_t>(d), static_cast<cuuint64_t>(seq),
                              static_cast<cuuint64_t>(heads), static_cast<cuuint64_t>(batch)};
  const cuuint64_t strides[3] = {bytes(ss, seq), bytes(sh, heads), bytes(sb, batch)};
  const cuuint32_t box[4] = {static_cast<cuuint32_t>(cols), static_cast<cuuint32_t>(rows), 1, 1};
  const cuuint32_t elem[4] = {1, 1, 1, 1};
  const CUtensorMapSwizzle swizzle = cols == 64   ? CU_TENSOR_MAP_SWIZZLE_128B
                                     : cols == 32 ? CU_TENSOR_MAP_SWIZZLE_64B
                                                  : CU_TENSOR_MAP_SWIZZLE_32B;
  return fn(m, bf16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16, 4, const_cast<void*>(base),
            dims, strides, box, elem, CU_TENSOR_MAP_INTERLEAVE_NONE, swizzle, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
            CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

cudaError_t run_wg_sm90(const FwdArgs& a, int padded_dim, int batch, int heads, bool bf16, bool causal, int mask_mode,
                        int variant, cudaStream_t s) {
  switch (padded_dim) {
    case 64: return run_wg_sm90_d64(a, batch, heads, bf16, causal, mask_mode, variant, s);
    case 80: return run_wg_sm90_d80(a, batch, heads, bf16, causal, mask_mode, variant, s);
    case 96: return run_wg_sm90_d96(a, batch, heads, bf16, causal, mask_mode, variant, s);
    case 128: return run_wg_sm90_d128(a, batch, heads, bf16, causal, mask_mode, variant, s);
    case 256: return run_wg_sm90_d256(a, batch, heads, bf16, causal, mask_mode, variant, s);
  }
  return cudaErrorInvalidValue;
}

}  // namespace attnsel::cuda::detail
