// head_dim 64/128/256 forward on Hopper (sm_90a) with wgmma. FA2's schedule, Hopper's tensor-core path:
// each warpgroup owns 64 query rows of a 64*NWG-row block; the block shares K/V tiles (cp.async, 128-byte
// swizzle). Per key tile: S = Q·K^T (m64n{BC}k16, both operands from smem), online softmax in registers,
// then O += P·V with P fed from registers (the S accumulator layout is the wgmma A-fragment layout) and V
// read MN-major from smem. V(j) streams in during Q·K(j)^T, K(j+1) during softmax and P·V(j).
#include "flash_fwd_launch.h"
#include "sm90_common.cuh"

namespace attnsel::cuda::detail {
namespace {

using namespace attnsel::cuda::sm90;
using namespace attnsel::cuda::detail::sm90c;

template <typename T, int BC, int D>
struct WgOps;
#define ATTNSEL_WG_OPS(TYPE, SUF, BC, D)                                                                   \
  template <>                                                                                              \
  struct WgOps<TYPE, BC, D> {                                                                              \
    static __device__ __forceinline__ void qk(float (&s)[BC / 2], std::uint64_t a, std::uint64_t b, int acc) { \
      wgmma_m64n##BC##k16_##SUF##_t0(s, a, b, acc);                                                        \
    }                                                                                                      \
    static __device__ __forceinline__ void pv(float (&o)[D / 2], const std::uint32_t (&p)[4], std::uint64_t b) { \
      wgmma_rs_m64n##D##k16_##SUF##_t1(o, p, b);                                                           \
    }                                                                                                      \
  };
ATTNSEL_WG_OPS(__nv_bfloat16, bf16, 128, 64)
ATTNSEL_WG_OPS(__nv_bfloat16, bf16, 128, 128)
ATTNSEL_WG_OPS(__nv_bfloat16, bf16, 64, 128)
ATTNSEL_WG_OPS(__nv_bfloat16, bf16, 64, 256)
ATTNSEL_WG_OPS(__half, f16, 128, 64)
ATTNSEL_WG_OPS(__half, f16, 128, 128)
ATTNSEL_WG_OPS(__half, f16, 64, 128)
ATTNSEL_WG_OPS(__half, f16, 64, 256)
#undef ATTNSEL_WG_OPS

template <int D, int BC, int NWG>
struct WgCfg {
  static constexpr int BR = 64 * NWG, NT = 128 * NWG;
  static constexpr int SMEM = (BR * D + 2 * BC * D) * 2 + 1024;  // +1024: manual 1024-byte alignment
};

template <typename T, int D, int BC, int NWG, bool CAUSAL>
__global__ void __launch_bounds__(NWG * 128, 1) flash_fwd_wg(const FwdArgs a) {
  using C = WgCfg<D, BC, NWG>;
  using Ops = WgOps<T, BC, D>;
  using Op = MmaOp<T>;
  constexpr int BR = C::BR, NT = C::NT;

  extern __shared__ unsigned char smem_raw[];
  const std::uint32_t raw = smem_u32(smem_raw);
  const std::uint32_t sQ = (raw + 1023) & ~1023u;
  const std::uint32_t sK = sQ + BR * D * 2, sV = sK + BC * D * 2;

  const int m_block = CAUSAL ? (gridDim.x - 1 - blockIdx.x) : blockIdx.x;
  const int h = blockIdx.y, b = blockIdx.z;
  const int hk = h / a.group;
  const T* q = static_cast<const T*>(a.q) + b * a.q_sb + h * a.q_sh;
  const T* k = static_cast<const T*>(a.k) + b * a.k_sb + hk * a.k_sh;
  const T* v = static_cast<const T*>(a.v) + b * a.v_sb + hk * a.v_sh;
  T* o = static_cast<T*>(a.o) + b * a.o_sb + h * a.o_sh;

  const int m0 = m_block * BR;
  const int n_tiles = key_tiles<BR, BC, CAUSAL>(m0, a.seq_kv);
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int g = lane >> 2, t = lane & 3;
  const int wg = warp >> 2;
  const int row0 = wg * 64 + (warp & 3) * 16 + g;  // local rows row0 and row0 + 8

  load_tile_sw128<BR, D, NT>(sQ, q, a.q_ss, m0, a.seq_q, tid);
  load_tile_sw128<BC, D, NT>(sK, k, a.k_ss, 0, a.seq_kv, tid);
  cp_async_commit();

  float acc[D / 2];
#pragma unroll
  for (int i = 0; i < D / 2; ++i) acc[i] = 0.f;
  float m_r[2] = {-INFINITY, -INFINITY}, l_r[2] = {0.f, 0.f};
  const float sl2 = a.scale_log2;
  const std::uint64_t dq0 = make_desc(sQ + wg * 64 * 128, 16, 1024);
  const std::uint64_t dk0 = make_desc(sK, 16, 1024);
  const std::uint64_t dv0 = make_desc(sV, BC * 128, 1024);

  for (int jt = 0; jt < n_tiles; ++jt) {
    const int n0 = jt * BC;
    cp_async_wait<0>();
    fence_async_smem();
    __syncthreads();  // K(jt) landed; every warpgroup is done with V(jt-1)
    load_tile_sw128<BC, D, NT>(sV, v, a.v_ss, n0, a.seq_kv, tid);
    cp_async_commit();

    float s[BC / 2];
    wg_fence();
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      const std::uint32_t koff = (kk & 3) << 1;  // 32 bytes along K, in 16-byte descriptor units
      Ops::qk(s, dq0 + (kk >> 2) * ((BR * 128) >> 4) + koff, dk0 + (kk >> 2) * ((BC * 128) >> 4) + koff,
              kk > 0 ? 1 : 0);
    }
    wg_commit();
    wg_wait0();
    fence_regs(s);

    if (n0 + BC > a.seq_kv || (CAUSAL && n0 + BC - 1 > m0 + wg * 64)) {
#pragma unroll
      for (int e = 0; e < BC / 2; ++e) {
        const int row = m0 + row0 + ((e >> 1) & 1) * 8;
        const int col = n0 + (e >> 2) * 8 + t * 2 + (e & 1);
        if (col >= a.seq_kv || (CAUSAL && col > row)) s[e] = -INFINITY;
      }
    }

    cp_async_wait<0>();
    fence_async_smem();
    __syncthreads();  // V(jt) landed; K(jt) free
    if (jt + 1 < n_tiles) load_tile_sw128<BC, D, NT>(sK, k, a.k_ss, n0 + BC, a.seq_kv, tid);
    cp_async_commit();

#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float mx = m_r[r];
#pragma unroll
      for (int j = 0; j < BC / 8; ++j) mx = fmaxf(mx, fmaxf(s[4 * j + 2 * r], s[4 * j + 2 * r + 1]));
      mx = quad_max(mx);
      const float ms = (mx == -INFINITY) ? 0.f : mx * sl2;
      const float alpha = exp2f(m_r[r] * sl2 - ms);
      m_r[r] = mx;
      float rs = 0.f;
#pragma unroll
      for (int j = 0; j < BC / 8; ++j) {
        const float p0 = exp2f(fmaf(s[4 * j + 2 * r], sl2, -ms));
        const float p1 = exp2f(fmaf(s[4 * j + 2 * r + 1], sl2, -ms));
        s[4 * j + 2 * r] = p0;
        s[4 * j + 2 * r + 1] = p1;
        rs += p0 + p1;
      }
      l_r[r] = l_r[r] * alpha + rs;
#pragma unroll
      for (int j = 0; j < D / 8; ++j) {
        acc[4 * j + 2 * r] *= alpha;
        acc[4 * j + 2 * r + 1] *= alpha;
      }
    }
    std::uint32_t pa[BC / 16][4];
#pragma unroll
    for (int kk = 0; kk < BC / 16; ++kk) {
      pa[kk][0] = Op::pack(s[8 * kk], s[8 * kk + 1]);
      pa[kk][1] = Op::pack(s[8 * kk + 2], s[8 * kk + 3]);
      pa[kk][2] = Op::pack(s[8 * kk + 4], s[8 * kk + 5]);
      pa[kk][3] = Op::pack(s[8 * kk + 6], s[8 * kk + 7]);
    }
    wg_fence();
    fence_regs(acc);
#pragma unroll
    for (int kk = 0; kk < BC / 16; ++kk) Ops::pv(acc, pa[kk], dv0 + ((kk * 16 * 128) >> 4));
    wg_commit();
    wg_wait0();
    fence_regs(acc);
  }

#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const float l = quad_sum(l_r[r]);
    const float inv = l > 0.f ? 1.f / l : 0.f;
    const int row = m0 + row0 + r * 8;
    if (row < a.seq_q) {
      T* orow = o + static_cast<std::int64_t>(row) * a.o_ss;
#pragma unroll
      for (int j = 0; j < D / 8; ++j)
        *reinterpret_cast<std::uint32_t*>(orow + j * 8 + t * 2) =
            Op::pack(acc[4 * j + 2 * r] * inv, acc[4 * j + 2 * r + 1] * inv);
    }
  }
}

// Pipelined variant (FA3-style intra-warpgroup overlap): K and V double-buffered, one barrier per tile.
// Tile j issues S_j = Q·K_j^T and O += P_{j-1}·V_{j-1} back to back; the softmax of S_j runs while the
// P·V wgmma is still on the tensor cores, and O is rescaled once that group has retired.
template <int D, int BC, int NWG>
struct WgpCfg {
  static constexpr int BR = 64 * NWG, NT = 128 * NWG;
  static constexpr int SMEM = (BR * D + 4 * BC * D) * 2 + 1024;
};

__device__ __forceinline__ void wg_wait1() { asm volatile("wgmma.wait_group.sync.aligned 1;\n" ::: "memory"); }
// Keeps the register A fragment of an in-flight wgmma alive (and unmoved) until after the wait.
template <int N>
__device__ __forceinline__ void fence_frag(std::uint32_t (&r)[N][4]) {
#pragma unroll
  for (int i = 0; i < N; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) asm volatile("" : "+r"(r[i][j])::"memory");
}

template <typename T, int D, int BC, int NWG, bool CAUSAL>
__global__ void __launch_bounds__(NWG * 128, 1) flash_fwd_wgp(const FwdArgs a) {
  using C = WgpCfg<D, BC, NWG>;
  using Ops = WgOps<T, BC, D>;
  using Op = MmaOp<T>;
  constexpr int BR = C::BR, NT = C::NT;
  constexpr std::uint32_t KV_BYTES = BC * D * 2;

  extern __shared__ unsigned char smem_raw[];
  const std::uint32_t raw = smem_u32(smem_raw);
  const std::uint32_t sQ = (raw + 1023) & ~1023u;
  const std::uint32_t sK = sQ + BR * D * 2, sV = sK + 2 * KV_BYTES;  // [2] K buffers, [2] V buffers

  const int m_block = CAUSAL ? (gridDim.x - 1 - blockIdx.x) : blockIdx.x;
  const int h = blockIdx.y, b = blockIdx.z;
  const int hk = h / a.group;
  const T* q = static_cast<const T*>(a.q) + b * a.q_sb + h * a.q_sh;
  const T* k = static_cast<const T*>(a.k) + b * a.k_sb + hk * a.k_sh;
  const T* v = static_cast<const T*>(a.v) + b * a.v_sb + hk * a.v_sh;
  T* o = static_cast<T*>(a.o) + b * a.o_sb + h * a.o_sh;

  const int m0 = m_block * BR;
  const int n_tiles = key_tiles<BR, BC, CAUSAL>(m0, a.seq_kv);
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int g = lane >> 2, t = lane & 3;
  const int wg = warp >> 2;
  const int row0 = wg * 64 + (warp & 3) * 16 + g;

  float acc[D / 2];
#pragma unroll
  for (int i = 0; i < D / 2; ++i) acc[i] = 0.f;
  float m_r[2] = {-INFINITY, -INFINITY}, l_r[2] = {0.f, 0.f};
  const float sl2 = a.scale_log2;
  const std::uint64_t dq0 = make_desc(sQ + wg * 64 * 128, 16, 1024);
  std::uint32_t pa[BC / 16][4];
  float s[BC / 2];

  // S = Q·K(buf)^T, issued (not waited).
  auto issue_qk = [&](int buf) {
    const std::uint64_t dk0 = make_desc(sK + buf * KV_BYTES, 16, 1024);
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      const std::uint32_t koff = (kk & 3) << 1;
      Ops::qk(s, dq0 + (kk >> 2) * ((BR * 128) >> 4) + koff, dk0 + (kk >> 2) * ((BC * 128) >> 4) + koff,
              kk > 0 ? 1 : 0);
    }
  };
  auto issue_pv = [&](int buf) {
    const std::uint64_t dv0 = make_desc(sV + buf * KV_BYTES, BC * 128, 1024);
#pragma unroll
    for (int kk = 0; kk < BC / 16; ++kk) Ops::pv(acc, pa[kk], dv0 + ((kk * 16 * 128) >> 4));
  };
  // Mask S of tile jt, new row max, P = exp2(..) in s; returns alpha per row through al.
  auto softmax = [&](int jt, float (&al)[2]) {
    const int n0 = jt * BC;
    if (n0 + BC > a.seq_kv || (CAUSAL && n0 + BC - 1 > m0 + wg * 64)) {
#pragma unroll
      for (int e = 0; e < BC / 2; ++e) {
        const int row = m0 + row0 + ((e >> 1) & 1) * 8;
        const int col = n0 + (e >> 2) * 8 + t * 2 + (e & 1);
        if (col >= a.seq_kv || (CAUSAL && col > row)) s[e] = -INFINITY;
      }
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float mx = m_r[r];
#pragma unroll
      for (int j = 0; j < BC / 8; ++j) mx = fmaxf(mx, fmaxf(s[4 * j + 2 * r], s[4 * j + 2 * r + 1]));
      mx = quad_max(mx);
      const float ms = (mx == -INFINITY) ? 0.f : mx * sl2;
      al[r] = exp2f(m_r[r] * sl2 - ms);
      m_r[r] = mx;
      float rs = 0.f;
#pragma unroll
      for (int j = 0; j < BC / 8; ++j) {
        const float p0 = exp2f(fmaf(s[4 * j + 2 * r], sl2, -ms));
        const float p1 = exp2f(fmaf(s[4 * j + 2 * r + 1], sl2, -ms));
        s[4 * j + 2 * r] = p0;
        s[4 * j + 2 * r + 1] = p1;
        rs += p0 + p1;
      }
      l_r[r] = l_r[r] * al[r] + rs;
    }
  };
  auto pack_p = [&]() {
#pragma unroll
    for (int kk = 0; kk < BC / 16; ++kk) {
      pa[kk][0] = Op::pack(s[8 * kk], s[8 * kk + 1]);
      pa[kk][1] = Op::pack(s[8 * kk + 2], s[8 * kk + 3]);
      pa[kk][2] = Op::pack(s[8 * kk + 4], s[8 * kk + 5]);
      pa[kk][3] = Op::pack(s[8 * kk + 6], s[8 * kk + 7]);
    }
  };

  // Prologue: Q and K(0); then K(1) and V(0) stream in while S_0 is computed.
  load_tile_sw128<BR, D, NT>(sQ, q, a.q_ss, m0, a.seq_q, tid);
  load_tile_sw128<BC, D, NT>(sK, k, a.k_ss, 0, a.seq_kv, tid);
  cp_async_commit();
  cp_async_wait<0>();
  fence_async_smem();
  __syncthreads();
  if (n_tiles > 1) load_tile_sw128<BC, D, NT>(sK + KV_BYTES, k, a.k_ss, BC, a.seq_kv, tid);
  load_tile_sw128<BC, D, NT>(sV, v, a.v_ss, 0, a.seq_kv, tid);
  cp_async_commit();
  wg_fence();
  issue_qk(0);
  wg_commit();
  wg_wait0();
  fence_regs(s);
  {
    float al[2];
    softmax(0, al);  // O is zero: no rescale needed
  }
  pack_p();

  for (int jt = 1; jt < n_tiles; ++jt) {
    cp_async_wait<0>();
    fence_async_smem();
    __syncthreads();  // K(jt), V(jt-1) landed; every warpgroup retired S_{jt-1} and P·V_{jt-2}
    if (jt + 1 < n_tiles) load_tile_sw128<BC, D, NT>(sK + ((jt + 1) & 1) * KV_BYTES, k, a.k_ss, (jt + 1) * BC, a.seq_kv, tid);
    load_tile_sw128<BC, D, NT>(sV + (jt & 1) * KV_BYTES, v, a.v_ss, jt * BC, a.seq_kv, tid);
    cp_async_commit();

    wg_fence();
    fence_regs(acc);
    issue_qk(jt & 1);
    wg_commit();
    issue_pv((jt - 1) & 1);
    wg_commit();
    wg_wait1();  // S_jt ready; P·V_{jt-1} may still run
    fence_regs(s);
    float al[2];
    softmax(jt, al);
    wg_wait0();
    fence_regs(acc);
    fence_frag(pa);
#pragma unroll
    for (int r = 0; r < 2; ++r)
#pragma unroll
      for (int j = 0; j < D / 8; ++j) {
        acc[4 * j + 2 * r] *= al[r];
        acc[4 * j + 2 * r + 1] *= al[r];
      }
    pack_p();
  }
  cp_async_wait<0>();
  fence_async_smem();
  __syncthreads();  // V(n_tiles-1) landed
  wg_fence();
  fence_regs(acc);
  issue_pv((n_tiles - 1) & 1);
  wg_commit();
  wg_wait0();
  fence_regs(acc);
  fence_frag(pa);

#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const float l = quad_sum(l_r[r]);
    const float inv = l > 0.f ? 1.f / l : 0.f;
    const int row = m0 + row0 + r * 8;
    if (row < a.seq_q) {
      T* orow = o + static_cast<std::int64_t>(row) * a.o_ss;
#pragma unroll
      for (int j = 0; j < D / 8; ++j)
        *reinterpret_cast<std::uint32_t*>(orow + j * 8 + t * 2) =
            Op::pack(acc[4 * j + 2 * r] * inv, acc[4 * j + 2 * r + 1] * inv);
    }
  }
}

template <typename T, int D, int BC, int NWG, bool CAUSAL>
cudaError_t launch_p(const FwdArgs& a, int batch, int heads, cudaStream_t stream) {
  using C = WgpCfg<D, BC, NWG>;
  auto kern = flash_fwd_wgp<T, D, BC, NWG, CAUSAL>;
  cudaError_t e = cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, C::SMEM);
  if (e != cudaSuccess) return e;
  dim3 grid((a.seq_q + C::BR - 1) / C::BR, heads, batch);
  kern<<<grid, C::NT, C::SMEM, stream>>>(a);
  return cudaGetLastError();
}

template <typename T, int D, int BC, int NWG, bool CAUSAL>
cudaError_t launch(const FwdArgs& a, int batch, int heads, cudaStream_t stream) {
  using C = WgCfg<D, BC, NWG>;
  auto kern = flash_fwd_wg<T, D, BC, NWG, CAUSAL>;
  cudaError_t e = cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, C::SMEM);
  if (e != cudaSuccess) return e;
  dim3 grid((a.seq_q + C::BR - 1) / C::BR, heads, batch);
  kern<<<grid, C::NT, C::SMEM, stream>>>(a);
  return cudaGetLastError();
}

template <typename T, bool C>
cudaError_t run_t(const FwdArgs& a, int D, int batch, int heads, int variant, cudaStream_t s) {
  // variant 10 (default) / 11 / 12: tile configs per head dim.
  switch (D) {  // 13/14: pipelined kernel
    case 64:
      if (variant == 13) return launch_p<T, 64, 128, 2, C>(a, batch, heads, s);
      if (variant == 14) return launch_p<T, 64, 128, 3, C>(a, batch, heads, s);
      return variant == 11 ? launch<T, 64, 128, 3, C>(a, batch, heads, s) : launch<T, 64, 128, 2, C>(a, batch, heads, s);
    case 128:
      if (variant == 13) return launch_p<T, 128, 128, 2, C>(a, batch, heads, s);
      if (variant == 14) return launch_p<T, 128, 64, 3, C>(a, batch, heads, s);
      if (variant == 11) return launch<T, 128, 128, 3, C>(a, batch, heads, s);
      if (variant == 12) return launch<T, 128, 64, 2, C>(a, batch, heads, s);
      return launch<T, 128, 128, 2, C>(a, batch, heads, s);
    case 256:
      if (variant == 13) return launch_p<T, 256, 64, 2, C>(a, batch, heads, s);
      if (variant == 14) return launch_p<T, 256, 64, 1, C>(a, batch, heads, s);
      return variant == 11 ? launch<T, 256, 64, 1, C>(a, batch, heads, s) : launch<T, 256, 64, 2, C>(a, batch, heads, s);
  }
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t run_wg_sm90(const FwdArgs& a, int head_dim, int batch, int heads, bool bf16, bool causal, int variant,
                        cudaStream_t s) {
  if (bf16) return causal ? run_t<__nv_bfloat16, true>(a, head_dim, batch, heads, variant, s)
                          : run_t<__nv_bfloat16, false>(a, head_dim, batch, heads, variant, s);
  return causal ? run_t<__half, true>(a, head_dim, batch, heads, variant, s)
                : run_t<__half, false>(a, head_dim, batch, heads, variant, s);
}

}  // namespace attnsel::cuda::detail
