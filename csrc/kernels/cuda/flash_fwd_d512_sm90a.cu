// head_dim 512 forward on Hopper (sm_90a): wgmma with both operands in shared memory.
// Same schedule as the sm_80 column-split kernel (flash_fwd_sm80.cuh, kernel B), 2 warpgroups per block:
//   S[64 x 64] = Q·K^T : warpgroup g computes key columns 32g..32g+31 (m64n32k16 x 32, K-major A and B)
//   softmax            : row max of both halves combined through shared memory; P (bf16/fp16) to smem
//   O[64 x 512] += P·V : warpgroup g owns O columns 256g..256g+255 (m64n256k16 x 4, V read MN-major)
// Every thread owns the same two rows in all phases, so the running max / sum stay in registers.
// Shared tiles use the canonical 128-byte swizzle: [cols/64 blocks][rows][64], chunk ^= row % 8.
#include <algorithm>
#include <utility>

#include "flash_fwd_launch.h"
#include "flash_fwd_sm80.cuh"
#include "sm90_common.cuh"

namespace attnsel::cuda::detail {
namespace {

using namespace attnsel::cuda::sm90;
using namespace attnsel::cuda::detail::sm90c;

template <typename T>
struct Wg;
template <>
struct Wg<__nv_bfloat16> {
  static __device__ __forceinline__ void qk(float (&d)[16], std::uint64_t a, std::uint64_t b, int acc) {
    wgmma_m64n32k16_bf16_t0(d, a, b, acc);
  }
  static __device__ __forceinline__ void pv(float (&d)[128], std::uint64_t a, std::uint64_t b, int acc) {
    wgmma_m64n256k16_bf16_t1(d, a, b, acc);
  }
};
template <>
struct Wg<__half> {
  static __device__ __forceinline__ void qk(float (&d)[16], std::uint64_t a, std::uint64_t b, int acc) {
    wgmma_m64n32k16_f16_t0(d, a, b, acc);
  }
  static __device__ __forceinline__ void pv(float (&d)[128], std::uint64_t a, std::uint64_t b, int acc) {
    wgmma_m64n256k16_f16_t1(d, a, b, acc);
  }
};

constexpr int kD = 512, kBR = 64, kBC = 64, kNT = 256;
constexpr int kSmem = (kBR * kD + 2 * kBC * kD + kBR * kBC) * 2 + 2 * kBR * 4 + 1024;  // +1024: manual alignment

template <typename T, bool CAUSAL, int MM>
// Split-KV (splits > 1, for grids that leave SMs idle): block (m_block, split) walks one share of the key
// tiles and writes unnormalised fp32 O plus its row max / sum to part_o / part_ml; combine_d512 merges them.
__global__ void __launch_bounds__(256, 1) flash_fwd_d512_sm90(const FwdArgs a, std::uint32_t v_lbo, std::uint32_t v_sbo,
                                                              int splits, float* part_o, float* part_ml) {
  using Op = MmaOp<T>;
  extern __shared__ unsigned char smem_raw[];
  const std::uint32_t raw = smem_u32(smem_raw);
  const std::uint32_t sQ = (raw + 1023) & ~1023u;  // swizzle atoms must be 1024-byte aligned
  const std::uint32_t sK = sQ + kBR * kD * 2, sV = sK + kBC * kD * 2, sP = sV + kBC * kD * 2;
  float* sRed = reinterpret_cast<float*>(smem_raw + (sP - raw) + kBR * kBC * 2);  // [2][64] per-warpgroup row stats

  const int blk = CAUSAL ? (gridDim.x - 1 - blockIdx.x) : blockIdx.x;
  const int m_block = blk / splits, split = blk % splits;
  const int h = blockIdx.y, b = blockIdx.z;
  const HeadPtrs<T> hp(a, b, h);
  const T *q = hp.q, *k = hp.k, *v = hp.v;
  T* o = hp.o;

  const int m0 = m_block * kBR;
  const int n_all = key_tiles<kBR, kBC, CAUSAL>(m0, a.seq_kv);
  const int per = (n_all + splits - 1) / splits;
  const int t_begin = min(n_all, split * per), t_end = min(n_all, t_begin + per);
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int g = lane >> 2, t = lane & 3;
  const int wg = warp >> 2;                    // warpgroup
  const int row0 = (warp & 3) * 16 + g;        // this thread's rows: row0, row0 + 8
  unsigned char* pP = smem_raw + (sP - raw);

  const MaskView<T, MM> mask(a, b, h);
  load_tile_sw128<kBR, kD, kNT>(sQ, q, a.q_ss, m0, a.seq_q, tid);
  load_tile_sw128<kBC, kD, kNT>(sK, k, a.k_ss, t_begin * kBC, a.seq_kv, tid);
  cp_async_commit();

  float acc[128];
#pragma unroll
  for (int i = 0; i < 128; ++i) acc[i] = 0.f;
  float m_r[2] = {-INFINITY, -INFINITY}, l_r[2] = {0.f, 0.f};
  const float sl2 = a.scale_log2;

  for (int jt = t_begin; jt < t_end; ++jt) {
    const int n0 = jt * kBC;
    cp_async_wait<0>();
    fence_async_smem();
    __syncthreads();  // K(jt) landed; P·V(jt-1) done (sV, sP free)
    load_tile_sw128<kBC, kD, kNT>(sV, v, a.v_ss, n0, a.seq_kv, tid);
    cp_async_commit();

    float s[16];
    wg_fence();
    {
      // Descriptors advance by adding (byte offset >> 4) to the start-address field: no per-step rebuild.
      const std::uint64_t da0 = make_desc(sQ, 16, 1024), db0 = make_desc(sK + wg * 32 * 128, 16, 1024);
#pragma unroll 4
      for (int kk = 0; kk < kD / 16; ++kk) {
        const std::uint32_t koff = ((kk & 3) << 5) >> 4;  // 16 elements = 32 bytes along K in a 64-wide block
        Wg<T>::qk(s, da0 + (kk >> 2) * ((kBR * 128) >> 4) + koff, db0 + (kk >> 2) * ((kBC * 128) >> 4) + koff,
                  kk > 0 ? 1 : 0);
      }
    }
    wg_commit();
    wg_wait0();
    fence_regs(s);

    if (MM != kNoMask || n0 + kBC > a.seq_kv || (CAUSAL && n0 + kBC - 1 > m0)) {
#pragma unroll
      for (int e = 0; e < 16; ++e) {
        const int row = m0 + row0 + ((e >> 1) & 1) * 8;
        const int col = n0 + wg * 32 + (e >> 2) * 8 + t * 2 + (e & 1);
        if (MM != kNoMask)
          s[e] = mask.template apply<CAUSAL>(s[e], a.scale, row, col, a.seq_q, a.seq_kv);
        else if (col >= a.seq_kv || (CAUSAL && col > row))
          s[e] = -INFINITY;
      }
    }
    float mx[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float x = -INFINITY;
#pragma unroll
      for (int j = 0; j < 4; ++j) x = fmaxf(x, fmaxf(s[4 * j + 2 * r], s[4 * j + 2 * r + 1]));
      mx[r] = quad_max(x);
      if (t == 0) sRed[wg * kBR + row0 + r * 8] = mx[r];
    }

    cp_async_wait<0>();
    fence_async_smem();
    __syncthreads();  // V(jt) landed; both halves' row maxima visible; K(jt) free
    if (jt + 1 < t_end) load_tile_sw128<kBC, kD, kNT>(sK, k, a.k_ss, n0 + kBC, a.seq_kv, tid);
    cp_async_commit();

#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int lrow = row0 + r * 8;
      const float mn = fmaxf(m_r[r], fmaxf(mx[r], sRed[(wg ^ 1) * kBR + lrow]));
      const float ms = (mn == -INFINITY) ? 0.f : mn * sl2;
      const float alpha = exp2f(m_r[r] * sl2 - ms);
      m_r[r] = mn;
      float rs = 0.f;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const float p0 = exp2f(fmaf(s[4 * j + 2 * r], sl2, -ms));
        const float p1 = exp2f(fmaf(s[4 * j + 2 * r + 1], sl2, -ms));
        rs += p0 + p1;
        *reinterpret_cast<std::uint32_t*>(pP + sw128<kBR>(lrow, wg * 32 + j * 8) + t * 4) = Op::pack(p0, p1);
      }
      l_r[r] = l_r[r] * alpha + rs;
#pragma unroll
      for (int j = 0; j < 32; ++j) {
        acc[4 * j + 2 * r] *= alpha;
        acc[4 * j + 2 * r + 1] *= alpha;
      }
    }
    fence_async_smem();
    __syncthreads();  // P visible to both warpgroups' wgmma

    wg_fence();
    fence_regs(acc);
#pragma unroll
    for (int kk = 0; kk < kBC / 16; ++kk) {
      const std::uint64_t da = make_desc(sP + (kk << 5), 16, 1024);
      const std::uint64_t db = make_desc(sV + (4 * wg) * (kBC * 128) + kk * 16 * 128, v_lbo, v_sbo);
      Wg<T>::pv(acc, da, db, 1);
    }
    wg_commit();
    wg_wait0();
    fence_regs(acc);
  }

  // Row sums: quad, then the other warpgroup's half through shared memory.
  cp_async_wait<0>();  // an empty split never waited on its prologue copies
  __syncthreads();
  float lq[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    lq[r] = quad_sum(l_r[r]);
    if (t == 0) sRed[wg * kBR + row0 + r * 8] = lq[r];
  }
  __syncthreads();
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int lrow = row0 + r * 8;
    const float l = lq[r] + sRed[(wg ^ 1) * kBR + lrow];
    const int row = m0 + lrow;
    if (splits > 1) {
      if (row < a.seq_q) {
        const std::int64_t rid = ((static_cast<std::int64_t>(split) * gridDim.z + b) * gridDim.y + h) * a.seq_q + row;
        float* po = part_o + rid * kD + wg * 256;
#pragma unroll
        for (int j = 0; j < 32; ++j)
          *reinterpret_cast<float2*>(po + j * 8 + t * 2) = make_float2(acc[4 * j + 2 * r], acc[4 * j + 2 * r + 1]);
        if (wg == 0 && t == 0) *reinterpret_cast<float2*>(part_ml + rid * 2) = make_float2(m_r[r], l);
      }
      continue;
    }
    const float inv = l > 0.f ? 1.f / l : 0.f;
    if (row < a.seq_q && a.lse != nullptr && wg == 0 && t == 0)
      a.lse[(static_cast<std::int64_t>(b) * gridDim.y + h) * a.seq_q + row] = row_lse(m_r[r], l, sl2);
    if (row < a.seq_q) {
      T* orow = o + static_cast<std::int64_t>(row) * a.o_ss + wg * 256;
#pragma unroll
      for (int j = 0; j < 32; ++j)
        *reinterpret_cast<std::uint32_t*>(orow + j * 8 + t * 2) =
            Op::pack(acc[4 * j + 2 * r] * inv, acc[4 * j + 2 * r + 1] * inv);
    }
  }
}

// One block per (row, head, batch): O = sum_s w_s O_s / sum_s w_s l_s with w_s = exp2((m_s - max m) * scale).
template <typename T>
__global__ void __launch_bounds__(128) combine_d512(const FwdArgs a, int splits, const float* part_o,
                                                    const float* part_ml) {
  const int row = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const std::int64_t stride_split = static_cast<std::int64_t>(gridDim.z) * gridDim.y * a.seq_q;
  const std::int64_t rid0 = (static_cast<std::int64_t>(b) * gridDim.y + h) * a.seq_q + row;
  float mmax = -INFINITY;
  for (int s = 0; s < splits; ++s) mmax = fmaxf(mmax, part_ml[(rid0 + s * stride_split) * 2]);
  const float ms = mmax == -INFINITY ? 0.f : mmax * a.scale_log2;
  float4 accv = make_float4(0.f, 0.f, 0.f, 0.f);
  float lsum = 0.f;
  for (int s = 0; s < splits; ++s) {
    const std::int64_t rid = rid0 + s * stride_split;
    const float w = exp2f(part_ml[rid * 2] * a.scale_log2 - ms);
    lsum += w * part_ml[rid * 2 + 1];
    const float4 x = reinterpret_cast<const float4*>(part_o + rid * kD)[threadIdx.x];
    accv.x += w * x.x, accv.y += w * x.y, accv.z += w * x.z, accv.w += w * x.w;
  }
  const float inv = lsum > 0.f ? 1.f / lsum : 0.f;
  if (a.lse != nullptr && threadIdx.x == 0)
    a.lse[(static_cast<std::int64_t>(b) * gridDim.y + h) * a.seq_q + row] = row_lse(mmax, lsum, a.scale_log2);
  T* orow = static_cast<T*>(a.o) + b * a.o_sb + h * a.o_sh + static_cast<std::int64_t>(row) * a.o_ss + threadIdx.x * 4;
  reinterpret_cast<std::uint32_t*>(orow)[0] = MmaOp<T>::pack(accv.x * inv, accv.y * inv);
  reinterpret_cast<std::uint32_t*>(orow)[1] = MmaOp<T>::pack(accv.z * inv, accv.w * inv);
}

int sm_count() {
  static int n = 0;
  if (n == 0) {
    int dev = 0;
    cudaGetDevice(&dev);
    cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev);
    if (n <= 0) n = 132;
  }
  return n;
}

}  // namespace

// Stream-ordered workspace from a private pool that keeps its memory (the default pool would hand it back
// to the driver at every sync, and re-mapping costs more than the split saves). Other pools are untouched.
cudaError_t workspace_alloc(void** ptr, std::size_t bytes, cudaStream_t stream) {
  static cudaMemPool_t pools[64] = {};
  int dev = 0;
  cudaError_t e = cudaGetDevice(&dev);
  if (e != cudaSuccess) return e;
  if (dev < 0 || dev >= 64) return cudaMallocAsync(ptr, bytes, stream);
  if (pools[dev] == nullptr) {
    cudaMemPoolProps props = {};
    props.allocType = cudaMemAllocationTypePinned;
    props.location.type = cudaMemLocationTypeDevice;
    props.location.id = dev;
    cudaMemPool_t pool = nullptr;
    if ((e = cudaMemPoolCreate(&pool, &props)) != cudaSuccess) return e;
    std::uint64_t keep = ~0ull;
    cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &keep);
    pools[dev] = pool;
  }
  return cudaMallocFromPoolAsync(ptr, bytes, pools[dev], stream);
}

namespace {

template <typename T, bool CAUSAL, int MM>
cudaError_t launch(const FwdArgs& a, int batch, int heads, int force_splits, cudaStream_t stream) {
  auto kern = flash_fwd_d512_sm90<T, CAUSAL, MM>;
  cudaError_t e = cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem);
  if (e != cudaSuccess) return e;
  const int m_blocks = (a.seq_q + kBR - 1) / kBR;
  const long long blocks = static_cast<long long>(m_blocks) * heads * batch;
  const int n_tiles = (a.seq_kv + kBC - 1) / kBC;
  // Split the keys only when one block per SM would leave most SMs idle, and keep >= 8 tiles per split.
  int splits = 1;
  if (force_splits > 0) splits = force_splits;
  else if (!CAUSAL && blocks * 2 <= sm_count()) splits = static_cast<int>(sm_count() / blocks);
  splits = std::max(1, std::min({splits, n_tiles / 8, 16}));
  if (force_splits > 0) splits = std::max(1, std::min(force_splits, n_tiles));
  if (splits > 1) {
    const std::size_t rows = static_cast<std::size_t>(splits) * batch * heads * a.seq_q;
    void* ws = nullptr;
    e = workspace_alloc(&ws, rows * (kD + 2) * sizeof(float), stream);
    if (e != cudaSuccess) return e;
    float* part_o = static_cast<float*>(ws);
    float* part_ml = part_o + rows * kD;
    dim3 grid(m_blocks * splits, heads, batch);
    kern<<<grid, kNT, kSmem, stream>>>(a, kBC * 128, 1024, splits, part_o, part_ml);
    e = cudaGetLastError();
    if (e == cudaSuccess) {
      combine_d512<T><<<dim3(a.seq_q, heads, batch), 128, 0, stream>>>(a, splits, part_o, part_ml);
      e = cudaGetLastError();
    }
    cudaError_t ef = cudaFreeAsync(ws, stream);
    return e != cudaSuccess ? e : ef;
  }
  // V is read MN-major: LBO = stride between 64-column blocks, SBO = stride between 8-row groups
  // (checked on the device: the swapped reading gives wrong results).
  const std::uint32_t lbo = kBC * 128, sbo = 1024;
  dim3 grid(m_blocks, heads, batch);
  kern<<<grid, kNT, kSmem, stream>>>(a, lbo, sbo, 1, nullptr, nullptr);
  return cudaGetLastError();
}

template <typename T, bool CAUSAL>
cudaError_t launch_mm(const FwdArgs& a, int batch, int heads, int mask_mode, int force_splits, cudaStream_t s) {
  if (mask_mode == kBoolMask) return launch<T, CAUSAL, kBoolMask>(a, batch, heads, force_splits, s);
  if (mask_mode == kAddMask) return launch<T, CAUSAL, kAddMask>(a, batch, heads, force_splits, s);
  return launch<T, CAUSAL, kNoMask>(a, batch, heads, force_splits, s);
}

}  // namespace

// variant 2..9 (dev): force that many key splits; 10: never split; otherwise chosen from the grid size.
cudaError_t run_hdim512_sm90(const FwdArgs& a, int batch, int heads, bool bf16, bool causal, int mask_mode,
                             int variant, cudaStream_t s) {
  const int force = (variant >= 2 && variant <= 9) ? variant : variant == 10 ? 1 : 0;
  if (bf16) return causal ? launch_mm<__nv_bfloat16, true>(a, batch, heads, mask_mode, force, s)
                          : launch_mm<__nv_bfloat16, false>(a, batch, heads, mask_mode, force, s);
  return causal ? launch_mm<__half, true>(a, batch, heads, mask_mode, force, s)
                : launch_mm<__half, false>(a, batch, heads, mask_mode, force, s);
}

}  // namespace attnsel::cuda::detail
