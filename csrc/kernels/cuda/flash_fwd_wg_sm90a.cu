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

namespace {

// K and V ([B][Hkv][Sk][cols_in], element strides) copied into zero-padded rows of COLS elements, K first:
// [2][B][Hkv][Sk][COLS]. The grid is (B*Hkv, row chunks, 2): batch and head are uniform per block and the row split
// divides by a constant, so a thread spends its instructions on its 16 bytes (the first version, one flat index
// split by 64-bit divisions, took 3.7x as long: 73 vs 20 us for PixArt's K/V on an H200).
struct RepackSrc {
  const char* p;
  std::int64_t sb, sh, ss;
};

template <int COLS>
__global__ void __launch_bounds__(256) repack_rows(const RepackSrc s0, const RepackSrc s1, uint4* dst, int heads,
                                                   int seq, int cols_in) {
  constexpr int PER_ROW = COLS / 8;
  const int i = blockIdx.y * 256 + threadIdx.x;  // 16-byte piece within this (b, h)
  if (i >= seq * PER_ROW) return;
  const int s = i / PER_ROW, c = i - s * PER_ROW;
  const int bh = blockIdx.x, b = bh / heads, h = bh - b * heads;
  const bool second = blockIdx.z != 0;
  uint4 v = make_uint4(0u, 0u, 0u, 0u);
  if (c * 8 < cols_in) {
    const std::int64_t off = b * (second ? s1.sb : s0.sb) + h * (second ? s1.sh : s0.sh) +
                             s * (second ? s1.ss : s0.ss) + c * 8;
    v = *reinterpret_cast<const uint4*>((second ? s1.p : s0.p) + 2 * off);
  }
  dst[(static_cast<std::int64_t>(blockIdx.z) * gridDim.x + bh) * seq * PER_ROW + i] = v;
}

// False when the grid cannot hold the copy (more than 65535 row chunks per head; kMaxRepackBytes keeps it far below).
bool launch_repack(const RepackSrc& s0, const RepackSrc& s1, void* dst, int batch, int heads, int seq, int cols_in,
                   int cols, cudaStream_t st) {
  const std::int64_t chunks = (static_cast<std::int64_t>(seq) * (cols / 8) + 255) / 256;
  if (chunks > 65535 || static_cast<std::int64_t>(batch) * heads > 0x7fffffff) return false;
  const dim3 grid(static_cast<unsigned>(batch * heads), static_cast<unsigned>(chunks), 2u);
  if (cols == 80) repack_rows<80><<<grid, 256, 0, st>>>(s0, s1, static_cast<uint4*>(dst), heads, seq, cols_in);
  else repack_rows<96><<<grid, 256, 0, st>>>(s0, s1, static_cast<uint4*>(dst), heads, seq, cols_in);
  return true;
}

constexpr std::int64_t kMaxRepackBytes = std::int64_t{256} << 20;  // K+V of 24 heads x 29k keys at 96 columns

cudaError_t run_padded(const FwdArgs& a, int padded_dim, int batch, int heads, bool bf16, bool causal, int mask_mode,
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

}  // namespace

// Head sizes 72 and 88 (rows of 144 / 176 bytes) ran no faster at the padded size 80/96 than at 128 (H200), while 96
// and 80 ran 10-20% faster: the tensor copies of K/V rows that straddle 64-byte segments, padding columns out of
// bounds, cost more than the saved columns. So K and V of the 80/96 kernels are first copied into zero-padded rows
// of the padded size (one pass over K and V, which each query tile then reads again): with repack_rows +32% at 72
// and +17% at 88, the copy 5-6% of the call (docs/cuda-kernels.md). Q is read once per tile and stays where it is
// (repacking it too cost more than it gained). Variant 22 skips this, and so do calls whose padded K/V would pass
// kMaxRepackBytes: the workspace pool keeps the memory it handed out (its peak), so this bounds what stays held
// after the call.
cudaError_t run_wg_sm90(const FwdArgs& a, int padded_dim, int batch, int heads, bool bf16, bool causal, int mask_mode,
                        int variant, cudaStream_t s) {
  if ((padded_dim != 80 && padded_dim != 96) || a.head_dim == padded_dim || variant == 22)
    return run_padded(a, padded_dim, batch, heads, bf16, causal, mask_mode, variant, s);
  const int heads_kv = heads / a.group;
  const std::int64_t kv_rows = static_cast<std::int64_t>(batch) * heads_kv * a.seq_kv;
  const std::int64_t bytes = 2 * kv_rows * padded_dim * 2;
  if (bytes > kMaxRepackBytes) return run_padded(a, padded_dim, batch, heads, bf16, causal, mask_mode, variant, s);
  void* ws = nullptr;
  cudaError_t e = workspace_alloc(&ws, static_cast<std::size_t>(bytes), s);
  if (e != cudaSuccess) return e;
  const bool packed = launch_repack(RepackSrc{static_cast<const char*>(a.k), a.k_sb, a.k_sh, a.k_ss},
                                    RepackSrc{static_cast<const char*>(a.v), a.v_sb, a.v_sh, a.v_ss}, ws, batch,
                                    heads_kv, a.seq_kv, a.head_dim, padded_dim, s);
  e = cudaGetLastError();
  if (e == cudaSuccess) {
    FwdArgs p = a;
    if (packed) {
      const std::int64_t per_head = static_cast<std::int64_t>(a.seq_kv) * padded_dim;
      p.k = ws;
      p.v = static_cast<const char*>(ws) + bytes / 2;
      p.k_ss = p.v_ss = padded_dim;
      p.k_sh = p.v_sh = per_head;
      p.k_sb = p.v_sb = per_head * heads_kv;
      p.kv_cols = padded_dim;
    }
    e = run_padded(p, padded_dim, batch, heads, bf16, causal, mask_mode, variant, s);
  }
  const cudaError_t ef = cudaFreeAsync(ws, s);
  return e != cudaSuccess ? e : ef;
}

}  // namespace attnsel::cuda::detail
