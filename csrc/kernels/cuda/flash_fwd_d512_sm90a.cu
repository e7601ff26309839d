// head_dim 512 forward on Hopper (sm_90a): wgmma with both operands in shared memory.
// Same schedule as the sm_80 column-split kernel (flash_fwd_sm80.cuh, kernel B), 2 warpgroups per block:
//   S[64 x 64] = Q·K^T : warpgroup g computes key columns 32g..32g+31 (m64n32k16 x 32, K-major A and B)
//   softmax            : row max of both halves combined through shared memory; P (bf16/fp16) to smem
//   O[64 x 512] += P·V : warpgroup g owns O columns 256g..256g+255 (m64n256k16 x 4, V read MN-major)
// Every thread owns the same two rows in all phases, so the running max / sum stay in registers.
// Shared tiles use the canonical 128-byte swizzle: [cols/64 blocks][rows][64], chunk ^= row % 8.
#include <algorithm>
#include <atomic>
#include <utility>

#include "flash_fwd_launch.h"
#include "flash_fwd_sm80.cuh"
#include "flash_fwd_wg_sm90a.cuh"  // make_map, sm_count, named_bar_sync, wg_wait1
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
  static __device__ __forceinline__ void qk64(float (&d)[32], std::uint64_t a, std::uint64_t b, int acc) {
    wgmma_m64n64k16_bf16_t0(d, a, b, acc);
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
  static __device__ __forceinline__ void qk64(float (&d)[32], std::uint64_t a, std::uint64_t b, int acc) {
    wgmma_m64n64k16_f16_t0(d, a, b, acc);
  }
  static __device__ __forceinline__ void pv(float (&d)[128], std::uint64_t a, std::uint64_t b, int acc) {
    wgmma_m64n256k16_f16_t1(d, a, b, acc);
  }
};

// ---- a pair of CTAs in a cluster (the split pair's merge below) ----
__device__ __forceinline__ void cluster_sync() {
  asm volatile("barrier.cluster.arrive.release.aligned;\nbarrier.cluster.wait.acquire.aligned;\n" ::: "memory");
}
// The address of this CTA's shared-memory location `addr` in cluster CTA `rank`.
__device__ __forceinline__ std::uint32_t cluster_addr(std::uint32_t addr, int rank) {
  std::uint32_t r;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;\n" : "=r"(r) : "r"(addr), "r"(rank));
  return r;
}
// Arrival on a barrier in another CTA of the cluster, releasing this thread's earlier shared-memory writes to it.
__device__ __forceinline__ void mbar_arrive_cluster(std::uint32_t remote_bar) {
  asm volatile("mbarrier.arrive.release.cluster.shared::cluster.b64 _, [%0];\n" ::"r"(remote_bar) : "memory");
}
// mbar_wait that acquires what the arriving threads of the cluster released.
__device__ __forceinline__ void mbar_wait_cluster(std::uint32_t bar, std::uint32_t parity) {
  std::uint32_t done = 0;
  do {
    asm volatile(
        "{\n.reg .pred p;\nmbarrier.try_wait.parity.acquire.cluster.shared::cta.b64 p, [%1], %2;\n"
        "selp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(bar), "r"(parity)
        : "memory");
  } while (!done);
}
__device__ __forceinline__ float4 ld_cluster_f4(std::uint32_t addr) {
  float4 v;
  asm volatile("ld.shared::cluster.v4.f32 {%0, %1, %2, %3}, [%4];\n"
               : "=f"(v.x), "=f"(v.y), "=f"(v.z), "=f"(v.w)
               : "r"(addr)
               : "memory");
  return v;
}

constexpr int kD = 512, kBR = 64, kBC = 64, kNT = 256;
constexpr int kSmem = (kBR * kD + 2 * kBC * kD + kBR * kBC) * 2 + 2 * kBR * 4 + 1024;  // +1024: manual alignment

// The softmax of rows whose scores are split between two warpgroups, NJ 8-column groups of S each (both D=512
// kernels). half_row_max: this half's row maxima, published to its row of sRed (read after a barrier).
template <int NJ>
__device__ __forceinline__ void half_row_max(const float (&s)[4 * NJ], float (&mx)[2], float* sRed_mine, int row0,
                                             int t) {
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float x = -INFINITY;
#pragma unroll
    for (int j = 0; j < NJ; ++j) x = fmaxf(x, fmaxf(s[4 * j + 2 * r], s[4 * j + 2 * r + 1]));
    mx[r] = quad_max(x);
    if (t == 0) sRed_mine[row0 + r * 8] = mx[r];
  }
}

// With the other half's maxima: P of this half's columns (col0..) to shared memory (swizzled, for both halves'
// P·V), this warpgroup's O columns rescaled, the running max and sum updated.
template <typename Op, int NJ>
__device__ __forceinline__ void split_softmax(const float (&s)[4 * NJ], const float (&mx)[2], const float* sRed_other,
                                              unsigned char* pP, int row0, int col0, int t, float sl2,
                                              float (&m_r)[2], float (&l_r)[2], float (&acc)[128]) {
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int lrow = row0 + r * 8;
    const float mn = fmaxf(m_r[r], fmaxf(mx[r], sRed_other[lrow]));
    const float ms = (mn == -INFINITY) ? 0.f : mn * sl2;
    const float alpha = exp2f(m_r[r] * sl2 - ms);
    m_r[r] = mn;
    float rs = 0.f;
#pragma unroll
    for (int j = 0; j < NJ; ++j) {
      const float p0 = exp2f(fmaf(s[4 * j + 2 * r], sl2, -ms));
      const float p1 = exp2f(fmaf(s[4 * j + 2 * r + 1], sl2, -ms));
      rs += p0 + p1;
      *reinterpret_cast<std::uint32_t*>(pP + sw128<kBR>(lrow, col0 + j * 8) + t * 4) = Op::pack(p0, p1);
    }
    l_r[r] = l_r[r] * alpha + rs;
#pragma unroll
    for (int j = 0; j < 32; ++j) {
      acc[4 * j + 2 * r] *= alpha;
      acc[4 * j + 2 * r + 1] *= alpha;
    }
  }
}

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
    half_row_max<4>(s, mx, sRed + wg * kBR, row0, t);

    cp_async_wait<0>();
    fence_async_smem();
    __syncthreads();  // V(jt) landed; both halves' row maxima visible; K(jt) free
    if (jt + 1 < t_end) load_tile_sw128<kBC, kD, kNT>(sK, k, a.k_ss, n0 + kBC, a.seq_kv, tid);
    cp_async_commit();

    split_softmax<Op, 4>(s, mx, sRed + (wg ^ 1) * kBR, pP, row0, wg * 32, t, sl2, m_r, l_r, acc);
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

// ---- Warp-specialised kernel (unmasked, non-causal) --------------------------------------------------------------
// Warpgroup 0 is the producer: one thread streams Q (once) and then the keys as chunks of 32 KB through a 4-slot
// ring with TMA and mbarrier full/empty pairs. A 128-key tile is 8 chunks: 4 of K (128 keys x 128 head columns) and
// 4 of V (32 keys x 512 columns). Warpgroups 1-2 consume, 64 query rows per CTA as in the kernel above: consumer c
// computes S for keys 64c..64c+63 of the tile (m64n64k16, Q and K from smem) and owns O columns 256c..256c+255
// (m64n256k16, P and V from smem); the two halves of a row meet through shared memory (two named barriers a tile).
// A consumer keeps one chunk's wgmma queued behind the one running and frees a slot as soon as the wgmma reading it
// has retired, so the tensor cores stream chunk after chunk: per tile P_{j-1}·V_{j-1}, then S_j; they wait only
// during the softmax of S_j (docs/cuda-kernels.md: overlapping it with P·V, and clusters, measured slower).
// Shared memory (227 KB): Q 64 KB + P 16 KB + the ring 128 KB; a whole K or V tile (128 KB each) cannot stay
// resident next to Q, hence the chunks.
// PAIR (two key splits): the splits of a query tile are a cluster of two CTAs and merge in the kernel instead of
// through a workspace and combine_d512: split 1 leaves its unnormalised O (128 KB) and row statistics in its own
// idle ring and P buffer, split 0 reads them over distributed shared memory, merges and writes O (and the LSE).
constexpr int kWsBC = 128, kWsSlots = 4, kWsSlotBytes = 32768;
constexpr int kWsQBytes = kBR * kD * 2, kWsPBytes = kBR * kWsBC * 2;
constexpr int kWsBarBytes = 8 * (2 + 2 * kWsSlots);  // Q, full/empty per slot, the pair's merge
static_assert(kWsSlots * kWsSlotBytes == 256 * 32 * 16, "the ring holds a CTA's O: 256 consumer threads x 32 float4");
constexpr int kWsSmem = kWsQBytes + kWsPBytes + kWsSlots * kWsSlotBytes + kWsBarBytes + 2 * kBR * 4 + 1024;
static_assert(kWsSmem <= 227 * 1024, "shared memory per block");

template <typename T, bool PAIR>
__global__ void __launch_bounds__(384, 1)
    flash_fwd_d512_ws(const FwdArgs a, int splits, float* part_o, float* part_ml,
                      const __grid_constant__ CUtensorMap tq, const __grid_constant__ CUtensorMap tk,
                      const __grid_constant__ CUtensorMap tv) {
  using Op = MmaOp<T>;
  extern __shared__ unsigned char smem_raw[];
  const std::uint32_t raw = smem_u32(smem_raw);
  const std::uint32_t sQ = (raw + 1023) & ~1023u;  // swizzle atoms must be 1024-byte aligned
  const std::uint32_t sP = sQ + kWsQBytes, sRing = sP + kWsPBytes, bars = sRing + kWsSlots * kWsSlotBytes;
  float* sRed = reinterpret_cast<float*>(smem_raw + (bars - raw) + kWsBarBytes);  // [2][64] per-consumer row stats
  const std::uint32_t q_full = bars;
  auto full = [&](int st) { return bars + 8 * (1 + st); };
  auto empty = [&](int st) { return bars + 8 * (1 + kWsSlots + st); };
  auto slot = [&](int st) { return sRing + st * kWsSlotBytes; };
  const std::uint32_t pair_bar = bars + 8 * (1 + 2 * kWsSlots);

  // blockIdx.x = query tile * splits + split (with PAIR, split = the CTA's rank in its cluster).
  const int split = blockIdx.x % splits, m_block = blockIdx.x / splits;
  const int h = blockIdx.y, b = blockIdx.z;
  const int m0 = m_block * kBR;
  const int n_all = (a.seq_kv + kWsBC - 1) / kWsBC;
  const int per = (n_all + splits - 1) / splits;
  const int t_begin = min(n_all, split * per), t_end = min(n_all, t_begin + per);
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, wg = warp >> 2;

  if (tid == 0) {
    mbar_init(q_full, 1);
#pragma unroll
    for (int st = 0; st < kWsSlots; ++st) {
      mbar_init(full(st), 1);
      mbar_init(empty(st), 8);  // one arrival per consumer warp
    }
    if (PAIR) mbar_init(pair_bar, 256);  // every consumer thread of the other CTA
    mbar_init_fence();
  }
  __syncthreads();
  if constexpr (PAIR) cluster_sync();  // both CTAs' barriers are initialised before any arrival from the other

  if (wg == 0) {
    regs_dealloc<24>();
    if (warp == 0 && lane == 0) {
      tma_prefetch_desc(&tq);
      tma_prefetch_desc(&tk);
      tma_prefetch_desc(&tv);
      const int hk = h / a.group;
      mbar_arrive_expect_tx(q_full, kWsQBytes);
#pragma unroll
      for (int c = 0; c < kD / 64; ++c) tma_load_4d(sQ + c * kBR * 128, &tq, q_full, c * 64, m0, h, b);
      int n = 0;  // chunks loaded: ring slot n % kWsSlots, barrier phase (n / kWsSlots) & 1
      auto next_slot = [&]() {
        const int st = n % kWsSlots;
        mbar_wait(empty(st), ((n / kWsSlots) & 1) ^ 1);
        mbar_arrive_expect_tx(full(st), kWsSlotBytes);
        ++n;
        return st;
      };
      auto load_k = [&](int jt) {  // two boxes of 64 columns x 128 keys per chunk
        for (int c = 0; c < 4; ++c) {
          const int st = next_slot();
#pragma unroll
          for (int i = 0; i < 2; ++i)
            tma_load_4d(slot(st) + i * (kWsBC * 128), &tk, full(st), c * 128 + i * 64, jt * kWsBC, hk, b);
        }
      };
      auto load_v = [&](int jt) {  // eight boxes of 64 columns x 32 keys per chunk
        for (int c = 0; c < 4; ++c) {
          const int st = next_slot();
#pragma unroll
          for (int i = 0; i < 8; ++i)
            tma_load_4d(slot(st) + i * (32 * 128), &tv, full(st), i * 64, jt * kWsBC + c * 32, hk, b);
        }
      };
      for (int jt = t_begin; jt < t_end; ++jt) {  // the consumers' order
        load_k(jt);
        load_v(jt);
      }
    }
  } else {
    regs_alloc<240>();
    const int cw = wg - 1;  // S columns 64cw.. of a key tile, O columns 256cw..
    const int g = lane >> 2, t = lane & 3;
    const int row0 = (warp & 3) * 16 + g;  // this thread's rows: row0, row0 + 8
    const float sl2 = a.scale_log2;
    auto release = [&](int chunk) {
      __syncwarp();
      if (lane == 0) mbar_arrive(empty(chunk % kWsSlots));
    };
    int n = 0, freed = 0;  // chunks consumed (issued) and freed
    auto wait_full = [&]() { mbar_wait(full(n % kWsSlots), (n / kWsSlots) & 1); };
    // After issuing a chunk's wgmma: commit, wait for the older groups (all but this one), free their slots.
    auto issued = [&]() {
      wg_commit();
      ++n;
      wg_wait1();
      while (freed < n - 1) release(freed++);
    };
    auto drain = [&]() {
      wg_wait0();
      while (freed < n) release(freed++);
    };

    float acc[128];
#pragma unroll
    for (int i = 0; i < 128; ++i) acc[i] = 0.f;
    float s[32];
    float m_r[2] = {-INFINITY, -INFINITY}, l_r[2] = {0.f, 0.f};
    // K-major descriptors advance by (byte offset >> 4): a k16 step is 32 bytes inside a 64-column block.
    const std::uint64_t dq = make_desc(sQ, 16, 1024);
    auto issue_qk = [&]() {
#pragma unroll
      for (int c = 0; c < 4; ++c) {  // S over head columns 128c..128c+127
        wait_full();
        const std::uint64_t dk = make_desc(slot(n % kWsSlots) + cw * 64 * 128, 16, 1024);
        wg_fence();
#pragma unroll
        for (int kk = 0; kk < 8; ++kk)
          Wg<T>::qk64(s, dq + (((2 * c + (kk >> 2)) * kBR * 128) >> 4) + ((kk & 3) << 1),
                      dk + ((((kk >> 2) * kWsBC * 128)) >> 4) + ((kk & 3) << 1), (c | kk) ? 1 : 0);
        issued();
      }
    };
    auto issue_pv = [&]() {
#pragma unroll
      for (int c = 0; c < 4; ++c) {  // O += P[:, 32c..32c+31] · V[32c..32c+31, 256cw..]
        wait_full();
        // V MN-major: 64-column blocks 32 rows x 128 B apart (leading offset), 8-key groups 1024 B apart.
        const std::uint64_t dv = make_desc(slot(n % kWsSlots) + cw * 4 * (32 * 128), 32 * 128, 1024);
        wg_fence();
#pragma unroll
        for (int kk = 0; kk < 2; ++kk) {
          const std::uint64_t dp = make_desc(sP + (c >> 1) * (kBR * 128) + (c & 1) * 64 + kk * 32, 16, 1024);
          Wg<T>::pv(acc, dp, dv + ((kk * 16 * 128) >> 4), 1);
        }
        issued();
      }
    };
    // Softmax of S_jt (every wgmma retired): P to shared memory, O rescaled.
    auto softmax = [&](int jt) {
      const int n0 = jt * kWsBC;
      if (n0 + kWsBC > a.seq_kv) {
#pragma unroll
        for (int e = 0; e < 32; ++e)
          if (n0 + cw * 64 + (e >> 2) * 8 + t * 2 + (e & 1) >= a.seq_kv) s[e] = -INFINITY;
      }
      float mx[2];
      half_row_max<8>(s, mx, sRed + cw * kBR, row0, t);
      named_bar_sync(1, 256);  // both halves' row maxima visible; both consumers' P_{j-1}·V_{j-1} retired
      unsigned char* pP = smem_raw + (sP - raw);
      split_softmax<Op, 8>(s, mx, sRed + (cw ^ 1) * kBR, pP, row0, cw * 64, t, sl2, m_r, l_r, acc);
      fence_async_smem();
      named_bar_sync(1, 256);  // P visible to both consumers' wgmma; both are past the other's row maxima
    };

    // Software-pipelined so that no wgmma is in flight across the loop's back edge: ptxas serialised every wgmma
    // (C7514) when the loop ended with P·V still running.
    mbar_wait(q_full, 0);
    if (t_begin < t_end) {
      issue_qk();
      drain();
      fence_regs(s);
      fence_regs(acc);
      softmax(t_begin);
      for (int jt = t_begin + 1; jt < t_end; ++jt) {
        fence_regs(acc);  // the rescale stays before the P·V wgmma
        issue_pv();
        issue_qk();
        drain();
        fence_regs(s);  // S and O (the rescale) are touched only after the wait
        fence_regs(acc);
        softmax(jt);
      }
      fence_regs(acc);
      issue_pv();
      drain();
      fence_regs(acc);
    }

    // Row sums: quad, then the other consumer's half through shared memory.
    float lq[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      lq[r] = quad_sum(l_r[r]);
      if (t == 0) sRed[cw * kBR + row0 + r * 8] = lq[r];
    }
    named_bar_sync(1, 256);
    float l_row[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) l_row[r] = lq[r] + sRed[(cw ^ 1) * kBR + row0 + r * 8];
    if constexpr (PAIR) {
      // Thread ct holds the same (row, column) elements in both CTAs: float4 i of every thread sits at
      // [i][ct], 16 consecutive bytes per thread (no bank conflicts).
      const int ct = tid - 128;
      if (split == 1) {
        float4* po = reinterpret_cast<float4*>(smem_raw + (sRing - raw));
#pragma unroll
        for (int i = 0; i < 32; ++i)
          po[i * 256 + ct] = make_float4(acc[4 * i], acc[4 * i + 1], acc[4 * i + 2], acc[4 * i + 3]);
        reinterpret_cast<float4*>(smem_raw + (sP - raw))[ct] = make_float4(m_r[0], m_r[1], l_row[0], l_row[1]);
        mbar_arrive_cluster(cluster_addr(pair_bar, 0));
        mbar_wait_cluster(pair_bar, 0);  // split 0 has read them: this shared memory must outlive that
        return;
      }
      mbar_wait_cluster(pair_bar, 0);
      const float4 st = ld_cluster_f4(cluster_addr(sP, 1) + ct * 16);
      const float m1[2] = {st.x, st.y}, l1[2] = {st.z, st.w};
      float w0[2], w1[2];
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const float mn = fmaxf(m_r[r], m1[r]);
        const float ms = mn == -INFINITY ? 0.f : mn * sl2;
        w0[r] = exp2f(m_r[r] * sl2 - ms);
        w1[r] = exp2f(m1[r] * sl2 - ms);
        m_r[r] = mn;
        l_row[r] = l_row[r] * w0[r] + l1[r] * w1[r];
      }
      const std::uint32_t src = cluster_addr(sRing, 1) + ct * 16;
#pragma unroll
      for (int i = 0; i < 32; ++i) {  // acc[4i + 2r + e] is row r's
        const float4 x = ld_cluster_f4(src + i * 256 * 16);
        acc[4 * i] = acc[4 * i] * w0[0] + x.x * w1[0];
        acc[4 * i + 1] = acc[4 * i + 1] * w0[0] + x.y * w1[0];
        acc[4 * i + 2] = acc[4 * i + 2] * w0[1] + x.z * w1[1];
        acc[4 * i + 3] = acc[4 * i + 3] * w0[1] + x.w * w1[1];
      }
      mbar_arrive_cluster(cluster_addr(pair_bar, 1));
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int lrow = row0 + r * 8;
      const float l = l_row[r];
      const int row = m0 + lrow;
      if (row >= a.seq_q) continue;
      if (!PAIR && splits > 1) {
        const std::int64_t rid = ((static_cast<std::int64_t>(split) * gridDim.z + b) * gridDim.y + h) * a.seq_q + row;
        float* po = part_o + rid * kD + cw * 256;
#pragma unroll
        for (int j = 0; j < 32; ++j)
          *reinterpret_cast<float2*>(po + j * 8 + t * 2) = make_float2(acc[4 * j + 2 * r], acc[4 * j + 2 * r + 1]);
        if (cw == 0 && t == 0) *reinterpret_cast<float2*>(part_ml + rid * 2) = make_float2(m_r[r], l);
        continue;
      }
      const float inv = l > 0.f ? 1.f / l : 0.f;
      if (a.lse != nullptr && cw == 0 && t == 0)
        a.lse[(static_cast<std::int64_t>(b) * gridDim.y + h) * a.seq_q + row] = row_lse(m_r[r], l, sl2);
      T* orow = HeadPtrs<T>(a, b, h).o + static_cast<std::int64_t>(row) * a.o_ss + cw * 256;
#pragma unroll
      for (int j = 0; j < 32; ++j)
        *reinterpret_cast<std::uint32_t*>(orow + j * 8 + t * 2) =
            Op::pack(acc[4 * j + 2 * r] * inv, acc[4 * j + 2 * r + 1] * inv);
    }
  }
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

// Runs `kern_launch(splits, part_o, part_ml)`; with splits > 1 the keys are split, partial rows go to a pooled
// workspace and combine_d512 merges them.
template <typename T, typename KernLaunch>
cudaError_t with_splits(const FwdArgs& a, int batch, int heads, int splits, cudaStream_t stream,
                        KernLaunch&& kern_launch) {
  if (splits <= 1) return kern_launch(1, nullptr, nullptr);
  const std::size_t rows = static_cast<std::size_t>(splits) * batch * heads * a.seq_q;
  void* ws = nullptr;
  cudaError_t e = workspace_alloc(&ws, rows * (kD + 2) * sizeof(float), stream);
  if (e != cudaSuccess) return e;
  float* part_o = static_cast<float*>(ws);
  float* part_ml = part_o + rows * kD;
  e = kern_launch(splits, part_o, part_ml);
  if (e == cudaSuccess) {
    combine_d512<T><<<dim3(a.seq_q, heads, batch), 128, 0, stream>>>(a, splits, part_o, part_ml);
    e = cudaGetLastError();
  }
  cudaError_t ef = cudaFreeAsync(ws, stream);
  return e != cudaSuccess ? e : ef;
}

template <typename T, bool CAUSAL, int MM>
cudaError_t launch(const FwdArgs& a, int batch, int heads, int force_splits, cudaStream_t stream) {
  constexpr auto kern = flash_fwd_d512_sm90<T, CAUSAL, MM>;
  cudaError_t e = allow_smem<kern>(kSmem);
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
  // V is read MN-major: LBO = stride between 64-column blocks, SBO = stride between 8-row groups
  // (checked on the device: the swapped reading gives wrong results).
  return with_splits<T>(a, batch, heads, splits, stream, [&](int sp, float* po, float* pml) {
    kern<<<dim3(m_blocks * sp, heads, batch), kNT, kSmem, stream>>>(a, kBC * 128, 1024, sp, po, pml);
    return cudaGetLastError();
  });
}

template <typename T, bool CAUSAL>
cudaError_t launch_mm(const FwdArgs& a, int batch, int heads, int mask_mode, int force_splits, cudaStream_t s) {
  if (mask_mode == kBoolMask) return launch<T, CAUSAL, kBoolMask>(a, batch, heads, force_splits, s);
  if (mask_mode == kAddMask) return launch<T, CAUSAL, kAddMask>(a, batch, heads, force_splits, s);
  return launch<T, CAUSAL, kNoMask>(a, batch, heads, force_splits, s);
}

// Key splits for the warp-specialised kernel: m_blocks x heads x batch CTAs per split, one per SM at a time, n key
// tiles. Minimises waves x (tiles per split + ~1 tile of start/end) plus the combine pass, which moves ~4 KB per row
// and split (~15 MB per tile-time of one CTA, ~5 us, at 3 TB/s).
int choose_ws_splits(long long ctas, int sms, int n_tiles, long long rows) {
  int best = 1;
  double best_cost = 0.0;
  for (int sp = 1; sp <= std::min(8, n_tiles); ++sp) {
    const long long waves = (ctas * sp + sms - 1) / sms;
    double cost = static_cast<double>(waves) * ((n_tiles + sp - 1) / sp + 1);
    if (sp > 1) cost += static_cast<double>(rows) * sp * 4096.0 / 15e6;
    if (sp == 1 || cost < best_cost) best = sp, best_cost = cost;
  }
  return best;
}

// The launch of flash_fwd_d512_ws<T, true>: clusters of two CTAs along x (a query tile's two splits).
struct PairLaunch : LaunchWith {
  PairLaunch(dim3 grid, cudaStream_t stream) : LaunchWith(pair_cluster(), grid, 384, kWsSmem, stream) {}
  static cudaLaunchAttribute pair_cluster() {
    cudaLaunchAttribute cluster{};
    cluster.id = cudaLaunchAttributeClusterDimension;
    cluster.val.clusterDim.x = 2;
    cluster.val.clusterDim.y = 1;
    cluster.val.clusterDim.z = 1;
    return cluster;
  }
};

// How many clusters of two PAIR CTAs the current device runs at once (0 if none), asked once per device: one CTA
// fills an SM, and a cluster's two SMs must share a GPC, so this can be less than half the SMs.
template <typename T>
int pair_capacity() {
  static std::atomic<int> cached[64];  // 0: not asked yet; else capacity + 1
  int dev = -1;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= 64) return 0;
  const int c = cached[dev].load(std::memory_order_relaxed);
  if (c > 0) return c - 1;
  constexpr auto pkern = flash_fwd_d512_ws<T, true>;
  int n = 0;
  if (allow_smem<pkern>(kWsSmem) == cudaSuccess) {
    const PairLaunch launch(dim3(2 * sm_count()), nullptr);
    if (cudaOccupancyMaxActiveClusters(&n, pkern, &launch.cfg) != cudaSuccess) {
      (void)cudaGetLastError();  // not sticky; treat as no pairs
      n = 0;
    }
  }
  cached[dev].store(n + 1, std::memory_order_relaxed);
  return n;
}

// kAuto: two splits merge in the kernel where pairs fit the waves; kNever: through combine_d512; kAlways: in the
// kernel whenever there are two splits (dev variants, for side-by-side timing).
enum class PairMode { kAuto, kNever, kAlways };

template <typename T>
cudaError_t launch_ws(const FwdArgs& a, int batch, int heads, int force_splits, cudaStream_t stream,
                      PairMode pair = PairMode::kAuto) {
  constexpr bool bf16 = std::is_same<T, __nv_bfloat16>::value;
  const int heads_kv = heads / a.group;
  CUtensorMap tq, tk, tv;
  if (!make_map(&tq, a.q, bf16, kD, a.seq_q, heads, batch, a.q_ss, a.q_sh, a.q_sb, kBR, 64) ||
      !make_map(&tk, a.k, bf16, kD, a.seq_kv, heads_kv, batch, a.k_ss, a.k_sh, a.k_sb, kWsBC, 64) ||
      !make_map(&tv, a.v, bf16, kD, a.seq_kv, heads_kv, batch, a.v_ss, a.v_sh, a.v_sb, 32, 64))
    return cudaErrorNotSupported;
  constexpr auto kern = flash_fwd_d512_ws<T, false>;
  cudaError_t e = allow_smem<kern>(kWsSmem);
  if (e != cudaSuccess) return e;
  const int m_blocks = (a.seq_q + kBR - 1) / kBR;
  const int n_tiles = (a.seq_kv + kWsBC - 1) / kWsBC;
  const long long ctas = static_cast<long long>(m_blocks) * heads * batch;
  const long long rows = static_cast<long long>(batch) * heads * a.seq_q;
  const int splits =
      force_splits > 0 ? std::min(force_splits, n_tiles) : choose_ws_splits(ctas, sm_count(), n_tiles, rows);
  if (static_cast<long long>(m_blocks) * splits > 0x7fffffffLL) return cudaErrorNotSupported;  // grid.x
  // Two splits merge in the kernel (PAIR) unless pairs of CTAs would take more waves than single ones.
  if (splits == 2 && pair != PairMode::kNever) {
    const int pairs = pair_capacity<T>();
    if (pair == PairMode::kAlways ||
        (pairs > 0 && (ctas + pairs - 1) / pairs <= (2 * ctas + sm_count() - 1) / sm_count())) {
      constexpr auto pkern = flash_fwd_d512_ws<T, true>;
      if ((e = allow_smem<pkern>(kWsSmem)) != cudaSuccess) return e;
      const PairLaunch launch(dim3(m_blocks * 2, heads, batch), stream);
      return cudaLaunchKernelEx(&launch.cfg, pkern, a, 2, static_cast<float*>(nullptr), static_cast<float*>(nullptr),
                                tq, tk, tv);
    }
  }
  return with_splits<T>(a, batch, heads, splits, stream, [&](int sp, float* po, float* pml) {
    kern<<<dim3(m_blocks * sp, heads, batch), 384, kWsSmem, stream>>>(a, sp, po, pml, tq, tk, tv);
    return cudaGetLastError();
  });
}

}  // namespace

// Unmasked non-causal calls take the warp-specialised kernel (1.5-2x the column-split kernel, H200); masked and
// causal calls, and any call when no tensor map can be made, the column-split kernel. Variants (dev harness):
// 2..9 force that many key splits on the column-split kernel, 10 never splits it, 11 takes it with its own split
// choice; 12 is the warp-specialised kernel never split, 13 with its own split choice but never a pair (two
// splits through combine_d512), 14 two splits as a pair.
cudaError_t run_hdim512_sm90(const FwdArgs& a, int batch, int heads, bool bf16, bool causal, int mask_mode,
                             int variant, cudaStream_t s) {
  if (mask_mode == kNoMask && !causal && (variant < 2 || (variant >= 12 && variant <= 14))) {
    const int force = variant == 12 ? 1 : variant == 14 ? 2 : 0;
    const PairMode pair = variant == 13 ? PairMode::kNever : variant == 14 ? PairMode::kAlways : PairMode::kAuto;
    const cudaError_t e = bf16 ? launch_ws<__nv_bfloat16>(a, batch, heads, force, s, pair)
                               : launch_ws<__half>(a, batch, heads, force, s, pair);
    if (e != cudaErrorNotSupported) return e;
  }
  const int force = (variant >= 2 && variant <= 9) ? variant : variant == 10 ? 1 : 0;
  if (bf16) return causal ? launch_mm<__nv_bfloat16, true>(a, batch, heads, mask_mode, force, s)
                          : launch_mm<__nv_bfloat16, false>(a, batch, heads, mask_mode, force, s);
  return causal ? launch_mm<__half, true>(a, batch, heads, mask_mode, force, s)
                : launch_mm<__half, false>(a, batch, heads, mask_mode, force, s);
}

}  // namespace attnsel::cuda::detail
