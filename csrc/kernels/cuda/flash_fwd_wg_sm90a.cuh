// Head sizes up to 256 on Hopper (sm_90a): TMA loads, wgmma, warp specialisation (see flash_fwd_ws). Built for
// D = 64/80/96/128/256; a smaller real head size is zero-padded by the tensor copy engine (columns past it read as 0).
// S = Q·K^T runs as SS-wgmma (both operands in swizzled smem); P feeds O += P·V from registers (the S accumulator
// layout is the wgmma A-fragment layout) with V read MN-major from smem. Tiles are stored as column chunks of
// [rows][CW]: 64 columns with the 128-byte swizzle; for D=96 (not a multiple of 64) 32 columns with the 64-byte
// swizzle, for D=80 16 columns with the 32-byte one, so one wgmma of N=D covers all of O (wgmma's canonical layouts).
// Included by flash_fwd_wg{64,80,96,128,256}_sm90a.cu, one padded head size each (they compile in parallel).
#pragma once

#include <cuda.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "flash_fwd_launch.h"
#include "sm90_common.cuh"
#include "tile_plan.h"

namespace attnsel::cuda::detail {

// A [B, H, S, d] operand as a 4-D tensor map (d innermost) read in boxes of `cols` columns x `rows` rows, swizzled
// by the box's row width (64 columns: 128 bytes, 32: 64, 16: 32); rows past S and columns past d are zero-filled
// (flash_fwd_wg_sm90a.cu). False when no tensor map can be made.
bool make_map(CUtensorMap* m, const void* base, bool bf16, int d, int seq, int heads, int batch, std::int64_t ss,
              std::int64_t sh, std::int64_t sb, int rows, int cols);

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
    static __device__ __forceinline__ void pv(float (&o)[D / 2], const std::uint32_t (&p)[4], std::uint64_t b, \
                                              int acc = 1) {                                               \
      wgmma_rs_m64n##D##k16_##SUF##_t1(o, p, b, acc);                                                      \
    }                                                                                                      \
  };
ATTNSEL_WG_OPS(__nv_bfloat16, bf16, 128, 64)
ATTNSEL_WG_OPS(__nv_bfloat16, bf16, 128, 80)
ATTNSEL_WG_OPS(__nv_bfloat16, bf16, 128, 96)
ATTNSEL_WG_OPS(__nv_bfloat16, bf16, 128, 128)
ATTNSEL_WG_OPS(__nv_bfloat16, bf16, 64, 256)
ATTNSEL_WG_OPS(__nv_bfloat16, bf16, 80, 256)
ATTNSEL_WG_OPS(__half, f16, 128, 64)
ATTNSEL_WG_OPS(__half, f16, 128, 80)
ATTNSEL_WG_OPS(__half, f16, 128, 96)
ATTNSEL_WG_OPS(__half, f16, 128, 128)
ATTNSEL_WG_OPS(__half, f16, 64, 256)
ATTNSEL_WG_OPS(__half, f16, 80, 256)
#undef ATTNSEL_WG_OPS

// Barrier among the `n` threads of one warpgroup (ids 1.. : 0 is __syncthreads).
__device__ __forceinline__ void named_bar_sync(int id, int n) { asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(n) : "memory"); }
__device__ __forceinline__ void named_bar_arrive(int id, int n) {
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(n) : "memory");
}
__device__ __forceinline__ void wg_wait1() { asm volatile("wgmma.wait_group.sync.aligned 1;\n" ::: "memory"); }
// Keeps the register A fragment of an in-flight wgmma alive (and unmoved) until after the wait.
template <int N>
__device__ __forceinline__ void fence_frag(std::uint32_t (&r)[N][4]) {
#pragma unroll
  for (int i = 0; i < N; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) asm volatile("" : "+r"(r[i][j])::"memory");
}

// Full additive masks of 2-byte values with contiguous keys (the usual [B, H, Sq, Sk] tensor): the mask values of
// the next key tile are copied into shared memory with cp.async right after the softmax of the current tile, so the
// loads run under a whole key tile. (Read from global memory in the softmax itself, a full additive mask ran at 50
// TFLOP/s at D=64, a fifth of cuDNN's 265.) AddMaskStage: each thread copies the two keys of each of its score pairs,
// 4 bytes at a time (2 rows x BC/8 groups per key tile), stored [pair][thread of the warpgroup], so a warp's reads
// are contiguous words (no bank conflicts).
template <typename T, int BC>
struct AddMaskStage {
  static constexpr int PAIRS = BC / 4;
  static constexpr int BYTES = PAIRS * 128 * 4;  // per consumer warpgroup
  const unsigned char* r0 = nullptr;  // mask rows g and g + 8 of the warp (clamped to the sequence), at key t * 2
  const unsigned char* r1 = nullptr;
  std::uint32_t dst = 0;  // this thread's word of pair 0
  int t = 0;
  __device__ __forceinline__ void init(std::uint32_t wg_smem, int warp_in_wg, int lane) {
    dst = wg_smem + (warp_in_wg * 32 + lane) * 4;
    t = lane & 3;
  }
  // Whether the item's mask takes this path: 2-byte values, keys contiguous, pairs 4-byte aligned.
  static __device__ __forceinline__ bool usable(const MaskView<T, kAddMask>& m) {
    return !m.f32 && m.sk == 1 && m.sq % 2 == 0 && (reinterpret_cast<std::uintptr_t>(m.base) & 3) == 0;
  }
  // The item: its mask, this thread's first row (its second is 8 on), the query length.
  __device__ __forceinline__ void set_rows(const MaskView<T, kAddMask>& m, int row, int seq_q) {
    r0 = reinterpret_cast<const unsigned char*>(m.base) + 2 * (min(row, seq_q - 1) * m.sq + t * 2);
    r1 = reinterpret_cast<const unsigned char*>(m.base) + 2 * (min(row + 8, seq_q - 1) * m.sq + t * 2);
  }
  // Copies of key tile n0 .. n0+BC-1; keys past seq_kv are zero-filled (the softmax cuts them). One slot.
  __device__ __forceinline__ void issue(int n0, int seq_kv, int = 0) const {
    const bool full = n0 + BC <= seq_kv;
#pragma unroll
    for (int p = 0; p < PAIRS; ++p) {
      const int col = n0 + (p >> 1) * 8;
      const unsigned char* src = ((p & 1) ? r1 : r0) + 2 * col;
      const int left = seq_kv - (col + t * 2);
      const int n = full ? 4 : left >= 2 ? 4 : left == 1 ? 2 : 0;
      asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst + p * 512),
                   "l"(n > 0 ? src : r0), "r"(n) : "memory");
    }
    asm volatile("cp.async.commit_group;\n" ::: "memory");
  }
  template <int N = 0>
  static __device__ __forceinline__ void wait() { asm volatile("cp.async.wait_group 0;\n" ::: "memory"); }
  __device__ __forceinline__ float2 pair(int p, int = 0) const {
    std::uint32_t w;
    asm volatile("ld.shared.u32 %0, [%1];\n" : "=r"(w) : "r"(dst + p * 512) : "memory");
    if constexpr (std::is_same<T, __nv_bfloat16>::value)
      return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&w));
    else
      return __half22float2(*reinterpret_cast<const __half2*>(&w));
  }
};

// AddMaskStageWide (head size 64, where the mask's copies are a large share of a key tile's work): each warp stages
// its own 16 rows x BC keys, row r at r * BC * 2 bytes, its 16-byte chunk c at chunk c ^ (r & 7) (a warp's reads of
// one key group then hit 32 banks). Where rows are 16-byte aligned (the row stride a multiple of 8 keys), the warp
// copies them in 16-byte pieces, 8 per thread per key tile at BC = 128; otherwise each thread copies its own pairs,
// 4 bytes at a time, into the same layout. Either way a thread reads its pairs with one 4-byte shared load each.
// DEPTH slots of a key tile each: with DEPTH > 1 tile j + DEPTH is copied while tile j is read (one cp.async group
// per tile; the wait lets the newest DEPTH - 1 stay in flight).
template <typename T, int BC, int DEPTH = 1>
struct AddMaskStageWide {
  static constexpr int PAIRS = BC / 4;
  static constexpr int ROWB = BC * 2;  // bytes of one staged row
  static constexpr int SLOT = 4 * 16 * ROWB;  // one key tile per consumer warpgroup: 4 warps x 16 rows
  static constexpr int BYTES = DEPTH * SLOT;
  // Few registers held across the key loop (the tile body runs at the consumers' register limit): lane indices
  // are read again where needed.
  const char* rows = nullptr;  // the item's mask at the warp's first staged row
  int sq = 0;  // its row stride (elements; usable() keeps it below 2^31)
  int rows_left = 0;  // staged rows past this one are clamped to it (the query length's end)
  std::uint32_t mine = 0;  // this thread's word of pair 0
  bool wide = false;  // 16-byte copies
  static __device__ __forceinline__ int lane() { return static_cast<int>(threadIdx.x) & 31; }
  __device__ __forceinline__ void init(std::uint32_t wg_smem, int warp_in_wg, int lane_) {
    mine = wg_smem + warp_in_wg * 16 * ROWB + (lane_ >> 2) * ROWB + (lane_ & 3) * 4;
  }
  // Whether the item's mask takes this path: 2-byte values, keys contiguous, pairs 4-byte aligned.
  static __device__ __forceinline__ bool usable(const MaskView<T, kAddMask>& m) {
    return !m.f32 && m.sk == 1 && m.sq % 2 == 0 && m.sq < (std::int64_t{1} << 31) &&
           (reinterpret_cast<std::uintptr_t>(m.base) & 3) == 0;
  }
  // The item: its mask, this thread's first row (the warp's first staged row is lane / 4 before it), the query length.
  __device__ __forceinline__ void set_rows(const MaskView<T, kAddMask>& m, int row, int seq_q) {
    const int first = min(row - (lane() >> 2), seq_q - 1);
    rows = m.base + 2 * static_cast<std::int64_t>(first) * m.sq;
    sq = static_cast<int>(m.sq);
    rows_left = seq_q - 1 - first;
    wide = m.sq % 8 == 0 && (reinterpret_cast<std::uintptr_t>(m.base) & 15) == 0;
  }
  __device__ __forceinline__ const char* row(int r, int col) const {  // the warp's staged row r at key col
    return rows + 2 * (static_cast<std::int64_t>(min(r, rows_left)) * sq + col);
  }
  __device__ __forceinline__ std::uint32_t word(int p, int slot = 0) const {  // pair p: key group p >> 1, row g + 8 * (p & 1)
    return mine + slot * SLOT + (p & 1) * 8 * ROWB + (((p >> 1) ^ (lane() >> 2)) << 4);
  }
  // Copies of key tile n0 .. n0+BC-1 into slot; keys past seq_kv are zero-filled (the softmax cuts them).
  __device__ __forceinline__ void issue(int n0, int seq_kv, int slot = 0) const {
    __syncwarp();  // every lane is done reading the slot's previous tile
    const bool full = n0 + BC <= seq_kv;
    const int lane = AddMaskStageWide::lane();
    if (wide) {
      static_assert(BC % 64 == 0, "the chunk swizzle needs a multiple of 8 chunks per row");
      constexpr int CPR = BC / 8;  // 16-byte chunks per row
      const int c = lane % CPR;
      const int left = seq_kv - (n0 + c * 8);
      const int n = full ? 16 : left >= 8 ? 16 : left > 0 ? 2 * left : 0;
      const std::uint32_t warp_smem = mine + slot * SLOT - (lane >> 2) * ROWB - (lane & 3) * 4;
#pragma unroll
      for (int i = 0; i < 16 * CPR / 32; ++i) {
        const int r = lane / CPR + i * (32 / CPR);
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n"
                     ::"r"(warp_smem + r * ROWB + ((c ^ (r & 7)) << 4)), "l"(n > 0 ? row(r, n0 + c * 8) : rows), "r"(n)
                     : "memory");
      }
    } else {  // rows g and g + 8 of the warp, the two keys from t * 2 of each group of 8
      const int g = lane >> 2, t = lane & 3;
      const char* row_a = row(g, n0 + t * 2);
      const char* row_b = row(g + 8, n0 + t * 2);
#pragma unroll
      for (int p = 0; p < PAIRS; ++p) {
        const int col = (p >> 1) * 8;
        const int left = seq_kv - (n0 + col + t * 2);
        const int n = full ? 4 : left >= 2 ? 4 : left == 1 ? 2 : 0;
        asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(word(p, slot)),
                     "l"(n > 0 ? ((p & 1) ? row_b : row_a) + 2 * col : rows), "r"(n) : "memory");
      }
    }
    asm volatile("cp.async.commit_group;\n" ::: "memory");
  }
  template <int N = 0>  // the newest N key tiles may still be in flight
  static __device__ __forceinline__ void wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
    __syncwarp();  // the other lanes' copies are visible
  }
  __device__ __forceinline__ float2 pair(int p, int slot = 0) const {
    std::uint32_t w;
    asm volatile("ld.shared.u32 %0, [%1];\n" : "=r"(w) : "r"(word(p, slot)) : "memory");
    if constexpr (std::is_same<T, __nv_bfloat16>::value)
      return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&w));
    else
      return __half22float2(*reinterpret_cast<const __half2*>(&w));
  }
};

// Warp-specialised kernel (FA3's structure). Warpgroup 0 is the producer: one thread streams Q and a
// STAGES-deep ring of K and V tiles in with the bulk tensor copy engine (TMA, 128-byte swizzle = the layout
// wgmma reads), completion counted on mbarriers. Warpgroups 1..NC consume, 64 query rows each, with no
// block-wide barrier in the loop. Within a warpgroup, S_j = Q·K_j^T and O += P_{j-1}·V_{j-1} are issued back
// to back and the softmax of S_j overlaps the P·V. (Consumers taking turns through named barriers, FA3's
// "ping-pong", measured within +-3% and -3% at D=64 unmasked; flash_fwd_ws_tile keeps it for D=64 additive masks.)
//
// PERSIST: the grid is about one CTA per SM and each CTA walks the work items (b, h, query tile) w = blockIdx.x,
// blockIdx.x + gridDim.x, ...; the K/V ring and its barrier phases run on across items, so the producer loads the
// next item's Q and first K/V tiles while the consumers finish this item's last P·V and store O. Q has QBUF
// buffers (2 where shared memory allows): with one, the consumers free it when the item's last Q·K^T has retired.
// AHEAD (persistent, two Q buffers): each item's S_0 = Q·K_0^T is issued right after the previous item's last P·V,
// so the tensor cores run it while the consumers wait for that P·V and store O (short key loops: +6-8%).
// Without PERSIST there is one CTA per work item (the grid is (query tiles, heads, batch)): built only for full
// boolean masks, where it ran faster than flash_fwd_ws_tile at D=64 (see run_t).
template <int D, int BC, int NC, int STAGES, int QBUF = 1>
struct WsCfg {
  static constexpr int BR = 64 * NC, NT = 128 * (NC + 1);
  // Column chunk width (elements) and its row bytes = the swizzle span: 64 / 128 B, 32 / 64 B (D=96), 16 / 32 B (D=80).
  static constexpr int CW = D % 64 == 0 ? 64 : D % 32 == 0 ? 32 : 16, ROWB = CW * 2;
  static_assert(D % CW == 0, "padded head size");
  static constexpr std::uint32_t Q_BYTES = BR * D * 2, KV_BYTES = BC * D * 2;
  static constexpr int N_BARS = 2 * QBUF + 4 * STAGES;  // q_full, q_empty [QBUF]; k/v full/empty [STAGES]
  static constexpr int TILES = QBUF * Q_BYTES + 2 * STAGES * KV_BYTES;
  static constexpr int SMEM = TILES + 1024 + 8 * N_BARS;
  // Masked kernels: a key-padding bias row per consumer, double-buffered by key tile (after the barriers).
  static constexpr int BIAS_OFFSET = (TILES + 8 * N_BARS + 15) / 16 * 16;
  static constexpr int SMEM_MASKED = SMEM + 16 + NC * 2 * BC * 4;
  // Full additive masks: the cp.async staging of AddMaskStage per consumer, after the bias rows, where it fits
  // (not at D=256, nor with two Q buffers at D=128).
  static constexpr int ADD_OFFSET = BIAS_OFFSET + NC * 2 * BC * 4;
  static constexpr int SMEM_ADD = SMEM_MASKED + NC * (BC / 4) * 128 * 4;
  static constexpr bool ADD_STAGE = SMEM_ADD <= 227 * 1024;
  // flash_fwd_ws_tile at D=64 stages 3 key tiles ahead (AddMaskStageWide's slots): +20% over 1 (docs).
  static constexpr int ADD_DEPTH_TILE = D == 64 ? 3 : 1;
  static constexpr int SMEM_ADD_TILE = SMEM_MASKED + NC * (BC / 4) * 128 * 4 * ADD_DEPTH_TILE;
  static constexpr bool ADD_STAGE_TILE = SMEM_ADD_TILE <= 227 * 1024;
  // The persistent kernels' output staging (flash_fwd_ws's TMA_O): each consumer's 64 x D tile after everything else
  // the mask mode MM uses, where it fits.
  static constexpr int END_MASKED = BIAS_OFFSET + NC * 2 * BC * 4;
  static constexpr int END_ADD = ADD_OFFSET + NC * (BC / 4) * 128 * 4;
  template <int MM>
  static constexpr int O_OFFSET =
      ((MM == kNoMask ? TILES + 8 * N_BARS : MM == kAddMask && ADD_STAGE ? END_ADD : END_MASKED) + 1023) / 1024 *
      1024;
  template <int MM>
  static constexpr int SMEM_TMA_O = O_OFFSET<MM> + NC * 64 * D * 2 + 1024;
  template <int MM>
  static constexpr bool TMA_O = SMEM_TMA_O<MM> <= 227 * 1024;
  // Register split of the 64K-register file: the producer needs few, the consumers hold S, P and O.
  static constexpr int PRODUCER_REGS = NC == 2 ? 24 : 32;
  static constexpr int CONSUMER_REGS = NC == 2 ? 240 : 160;
};

// 1 / (row sum) of a thread's two rows of O from `row` on (0 for a row that saw no key), and their log-sum-exp into
// the LSE (when wanted) at (batch * heads + head) = bh.
__device__ __forceinline__ void finish_rows(const float (&l_r)[2], const float (&m_r)[2], float sl2, float* lse,
                                            std::int64_t bh, int row, int seq_q, int t, float (&inv)[2]) {
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const float l = quad_sum(l_r[r]);
    inv[r] = l > 0.f ? 1.f / l : 0.f;
    if (lse != nullptr && t == 0 && row + r * 8 < seq_q) lse[bh * seq_q + row + r * 8] = row_lse(m_r[r], l, sl2);
  }
}

// O through the copy engine (TMA_O): one consumer warpgroup's 64 rows of normalised O into its staging tile in
// shared memory ([D/CW] column chunks `chunk` bytes apart, rows of CW * 2 bytes swizzled as Q's by the row width, so
// a warp's 4-byte stores hit 32 banks), then one thread stores the tile through the tensor map `to` (rows past seq_q
// and columns past head_dim are cut by the map). The caller makes sure the copy engine has read the tile's previous
// contents (bulk_wait_read0 by thread tw == 0) before any thread of the warpgroup calls this, and barrier `bar`
// orders the stores.
template <typename T, int D, int CW>
__device__ __forceinline__ void store_o_tma(const float (&acc)[D / 2], const float (&inv)[2], std::uint32_t sO,
                                            int chunk, int lr0, int t, int tw, int bar, const CUtensorMap* to,
                                            int row0, int h, int b) {
  constexpr int ROWB = CW * 2, UNITS = CW / 8;  // bytes per row, 16-byte units per row
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int lr = lr0 + r * 8;
    // The copy engine's 128/64/32-byte swizzle: a row's 16-byte units XORed with address bits 7 and up.
    const int sw = ROWB == 128 ? (lr & 7) : ROWB == 64 ? ((lr >> 1) & 3) : ((lr >> 2) & 1);
#pragma unroll
    for (int j = 0; j < D / 8; ++j) {
      const std::uint32_t at = sO + (j / UNITS) * chunk + lr * ROWB + (((j % UNITS) ^ sw) << 4) + t * 4;
      asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(at),
                   "r"(MmaOp<T>::pack(acc[4 * j + 2 * r] * inv[r], acc[4 * j + 2 * r + 1] * inv[r]))
                   : "memory");
    }
  }
  fence_async_smem();
  named_bar_sync(bar, 128);
  if (tw == 0) {
#pragma unroll
    for (int c = 0; c < D / CW; ++c) tma_store_4d(to, sO + c * chunk, c * CW, row0, h, b);
    bulk_commit();
  }
}

// One CTA per work item (b, h, 128-query tile), the grid is (query tiles, heads, batch): the kernel body as it was
// before the persistent schedule (commit ba36df9; its D=64 build gives the same SASS), with the column chunks of the
// 80/96 kernels. Everything about the item is fixed at the start and nothing is carried across items. Unmasked it
// ran 11% faster at D=64 (SD-UNet) and 2% at D=128 (Flux) than the persistent kernel's body with its loop compiled
// out (flash_fwd_ws without PERSIST), side by side on an H200 (docs/cuda-kernels.md); run_t says where each runs.
// TMA_O (unless a.o_from_registers): O leaves through the Q tile (each consumer's own rows, free once its last Q·K^T
// has retired) and the tensor map `to`.
template <typename T, int D, int BC, int NC, int STAGES, bool CAUSAL, int MM, bool TMA_O = false>
__global__ void __launch_bounds__((NC + 1) * 128, 1)
    flash_fwd_ws_tile(const FwdArgs a, const __grid_constant__ CUtensorMap tq, const __grid_constant__ CUtensorMap tk,
                      const __grid_constant__ CUtensorMap tv, const __grid_constant__ CUtensorMap to) {
  using C = WsCfg<D, BC, NC, STAGES, 1>;
  using Ops = WgOps<T, BC, D>;
  using Op = MmaOp<T>;
  constexpr int BR = C::BR;
  constexpr std::uint32_t KV_BYTES = C::KV_BYTES;
  constexpr int CW = C::CW, ROWB = C::ROWB;

  extern __shared__ unsigned char smem_raw[];
  const std::uint32_t sQ = (smem_u32(smem_raw) + 1023) & ~1023u;  // the swizzle pattern repeats every 1024 bytes
  const std::uint32_t sK = sQ + C::Q_BYTES, sV = sK + STAGES * KV_BYTES;
  const std::uint32_t q_full = sV + STAGES * KV_BYTES;  // WsCfg's layout with QBUF = 1 (q_empty unused)
  auto k_full = [&](int st) { return q_full + 8 * (2 + st); };
  auto k_empty = [&](int st) { return q_full + 8 * (2 + STAGES + st); };
  auto v_full = [&](int st) { return q_full + 8 * (2 + 2 * STAGES + st); };
  auto v_empty = [&](int st) { return q_full + 8 * (2 + 3 * STAGES + st); };

  // A launch of 192-row tiles may be followed by one of 128-row tiles over the same heads' later rows
  // (mixed_height_rows): its blocks may take the SMs this launch's blocks leave once they have all started.
  if constexpr (NC == 3) asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
  const int m_block = CAUSAL ? (gridDim.x - 1 - blockIdx.x) : blockIdx.x;  // causal: longest key loops first
  const int h = blockIdx.y, b = blockIdx.z;
  const int hk = h / a.group;  // K/V tensor-map coordinate
  const int m0 = m_block * BR;
  const int n_tiles = key_tiles<BR, BC, CAUSAL>(m0, a.seq_kv);
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int wg = warp >> 2;

  if (tid == 0) {
    mbar_init(q_full, 1);
#pragma unroll
    for (int st = 0; st < STAGES; ++st) {
      mbar_init(k_full(st), 1);
      mbar_init(v_full(st), 1);
      mbar_init(k_empty(st), 4 * NC);  // one arrival per consumer warp
      mbar_init(v_empty(st), 4 * NC);
    }
    mbar_init_fence();
  }
  __syncthreads();

  if (wg == 0) {
    regs_dealloc<C::PRODUCER_REGS>();
    if (warp == 0 && lane == 0) {
      tma_prefetch_desc(&tq);
      tma_prefetch_desc(&tk);
      tma_prefetch_desc(&tv);
      mbar_arrive_expect_tx(q_full, C::Q_BYTES);
#pragma unroll
      for (int c = 0; c < D / CW; ++c) tma_load_4d(sQ + c * BR * ROWB, &tq, q_full, c * CW, m0, h, b);
      for (int jt = 0; jt < n_tiles; ++jt) {
        const int st = jt % STAGES;
        const std::uint32_t ph = (jt / STAGES) & 1;
        mbar_wait(k_empty(st), ph ^ 1);
        mbar_arrive_expect_tx(k_full(st), KV_BYTES);
#pragma unroll
        for (int c = 0; c < D / CW; ++c)
          tma_load_4d(sK + st * KV_BYTES + c * BC * ROWB, &tk, k_full(st), c * CW, jt * BC, hk, b);
        mbar_wait(v_empty(st), ph ^ 1);
        mbar_arrive_expect_tx(v_full(st), KV_BYTES);
#pragma unroll
        for (int c = 0; c < D / CW; ++c)
          tma_load_4d(sV + st * KV_BYTES + c * BC * ROWB, &tv, v_full(st), c * CW, jt * BC, hk, b);
      }
      // The 128-row launch after a 192-row one (mixed_height_rows) may finish first: its last block waits for
      // that launch, so work after it in the stream sees both launches' output.
      if constexpr (NC == 2 && D == 64 && MM == kNoMask && !CAUSAL)
        if (blockIdx.x == gridDim.x - 1 && blockIdx.y == gridDim.y - 1 && blockIdx.z == gridDim.z - 1)
          asm volatile("griddepcontrol.wait;" ::: "memory");
    }
  } else {
    regs_alloc<C::CONSUMER_REGS>();
    const int cw = wg - 1;  // consumer index: rows cw*64 .. cw*64+63 of the block
    const int g = lane >> 2, t = lane & 3;
    const int row0 = cw * 64 + (warp & 3) * 16 + g;
    T* o = HeadPtrs<T>(a, b, h).o;
    const MaskView<T, MM> mask(a, b, h);
    // Key-padding masks: the bias row of flash_fwd_ws, its two buffers alternating by key tile jt.
    const bool kp = MM != kNoMask && mask.key_padding();
    const int tw = (warp & 3) * 32 + lane;  // thread index within the warpgroup
    // Full additive masks: the next kAddDepth key tiles' values staged in shared memory where they fit.
    constexpr bool kStageable = MM == kAddMask && C::ADD_STAGE_TILE;
    constexpr int kAddDepth = C::ADD_DEPTH_TILE;
    using AddStage = std::conditional_t<D == 64, AddMaskStageWide<T, BC, kAddDepth>, AddMaskStage<T, BC>>;
    AddStage add;
    add.init(sQ + C::ADD_OFFSET + cw * AddStage::BYTES, warp & 3, lane);
    bool staged = false;
    if constexpr (kStageable) {
      staged = !kp && AddStage::usable(mask);
      if (staged) {
        add.set_rows(mask, m0 + row0, a.seq_q);
        add.issue(0, a.seq_kv);
#pragma unroll
        for (int i = 1; i < kAddDepth; ++i) add.issue(i * BC, a.seq_kv, i);
      }
    }
    float* s_bias = reinterpret_cast<float*>(smem_raw + (sQ - smem_u32(smem_raw)) + C::BIAS_OFFSET) + cw * 2 * BC;
    auto kp_fetch = [&](int jt) -> float {
      const int col = jt * BC + tw;
      return (tw < BC && col < a.seq_kv) ? mask.at(0, col) : -INFINITY;
    };
    auto kp_publish = [&](int jt, float v) {  // buffer jt&1 was last read in softmax(jt-2): every thread is past it
      if (tw < BC) s_bias[(jt & 1) * BC + tw] = v;
      named_bar_sync(1 + cw, 128);
    };
    static_assert(BC / 2 <= 64, "bool mask bits");
    std::uint32_t mb[2] = {0u, 0u};
    float kp_next = 0.f;

    float acc[D / 2];
#pragma unroll
    for (int i = 0; i < D / 2; ++i) acc[i] = 0.f;
    float m_r[2] = {-INFINITY, -INFINITY}, l_r[2] = {0.f, 0.f};
    const float sl2 = a.scale_log2;
    // K-major descriptors as in flash_fwd_ws.
    const std::uint64_t dq0 = make_desc(sQ + cw * 64 * ROWB, 16, 8 * ROWB, ROWB);
    std::uint32_t pa[BC / 16][4];
    float s[BC / 2];

    auto issue_qk = [&](int st) {
      const std::uint64_t dk0 = make_desc(sK + st * KV_BYTES, 16, 8 * ROWB, ROWB);
      constexpr int KPC = CW / 16;  // k16 steps per chunk
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        const std::uint32_t koff = (kk % KPC) << 1;
        Ops::qk(s, dq0 + (kk / KPC) * ((BR * ROWB) >> 4) + koff, dk0 + (kk / KPC) * ((BC * ROWB) >> 4) + koff,
                kk > 0 ? 1 : 0);
      }
    };
    auto issue_pv = [&](int st) {
      const std::uint64_t dv0 = make_desc(sV + st * KV_BYTES, BC * ROWB, 8 * ROWB, ROWB);
#pragma unroll
      for (int kk = 0; kk < BC / 16; ++kk) Ops::pv(acc, pa[kk], dv0 + ((kk * 16 * ROWB) >> 4));
    };
    auto load_mask = [&](int jt) {  // issued before S_jt is ready
      const int n0 = jt * BC;
      if (MM != kNoMask && kp) {
        if (jt + 1 < n_tiles) kp_next = kp_fetch(jt + 1);
      } else if (MM == kBoolMask) {
        std::uint32_t bits[2] = {0u, 0u};
        if (mask.sk == 1 && n0 + BC <= a.seq_kv) {  // contiguous keys inside the sequence: one base per row
          const unsigned char* r0 = mask.row_bytes(min(m0 + row0, a.seq_q - 1)) + n0 + t * 2;
          const unsigned char* r1 = mask.row_bytes(min(m0 + row0 + 8, a.seq_q - 1)) + n0 + t * 2;
#pragma unroll
          for (int e = 0; e < BC / 2; ++e) {
            const unsigned char* r = ((e >> 1) & 1) ? r1 : r0;
            if (__ldg(r + (e >> 2) * 8 + (e & 1)) != 0) bits[e >> 5] |= 1u << (e & 31);
          }
        } else {
#pragma unroll
          for (int e = 0; e < BC / 2; ++e) {
            const int row = min(m0 + row0 + ((e >> 1) & 1) * 8, a.seq_q - 1);
            const int col = n0 + (e >> 2) * 8 + t * 2 + (e & 1);
            if (col < a.seq_kv && mask.keep(row, col)) bits[e >> 5] |= 1u << (e & 31);
          }
        }
        mb[0] = bits[0];
        mb[1] = bits[1];
      }
    };
    auto softmax = [&](int jt, float (&al)[2]) {
      const int n0 = jt * BC;
      if (MM != kNoMask && kp) {  // bias row of this tile (sequence end included), causal diagonal
        const float* bias = s_bias + (jt & 1) * BC;
#pragma unroll
        for (int j = 0; j < BC / 8; ++j) {
          const float2 bb = *reinterpret_cast<const float2*>(bias + j * 8 + t * 2);
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            const int e = 4 * j + i;
            const int row = m0 + row0 + ((e >> 1) & 1) * 8;
            const int col = n0 + (e >> 2) * 8 + t * 2 + (e & 1);
            s[e] = (CAUSAL && col > row) ? -INFINITY : fmaf(s[e], a.scale, (e & 1) ? bb.y : bb.x);
          }
        }
      } else if (MM == kBoolMask) {  // every tile: bits from load_mask (sequence end included), causal diagonal
#pragma unroll
        for (int e = 0; e < BC / 2; ++e) {
          const int row = m0 + row0 + ((e >> 1) & 1) * 8;
          const int col = n0 + (e >> 2) * 8 + t * 2 + (e & 1);
          const bool keep = ((mb[e >> 5] >> (e & 31)) & 1u) != 0u && !(CAUSAL && col > row);
          s[e] = keep ? s[e] * a.scale : -INFINITY;
        }
      } else if (MM == kAddMask) {  // every tile: scale, add the mask, cut at the sequence end / causal diagonal
        bool done = false;
        if constexpr (kStageable) {
          if (staged) {  // this tile's values from shared memory, then the copies of the tile kAddDepth on
            AddStage::template wait<kAddDepth - 1>();
#pragma unroll
            for (int p = 0; p < BC / 4; ++p) {
              const float2 mv = add.pair(p, jt % kAddDepth);
              s[2 * p] = fmaf(s[2 * p], a.scale, mv.x);
              s[2 * p + 1] = fmaf(s[2 * p + 1], a.scale, mv.y);
            }
            if (n0 + BC > a.seq_kv || (CAUSAL && n0 + BC - 1 > m0 + cw * 64)) {
#pragma unroll
              for (int e = 0; e < BC / 2; ++e) {
                const int row = m0 + row0 + ((e >> 1) & 1) * 8;
                const int col = n0 + (e >> 2) * 8 + t * 2 + (e & 1);
                if (col >= a.seq_kv || (CAUSAL && col > row)) s[e] = -INFINITY;
              }
            }
            if constexpr (kAddDepth > 1)
              add.issue(n0 + kAddDepth * BC, a.seq_kv, jt % kAddDepth);  // past the end: zero-filled, keeps the count
            else if (jt + 1 < n_tiles)
              add.issue(n0 + BC, a.seq_kv);
            done = true;
          }
        }
        if (!done) {
#pragma unroll
          for (int e = 0; e < BC / 2; ++e) {
            const int row = m0 + row0 + ((e >> 1) & 1) * 8;
            const int col = n0 + (e >> 2) * 8 + t * 2 + (e & 1);
            s[e] = mask.template apply<CAUSAL>(s[e], a.scale, row, col, a.seq_q, a.seq_kv);
          }
        }
      } else if (n0 + BC > a.seq_kv || (CAUSAL && n0 + BC - 1 > m0 + cw * 64)) {
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
    // A consumer warp is done with a K/V buffer once its wgmma reads have retired.
    auto release = [&](std::uint32_t bar) {
      __syncwarp();
      if (lane == 0) mbar_arrive(bar);
    };
    // Ping-pong (FA3's): the consumers take turns issuing their wgmma (named barriers 3 and 4), so one's tensor work
    // runs while the other one's softmax does. Only the D=64 full additive masks gain from it (with 3 staged tiles:
    // +20% over neither; unmasked D=64 lost 3%), so only they take it.
    constexpr bool kPingPong = NC == 2 && MM == kAddMask && D == 64;
    const bool pingpong = kPingPong && staged;  // the same for both consumers: the mask is the CTA's
    auto pp_sync = [&]() {
      if (pingpong) named_bar_sync(3 + cw, 256);
    };
    auto pp_arrive = [&]() {
      if (pingpong) named_bar_arrive(3 + (cw ^ 1), 256);
    };
    if (pingpong && cw == 1) named_bar_arrive(3, 256);  // consumer 0 goes first
    if (MM != kNoMask && kp) kp_publish(0, kp_fetch(0));
    mbar_wait(q_full, 0);
    mbar_wait(k_full(0), 0);
    pp_sync();
    wg_fence();
    issue_qk(0);
    wg_commit();
    pp_arrive();
    load_mask(0);
    wg_wait0();
    fence_regs(s);
    release(k_empty(0));
    {
      float al[2];
      softmax(0, al);  // O is zero: no rescale needed
    }
    pack_p();
    if (MM != kNoMask && kp && n_tiles > 1) kp_publish(1, kp_next);

    for (int jt = 1; jt < n_tiles; ++jt) {
      const int st = jt % STAGES, ps = (jt - 1) % STAGES;
      mbar_wait(k_full(st), (jt / STAGES) & 1);
      if (pingpong) mbar_wait(v_full(ps), ((jt - 1) / STAGES) & 1);  // before taking the turn
      pp_sync();
      wg_fence();
      fence_regs(acc);
      issue_qk(st);
      wg_commit();
      if (!pingpong) mbar_wait(v_full(ps), ((jt - 1) / STAGES) & 1);
      issue_pv(ps);
      wg_commit();
      pp_arrive();
      load_mask(jt);
      wg_wait1();  // S_jt ready; P·V_{jt-1} may still run
      fence_regs(s);
      release(k_empty(st));
      float al[2];
      softmax(jt, al);
      wg_wait0();
      fence_regs(acc);
      fence_frag(pa);
      release(v_empty(ps));
#pragma unroll
      for (int r = 0; r < 2; ++r)
#pragma unroll
        for (int j = 0; j < D / 8; ++j) {
          acc[4 * j + 2 * r] *= al[r];
          acc[4 * j + 2 * r + 1] *= al[r];
        }
      pack_p();
      if (MM != kNoMask && kp && jt + 1 < n_tiles) kp_publish(jt + 1, kp_next);
    }
    const int ls = (n_tiles - 1) % STAGES;
    mbar_wait(v_full(ls), ((n_tiles - 1) / STAGES) & 1);
    pp_sync();
    wg_fence();
    fence_regs(acc);
    issue_pv(ls);
    wg_commit();
    if (cw == 0) pp_arrive();  // consumer 1's last turn needs it; consumer 0 has none left
    wg_wait0();
    fence_regs(acc);
    fence_frag(pa);

    if (TMA_O && !a.o_from_registers) {
      float inv[2];
      finish_rows(l_r, m_r, sl2, a.lse, static_cast<std::int64_t>(b) * gridDim.y + h, m0 + row0, a.seq_q, t, inv);
      store_o_tma<T, D, CW>(acc, inv, sQ + cw * 64 * ROWB, BR * ROWB, row0 - cw * 64, t, tw, 1 + cw, &to,
                            m0 + cw * 64, h, b);
      if (tw == 0) bulk_wait_read0();  // the block's shared memory stays until the store has read it
      return;
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
          if (j * 8 < a.head_dim)  // padded columns are not stored
            *reinterpret_cast<std::uint32_t*>(orow + j * 8 + t * 2) =
                Op::pack(acc[4 * j + 2 * r] * inv, acc[4 * j + 2 * r + 1] * inv);
        if (a.lse != nullptr && t == 0)
          a.lse[(static_cast<std::int64_t>(b) * gridDim.y + h) * a.seq_q + row] = row_lse(m_r[r], l, sl2);
      }
    }
  }
}

// The work items of one launch: query tiles x heads x batch, the query tile fastest (neighbouring CTAs share K/V
// in L2). Causal kernels take the query tiles last-first, the longest key loops first.
struct WorkItems {
  int m_blocks, heads, total;
};

// TMA_O (persistent where WsCfg::TMA_O, unless a.o_from_registers): O leaves through a staging tile in shared memory
// and the tensor map `to`, so a consumer hands its tile to the copy engine in a few instructions and turns to the next
// item.
template <typename T, int D, int BC, int NC, int STAGES, int QBUF, bool PERSIST, bool CAUSAL, int MM,
          bool AHEAD = false, bool TMA_O = false>
__global__ void __launch_bounds__((NC + 1) * 128, 1)
    flash_fwd_ws(const FwdArgs a, const WorkItems work, const __grid_constant__ CUtensorMap tq,
                 const __grid_constant__ CUtensorMap tk, const __grid_constant__ CUtensorMap tv,
                 const __grid_constant__ CUtensorMap to) {
  using C = WsCfg<D, BC, NC, STAGES, QBUF>;
  using Ops = WgOps<T, BC, D>;
  using Op = MmaOp<T>;
  constexpr int BR = C::BR;
  constexpr std::uint32_t KV_BYTES = C::KV_BYTES;
  constexpr int CW = C::CW, ROWB = C::ROWB;
  static_assert(PERSIST || QBUF == 1, "one Q buffer per CTA without the persistent loop");
  static_assert(!AHEAD || (PERSIST && QBUF == 2), "the next item's S_0 needs its Q in the other buffer");
  static_assert(!TMA_O || (C::template TMA_O<MM> && PERSIST), "O staging: persistent kernels, where it fits");

  extern __shared__ unsigned char smem_raw[];
  const std::uint32_t sQ = (smem_u32(smem_raw) + 1023) & ~1023u;  // the swizzle pattern repeats every 1024 bytes
  const std::uint32_t sK = sQ + QBUF * C::Q_BYTES, sV = sK + STAGES * KV_BYTES;
  const std::uint32_t bars = sV + STAGES * KV_BYTES;
  auto q_full = [&](int qb) { return bars + 8 * qb; };
  auto q_empty = [&](int qb) { return bars + 8 * (QBUF + qb); };
  auto k_full = [&](int st) { return bars + 8 * (2 * QBUF + st); };
  auto k_empty = [&](int st) { return bars + 8 * (2 * QBUF + STAGES + st); };
  auto v_full = [&](int st) { return bars + 8 * (2 * QBUF + 2 * STAGES + st); };
  auto v_empty = [&](int st) { return bars + 8 * (2 * QBUF + 3 * STAGES + st); };

  // Work item w -> first query row, head, batch.
  auto item = [&](int w, int& m0, int& h, int& b) {
    if (PERSIST) {
      const int mb = w % work.m_blocks, bh = w / work.m_blocks;
      m0 = (CAUSAL ? work.m_blocks - 1 - mb : mb) * BR;
      h = bh % work.heads;
      b = bh / work.heads;
    } else {
      m0 = (CAUSAL ? (gridDim.x - 1 - blockIdx.x) : blockIdx.x) * BR;
      h = blockIdx.y;
      b = blockIdx.z;
    }
  };
  const int w0 = PERSIST ? static_cast<int>(blockIdx.x) : 0;
  const int w_step = PERSIST ? static_cast<int>(gridDim.x) : 1;
  const int w_end = PERSIST ? work.total : 1;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int wg = warp >> 2;

  if (tid == 0) {
#pragma unroll
    for (int qb = 0; qb < QBUF; ++qb) {
      mbar_init(q_full(qb), 1);
      mbar_init(q_empty(qb), 4 * NC);  // one arrival per consumer warp
    }
#pragma unroll
    for (int st = 0; st < STAGES; ++st) {
      mbar_init(k_full(st), 1);
      mbar_init(v_full(st), 1);
      mbar_init(k_empty(st), 4 * NC);
      mbar_init(v_empty(st), 4 * NC);
    }
    mbar_init_fence();
  }
  __syncthreads();

  if (wg == 0) {
    regs_dealloc<C::PRODUCER_REGS>();
    if (warp == 0 && lane == 0) {
      tma_prefetch_desc(&tq);
      tma_prefetch_desc(&tk);
      tma_prefetch_desc(&tv);
      int kc = 0, it = 0;  // key tiles and work items loaded so far (ring slots and barrier phases)
      auto load_q = [&](int m0, int h, int b) {  // item number it's Q into its buffer
        const int qb = it % QBUF;
        if (PERSIST) mbar_wait(q_empty(qb), ((it / QBUF) & 1) ^ 1);
        mbar_arrive_expect_tx(q_full(qb), C::Q_BYTES);
#pragma unroll
        for (int c = 0; c < D / CW; ++c)
          tma_load_4d(sQ + qb * C::Q_BYTES + c * BR * ROWB, &tq, q_full(qb), c * CW, m0, h, b);
      };
      auto load_k = [&](int jt, int hk, int b) {  // key tile jt into ring slot kc % STAGES
        const int st = kc % STAGES;
        mbar_wait(k_empty(st), ((kc / STAGES) & 1) ^ 1);
        mbar_arrive_expect_tx(k_full(st), KV_BYTES);
#pragma unroll
        for (int c = 0; c < D / CW; ++c)
          tma_load_4d(sK + st * KV_BYTES + c * BC * ROWB, &tk, k_full(st), c * CW, jt * BC, hk, b);
      };
      for (int w = w0; w < w_end; w += w_step, ++it) {
        int m0, h, b;
        item(w, m0, h, b);
        const int hk = h / a.group;  // K/V tensor-map coordinate
        const int n_tiles = key_tiles<BR, BC, CAUSAL>(m0, a.seq_kv);
        load_q(m0, h, b);
        for (int jt = 0; jt < n_tiles; ++jt, ++kc) {
          const int st = kc % STAGES;
          const std::uint32_t ph = (kc / STAGES) & 1;
          load_k(jt, hk, b);
          mbar_wait(v_empty(st), ph ^ 1);
          mbar_arrive_expect_tx(v_full(st), KV_BYTES);
#pragma unroll
          for (int c = 0; c < D / CW; ++c)
            tma_load_4d(sV + st * KV_BYTES + c * BC * ROWB, &tv, v_full(st), c * CW, jt * BC, hk, b);
        }
      }
      if constexpr (AHEAD) {  // a Q and K_0 past the last item: the consumers' S_0 of "the next item" reads them
        int m0, h, b;
        item(w0, m0, h, b);
        load_q(m0, h, b);
        load_k(0, h / a.group, b);
      }
    }
  } else {
    regs_alloc<C::CONSUMER_REGS>();
    const int cw = wg - 1;  // consumer index: rows cw*64 .. cw*64+63 of the block
    const int g = lane >> 2, t = lane & 3;
    const int row0 = cw * 64 + (warp & 3) * 16 + g;
    const int tw = (warp & 3) * 32 + lane;  // thread index within the warpgroup
    float* s_bias = reinterpret_cast<float*>(smem_raw + (sQ - smem_u32(smem_raw)) + C::BIAS_OFFSET) + cw * 2 * BC;
    const float sl2 = a.scale_log2;
    // A consumer warp is done with a K/V (or Q) buffer once its wgmma reads have retired.
    auto release = [&](std::uint32_t bar) {
      __syncwarp();
      if (lane == 0) mbar_arrive(bar);
    };
    // The work item in hand (cur) and its mask view; kc / it count the key tiles and items consumed before it.
    int kc = 0, it = 0;
    int m0 = 0, h = 0, b = 0, n_tiles = 0;
    auto set_item = [&](int w) {
      item(w, m0, h, b);
      n_tiles = key_tiles<BR, BC, CAUSAL>(m0, a.seq_kv);
    };
    MaskView<T, MM> mask(a, 0, 0);
    // Full additive masks: the next key tile's values staged in shared memory (AddMaskStage) where they fit.
    constexpr bool kStageable = MM == kAddMask && C::ADD_STAGE;
    using AddStage = std::conditional_t<D == 64, AddMaskStageWide<T, BC>, AddMaskStage<T, BC>>;
    AddStage add;
    add.init(sQ + C::ADD_OFFSET + cw * AddStage::BYTES, warp & 3, lane);
    bool staged = false;
    // Key-padding masks (one row of keys per batch and head): each thread of the warpgroup loads one key's value
    // of the next tile while this one computes and publishes it as a float bias row in shared memory (0 or -inf
    // for bool masks), so the softmax adds it with one shared load per two keys. The two row buffers alternate
    // by the running key-tile count kc + jt, across work items too. Full bool masks are loaded as bits before S
    // is ready (bit e of this thread's S fragment); full additive masks are staged (AddMaskStage) or read in the
    // softmax.
    bool kp = false;
    auto kp_fetch = [&](int jt) -> float {
      const int col = jt * BC + tw;
      return (tw < BC && col < a.seq_kv) ? mask.at(0, col) : -INFINITY;
    };
    // Buffer (kc+jt)&1 was last read in the softmax two key tiles back: every thread is past the barrier of the
    // publish in between.
    auto kp_publish = [&](int jt, float v) {
      if (tw < BC) s_bias[((kc + jt) & 1) * BC + tw] = v;
      named_bar_sync(1 + cw, 128);
    };
    static_assert(BC / 2 <= 64, "bool mask bits");
    std::uint32_t mb[2] = {0u, 0u};
    float kp_next = 0.f;

    float acc[D / 2];
    float m_r[2], l_r[2];
    std::uint32_t pa[BC / 16][4];
    float s[BC / 2];
    // K-major descriptors: 8-row groups ROWB * 8 bytes apart; a k16 step is 32 bytes (+2 in 16-byte units)
    // within a chunk, the next chunk BR (Q) or BC (K) rows on.
    auto q_desc = [&](int itx) {
      return make_desc(sQ + (itx % QBUF) * C::Q_BYTES + cw * 64 * ROWB, 16, 8 * ROWB, ROWB);
    };

    auto issue_qk = [&](int st, std::uint64_t dq0) {
      const std::uint64_t dk0 = make_desc(sK + st * KV_BYTES, 16, 8 * ROWB, ROWB);
      constexpr int KPC = CW / 16;  // k16 steps per chunk (1 for 16-column chunks)
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        const std::uint32_t koff = (kk % KPC) << 1;
        Ops::qk(s, dq0 + (kk / KPC) * ((BR * ROWB) >> 4) + koff, dk0 + (kk / KPC) * ((BC * ROWB) >> 4) + koff,
                kk > 0 ? 1 : 0);
      }
    };
    // S_0 = Q·K_0^T of the item numbered itx whose first key tile is kcx, once its Q and K_0 have landed.
    auto issue_first_qk = [&](int itx, int kcx) {
      mbar_wait(q_full(itx % QBUF), (itx / QBUF) & 1);
      mbar_wait(k_full(kcx % STAGES), (kcx / STAGES) & 1);
      wg_fence();
      issue_qk(kcx % STAGES, q_desc(itx));
      wg_commit();
    };
    // V MN-major: column chunks BC * ROWB bytes apart (leading offset), 8-key groups 8 * ROWB apart.
    // With AHEAD, O is not zeroed at an item's start (that would write O's registers while the next item's S_0 is
    // in flight, and ptxas then serialises every wgmma): the item's first P·V overwrites O instead.
    auto issue_pv = [&](int st, bool first) {
      const std::uint64_t dv0 = make_desc(sV + st * KV_BYTES, BC * ROWB, 8 * ROWB, ROWB);
#pragma unroll
      for (int kk = 0; kk < BC / 16; ++kk)
        Ops::pv(acc, pa[kk], dv0 + ((kk * 16 * ROWB) >> 4), AHEAD && first && kk == 0 ? 0 : 1);
    };
    auto load_mask = [&](int jt) {  // issued before S_jt is ready
      const int n0 = jt * BC;
      if (MM != kNoMask && kp) {
        if (jt + 1 < n_tiles) kp_next = kp_fetch(jt + 1);
      } else if (MM == kBoolMask) {
        std::uint32_t bits[2] = {0u, 0u};
        if (mask.sk == 1 && n0 + BC <= a.seq_kv) {  // contiguous keys inside the sequence: one base per row
          const unsigned char* r0 = mask.row_bytes(min(m0 + row0, a.seq_q - 1)) + n0 + t * 2;
          const unsigned char* r1 = mask.row_bytes(min(m0 + row0 + 8, a.seq_q - 1)) + n0 + t * 2;
#pragma unroll
          for (int e = 0; e < BC / 2; ++e) {
            const unsigned char* r = ((e >> 1) & 1) ? r1 : r0;
            if (__ldg(r + (e >> 2) * 8 + (e & 1)) != 0) bits[e >> 5] |= 1u << (e & 31);
          }
        } else {
#pragma unroll
          for (int e = 0; e < BC / 2; ++e) {
            const int row = min(m0 + row0 + ((e >> 1) & 1) * 8, a.seq_q - 1);
            const int col = n0 + (e >> 2) * 8 + t * 2 + (e & 1);
            if (col < a.seq_kv && mask.keep(row, col)) bits[e >> 5] |= 1u << (e & 31);
          }
        }
        mb[0] = bits[0];
        mb[1] = bits[1];
      }
    };
    auto softmax = [&](int jt, float (&al)[2]) {
      const int n0 = jt * BC;
      if (MM != kNoMask && kp) {  // bias row of this tile (sequence end included), causal diagonal
        const float* bias = s_bias + ((kc + jt) & 1) * BC;
#pragma unroll
        for (int j = 0; j < BC / 8; ++j) {
          const float2 bb = *reinterpret_cast<const float2*>(bias + j * 8 + t * 2);
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            const int e = 4 * j + i;
            const int row = m0 + row0 + ((e >> 1) & 1) * 8;
            const int col = n0 + (e >> 2) * 8 + t * 2 + (e & 1);
            s[e] = (CAUSAL && col > row) ? -INFINITY : fmaf(s[e], a.scale, (e & 1) ? bb.y : bb.x);
          }
        }
      } else if (MM == kBoolMask) {  // every tile: bits from load_mask (sequence end included), causal diagonal
#pragma unroll
        for (int e = 0; e < BC / 2; ++e) {
          const int row = m0 + row0 + ((e >> 1) & 1) * 8;
          const int col = n0 + (e >> 2) * 8 + t * 2 + (e & 1);
          const bool keep = ((mb[e >> 5] >> (e & 31)) & 1u) != 0u && !(CAUSAL && col > row);
          s[e] = keep ? s[e] * a.scale : -INFINITY;
        }
      } else if (MM == kAddMask) {  // every tile: scale, add the mask, cut at the sequence end / causal diagonal
        bool done = false;
        if constexpr (kStageable) {
          if (staged) {  // this tile's values from shared memory, then the next tile's copies
            AddStage::wait();
#pragma unroll
            for (int p = 0; p < BC / 4; ++p) {
              const float2 mv = add.pair(p);
              s[2 * p] = fmaf(s[2 * p], a.scale, mv.x);
              s[2 * p + 1] = fmaf(s[2 * p + 1], a.scale, mv.y);
            }
            if (n0 + BC > a.seq_kv || (CAUSAL && n0 + BC - 1 > m0 + cw * 64)) {
#pragma unroll
              for (int e = 0; e < BC / 2; ++e) {
                const int row = m0 + row0 + ((e >> 1) & 1) * 8;
                const int col = n0 + (e >> 2) * 8 + t * 2 + (e & 1);
                if (col >= a.seq_kv || (CAUSAL && col > row)) s[e] = -INFINITY;
              }
            }
            if (jt + 1 < n_tiles) add.issue(n0 + BC, a.seq_kv);
            done = true;
          }
        }
        if (!done) {
#pragma unroll
          for (int e = 0; e < BC / 2; ++e) {
            const int row = m0 + row0 + ((e >> 1) & 1) * 8;
            const int col = n0 + (e >> 2) * 8 + t * 2 + (e & 1);
            s[e] = mask.template apply<CAUSAL>(s[e], a.scale, row, col, a.seq_q, a.seq_kv);
          }
        }
      } else if (n0 + BC > a.seq_kv || (CAUSAL && n0 + BC - 1 > m0 + cw * 64)) {
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

    // AHEAD: each item's S_0 is issued under the previous item's last P·V and O store (the first item's here, and
    // one past the last item on a Q and K_0 the producer loads for it), with no branch around the issue: ptxas
    // serialises every wgmma of a kernel where the in-flight S may or may not exist at a join.
    if constexpr (AHEAD) {
#pragma unroll
      for (int i = 0; i < D / 2; ++i) acc[i] = 0.f;  // never read (the first P·V overwrites it), defined once
      issue_first_qk(it, kc);
    }
    for (int w = w0; w < w_end; w += w_step, ++it) {
      set_item(w);
      mask = MaskView<T, MM>(a, b, h);
      if constexpr (!AHEAD) issue_first_qk(it, kc);
      kp = MM != kNoMask && mask.key_padding();
      if constexpr (kStageable) {
        staged = !kp && AddStage::usable(mask);
        if (staged) {
          add.set_rows(mask, m0 + row0, a.seq_q);
          add.issue(0, a.seq_kv);
        }
      }
      if constexpr (!AHEAD) {
#pragma unroll
        for (int i = 0; i < D / 2; ++i) acc[i] = 0.f;
      }
      m_r[0] = m_r[1] = -INFINITY;
      l_r[0] = l_r[1] = 0.f;
      load_mask(0);
      if (MM != kNoMask && kp) kp_publish(0, kp_fetch(0));
      wg_wait0();
      fence_regs(s);
      release(k_empty(kc % STAGES));
      if (PERSIST && n_tiles == 1) release(q_empty(it % QBUF));  // the item's last Q·K^T has retired
      {
        float al[2];
        softmax(0, al);  // O is zero: no rescale needed
      }
      pack_p();
      if (MM != kNoMask && kp && n_tiles > 1) kp_publish(1, kp_next);

      for (int jt = 1; jt < n_tiles; ++jt) {
        const int kj = kc + jt;
        const int st = kj % STAGES, ps = (kj - 1) % STAGES;
        mbar_wait(k_full(st), (kj / STAGES) & 1);
        wg_fence();
        fence_regs(acc);
        issue_qk(st, q_desc(it));
        wg_commit();
        mbar_wait(v_full(ps), ((kj - 1) / STAGES) & 1);
        issue_pv(ps, jt == 1);
        wg_commit();
        load_mask(jt);
        wg_wait1();  // S_jt ready; P·V_{jt-1} may still run
        fence_regs(s);
        release(k_empty(st));
        if (PERSIST && jt == n_tiles - 1) release(q_empty(it % QBUF));
        float al[2];
        softmax(jt, al);
        wg_wait0();
        fence_regs(acc);
        fence_frag(pa);
        release(v_empty(ps));
#pragma unroll
        for (int r = 0; r < 2; ++r)
#pragma unroll
          for (int j = 0; j < D / 8; ++j) {
            acc[4 * j + 2 * r] *= al[r];
            acc[4 * j + 2 * r + 1] *= al[r];
          }
        pack_p();
        if (MM != kNoMask && kp && jt + 1 < n_tiles) kp_publish(jt + 1, kp_next);
      }
      const int kl = kc + n_tiles - 1, ls = kl % STAGES;
      mbar_wait(v_full(ls), (kl / STAGES) & 1);
      wg_fence();
      fence_regs(acc);
      issue_pv(ls, n_tiles == 1);
      wg_commit();
      if constexpr (AHEAD) {  // the next item's S_0 runs under this P·V and the O store below
        issue_first_qk(it + 1, kc + n_tiles);
        wg_wait1();
      } else {
        wg_wait0();
      }
      fence_regs(acc);
      fence_frag(pa);
      if (PERSIST) release(v_empty(ls));  // the next work item reuses the slot

      if (TMA_O && !a.o_from_registers) {  // this consumer's tile, once the copy engine has read the previous one
        float inv[2];
        finish_rows(l_r, m_r, sl2, a.lse, static_cast<std::int64_t>(b) * work.heads + h, m0 + row0, a.seq_q, t, inv);
        if (tw == 0) bulk_wait_read0();
        named_bar_sync(1 + cw, 128);
        store_o_tma<T, D, CW>(acc, inv, sQ + C::template O_OFFSET<MM> + cw * (64 * D * 2), 64 * ROWB, row0 - cw * 64,
                              t, tw, 1 + cw, &to, m0 + cw * 64, h, b);
        kc += n_tiles;
        continue;
      }
      T* o = HeadPtrs<T>(a, b, h).o;
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const float l = quad_sum(l_r[r]);
        const float inv = l > 0.f ? 1.f / l : 0.f;
        const int row = m0 + row0 + r * 8;
        if (row < a.seq_q) {
          T* orow = o + static_cast<std::int64_t>(row) * a.o_ss;
#pragma unroll
          for (int j = 0; j < D / 8; ++j)
            if (j * 8 < a.head_dim)  // padded columns are not stored
              *reinterpret_cast<std::uint32_t*>(orow + j * 8 + t * 2) =
                  Op::pack(acc[4 * j + 2 * r] * inv, acc[4 * j + 2 * r + 1] * inv);
          if (a.lse != nullptr && t == 0)
            a.lse[(static_cast<std::int64_t>(b) * work.heads + h) * a.seq_q + row] = row_lse(m_r[r], l, sl2);
        }
      }
      kc += n_tiles;
    }
    if constexpr (AHEAD) wg_wait0();  // the S_0 past the last item
    if (TMA_O && !a.o_from_registers && tw == 0) bulk_wait0();  // the staging tiles stay until the last store is done
  }
}

// Multiprocessors of the current device (cached per device): the persistent grid's size.
inline int sm_count() {
  static int cached[64];
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0) return 132;
  if (dev >= 64) dev = 63;
  if (cached[dev] == 0) {
    int n = 0;
    cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev);
    cached[dev] = n > 0 ? n : 132;
  }
  return cached[dev];
}

// How a launch runs its work items: one CTA each (flash_fwd_ws_tile), persistent (flash_fwd_ws), or one CTA each
// through the persistent kernel's body with its loop compiled out (flash_fwd_ws without PERSIST).
enum class Sched { kTile, kPersist, kLoopBody };

// after_previous: the launch may start while the stream's previous kernel (which triggers it, above) still runs; for
// launches that share no data with it.
// O leaves through the copy engine where the kernel has room to stage it (TMA_O: one CTA per item always, persistent
// where WsCfg::TMA_O; H200 bf16, Wan cross-attention +14%, 8x24x1024² +10%; docs/cuda-kernels.md), from registers
// where no tensor map can be made for O (or a.o_from_registers asks).
template <typename T, int D, int BC, int NC, int STAGES, int QBUF, Sched S, bool CAUSAL, int MM = kNoMask,
          bool AHEAD = false>
cudaError_t launch_ws(FwdArgs a, int batch, int heads, cudaStream_t stream, bool after_previous = false) {
  using C = WsCfg<D, BC, NC, STAGES, QBUF>;
  constexpr bool PERSIST = S == Sched::kPersist;
  static_assert(PERSIST || QBUF == 1, "one Q buffer per CTA without the persistent loop");
  constexpr bool bf16 = std::is_same<T, __nv_bfloat16>::value;
  constexpr bool kTileBody = S == Sched::kTile;
  constexpr bool TMA_O = kTileBody || (PERSIST && C::template TMA_O<MM>);
  const int heads_kv = heads / a.group, dkv = a.kv_cols;
  CUtensorMap tq, tk, tv, to{};
  if (!make_map(&tq, a.q, bf16, a.head_dim, a.seq_q, heads, batch, a.q_ss, a.q_sh, a.q_sb, C::BR, C::CW) ||
      !make_map(&tk, a.k, bf16, dkv, a.seq_kv, heads_kv, batch, a.k_ss, a.k_sh, a.k_sb, BC, C::CW) ||
      !make_map(&tv, a.v, bf16, dkv, a.seq_kv, heads_kv, batch, a.v_ss, a.v_sh, a.v_sb, BC, C::CW))
    return cudaErrorNotSupported;
  a.o_from_registers = !TMA_O || a.o_from_registers ||
                       !make_map(&to, a.o, bf16, a.head_dim, a.seq_q, heads, batch, a.o_ss, a.o_sh, a.o_sb, 64, C::CW);
  constexpr int smem = PERSIST && TMA_O                               ? C::template SMEM_TMA_O<MM>
                       : MM == kNoMask                                ? C::SMEM
                       : (MM == kAddMask && kTileBody && C::ADD_STAGE_TILE) ? C::SMEM_ADD_TILE
                       : (MM == kAddMask && !kTileBody && C::ADD_STAGE)    ? C::SMEM_ADD
                                                                           : C::SMEM_MASKED;
  static_assert(smem <= 227 * 1024, "shared memory per block");
  const int m_blocks = (a.seq_q + C::BR - 1) / C::BR;
  cudaError_t e = cudaSuccess;
  if constexpr (kTileBody) {
    constexpr auto kern = flash_fwd_ws_tile<T, D, BC, NC, STAGES, CAUSAL, MM, TMA_O>;
    e = allow_smem<kern>(smem);
    if (e != cudaSuccess) return e;
    if (after_previous) {
      cudaLaunchAttribute pdl{};
      pdl.id = cudaLaunchAttributeProgrammaticStreamSerialization;
      pdl.val.programmaticStreamSerializationAllowed = 1;
      const LaunchWith launch(pdl, dim3(m_blocks, heads, batch), C::NT, smem, stream);
      e = cudaLaunchKernelEx(&launch.cfg, kern, a, tq, tk, tv, to);
      if (e != cudaSuccess) return e;
    } else {
      kern<<<dim3(m_blocks, heads, batch), C::NT, smem, stream>>>(a, tq, tk, tv, to);
    }
  } else {
    constexpr auto kern = flash_fwd_ws<T, D, BC, NC, STAGES, QBUF, PERSIST, CAUSAL, MM, AHEAD, TMA_O>;
    e = allow_smem<kern>(smem);
    if (e != cudaSuccess) return e;
    const std::int64_t total = static_cast<std::int64_t>(m_blocks) * heads * batch;
    if (PERSIST && total > 0x7fffffff) return cudaErrorInvalidValue;  // use_persistent never asks for it
    const WorkItems work{m_blocks, heads, static_cast<int>(std::min<std::int64_t>(total, 0x7fffffff))};
    if (PERSIST) {
      const int grid = static_cast<int>(std::min<std::int64_t>(total, sm_count()));
      kern<<<grid, C::NT, smem, stream>>>(a, work, tq, tk, tv, to);
    } else {
      kern<<<dim3(m_blocks, heads, batch), C::NT, smem, stream>>>(a, work, tq, tk, tv, to);
    }
  }
  return cudaGetLastError();
}

// The persistent schedule pays where each work item has few key tiles: the per-item start (Q load, ring fill) and
// the launch of a CTA per item are then a large share of an item, and the producer now does them under the
// previous item. H200, bf16, against one CTA per item: +26% with 4 key tiles (Wan cross-attention), +12-21% with
// 4-8 (8x24x1024, 16x24x512), +5% with 12-16; with 32-36 key tiles -3% to +0% (SD-UNet, Flux), so long rows keep
// one CTA per item. Causal items are unequal and a static split would lose to the hardware's block scheduler, so
// causal calls keep it too (and no causal persistent kernel is built). With no more items than SMs there is
// nothing to schedule.
constexpr int kPersistMaxKeyTiles = 16;
inline bool use_persistent(const FwdArgs& a, int key_tile, bool causal, int batch, int heads, int rows_per_tile) {
  const std::int64_t items = static_cast<std::int64_t>((a.seq_q + rows_per_tile - 1) / rows_per_tile) * heads * batch;
  return !causal && (a.seq_kv + key_tile - 1) / key_tile <= kPersistMaxKeyTiles && items > sm_count() &&
         items <= 0x7fffffff;
}

// Default tiles per padded head size; variants 16.. are alternatives kept for tuning (docs/cuda-kernels.md): 19
// forces the persistent schedule (non-causal), 20 one CTA per item with flash_fwd_ws_tile for every mask; 16-18 are
// unmasked, one CTA per item (17: three consumers at D=64 always; the default takes them where
// three_consumers_pay); 24 the persistent schedule with three consumers at D=64 (unmasked, non-causal); 25 the
// default kernels with O stored from registers (launch_ws).
// Calls that do not run persistent take flash_fwd_ws_tile, except full boolean masks (not key padding): those take
// the persistent kernel's body with its loop compiled out. Side by side on an H200 (bf16, docs/cuda-kernels.md) the
// tile body ran unmasked 1-11% faster (SD-UNet D=64 441 vs 398 TFLOP/s), with key padding 5% (Flux 486 vs 462) and
// with additive masks alike, while with a full boolean mask it ran 26% slower at D=64 (123 vs 165) and 4% faster at
// D=128 (259 vs 249).
template <typename T, bool C, int D>
cudaError_t run_t(const FwdArgs& a, int batch, int heads, int mask_mode, int variant, cudaStream_t s) {
  constexpr int BC = D == 256 ? 80 : 128;  // 256: 80-key tiles, 3-7% over 64 (H200); two K/V stages fill 225 KB
  // Two Q buffers where they fit (D=64/128); D=256 has room for one.
  constexpr int QB = WsCfg<D, BC, 2, 2, 2>::SMEM_MASKED <= 227 * 1024 ? 2 : 1;
  // Full additive masks: one Q buffer where two would leave no room for the mask staging (D=128).
  constexpr int QBA = !WsCfg<D, BC, 2, 2, 2>::ADD_STAGE && WsCfg<D, BC, 2, 2, 1>::ADD_STAGE ? 1 : QB;
  constexpr Sched kP = Sched::kPersist, kT = Sched::kTile, kL = Sched::kLoopBody;
  if constexpr (!C) {  // the persistent kernels are built for non-causal calls only (use_persistent)
    // AHEAD (the next item's S_0 under this item's last P·V and O store) where the next item's Q has its own buffer:
    // +6% at Wan cross-attention, +7.6% at 8x24x1024² (H200, bf16, docs/cuda-kernels.md).
    const bool persist = variant == 19 || (variant != 20 && use_persistent(a, BC, C, batch, heads, 128));
    // Unmasked D <= 64: three consumers (192-row items) where their rounds pay, as for one CTA per item (SDXL's
    // 2x20x1024² 344 vs 316 TFLOP/s, 2x10x1024² 302 vs 223; H200 bf16, CUDA graphs, docs/cuda-kernels.md). 24 forces.
    if constexpr (D == 64)
      if (mask_mode == kNoMask &&
          (variant == 24 ||
           (variant == -1 && persist &&
            three_consumers_pay(a.seq_q, static_cast<std::int64_t>(batch) * heads, C, sm_count()))))
        return launch_ws<T, 64, 128, 3, 2, 2, kP, C, kNoMask, true>(a, batch, heads, s);
    if (persist) {
      if (mask_mode == kBoolMask)
        return launch_ws<T, D, BC, 2, 2, QB, kP, C, kBoolMask, QB == 2>(a, batch, heads, s);
      if (mask_mode == kAddMask)
        return launch_ws<T, D, BC, 2, 2, QBA, kP, C, kAddMask, QBA == 2>(a, batch, heads, s);
      return launch_ws<T, D, BC, 2, 2, QB, kP, C, kNoMask, QB == 2>(a, batch, heads, s);
    }
  }
  if (mask_mode == kBoolMask) {
    if (variant != 20 && a.mask_sq != 0)  // a full mask (a.mask_sq == 0 is a key-padding row)
      return launch_ws<T, D, BC, 2, 2, 1, kL, C, kBoolMask>(a, batch, heads, s);
    return launch_ws<T, D, BC, 2, 2, 1, kT, C, kBoolMask>(a, batch, heads, s);
  }
  if (mask_mode == kAddMask) return launch_ws<T, D, BC, 2, 2, 1, kT, C, kAddMask>(a, batch, heads, s);
  if constexpr (D == 64) {
    // Two heights (mixed_height_rows): not with the LSE, whose rows the kernels index by seq_q.
    if constexpr (!C) {
      const int tall = variant == -1 && a.lse == nullptr
                           ? mixed_height_rows(a.seq_q, static_cast<std::int64_t>(batch) * heads, sm_count())
                           : 0;
      if (tall > 0) {
        FwdArgs first = a, rest = a;
        first.seq_q = tall;
        rest.q = static_cast<const T*>(a.q) + tall * a.q_ss;
        rest.o = static_cast<T*>(a.o) + tall * a.o_ss;
        rest.seq_q = a.seq_q - tall;
        const cudaError_t e = launch_ws<T, 64, 128, 3, 2, 1, kT, C>(first, batch, heads, s);
        if (e != cudaSuccess) return e;
        return launch_ws<T, 64, 128, 2, 2, 1, kT, C>(rest, batch, heads, s, /*after_previous=*/true);
      }
    }
    if (variant == 17 ||
        (variant == -1 && three_consumers_pay(a.seq_q, static_cast<std::int64_t>(batch) * heads, C, sm_count())))
      return launch_ws<T, 64, 128, 3, 2, 1, kT, C>(a, batch, heads, s);
  }
  if constexpr (D == 64 || D == 128)
    if (variant == 18) return launch_ws<T, D, 128, 2, 3, 1, kT, C>(a, batch, heads, s);
  if constexpr (D == 256)
    if (variant == 16) return launch_ws<T, 256, 64, 2, 2, 1, kT, C>(a, batch, heads, s);
  return launch_ws<T, D, BC, 2, 2, 1, kT, C>(a, batch, heads, s);
}

template <int D>
cudaError_t run_wg_d(const FwdArgs& a, int batch, int heads, bool bf16, bool causal, int mask_mode, int variant,
                     cudaStream_t s) {
  if (bf16) return causal ? run_t<__nv_bfloat16, true, D>(a, batch, heads, mask_mode, variant, s)
                          : run_t<__nv_bfloat16, false, D>(a, batch, heads, mask_mode, variant, s);
  return causal ? run_t<__half, true, D>(a, batch, heads, mask_mode, variant, s)
                : run_t<__half, false, D>(a, batch, heads, mask_mode, variant, s);
}

}  // namespace

// One per padded head size (flash_fwd_wg{64,80,96,128,256}_sm90a.cu).
cudaError_t run_wg_sm90_d64(const FwdArgs& a, int batch, int heads, bool bf16, bool causal, int mask_mode,
                            int variant, cudaStream_t s);
cudaError_t run_wg_sm90_d80(const FwdArgs& a, int batch, int heads, bool bf16, bool causal, int mask_mode,
                            int variant, cudaStream_t s);
cudaError_t run_wg_sm90_d96(const FwdArgs& a, int batch, int heads, bool bf16, bool causal, int mask_mode,
                            int variant, cudaStream_t s);
cudaError_t run_wg_sm90_d128(const FwdArgs& a, int batch, int heads, bool bf16, bool causal, int mask_mode,
                             int variant, cudaStream_t s);
cudaError_t run_wg_sm90_d256(const FwdArgs& a, int batch, int heads, bool bf16, bool causal, int mask_mode,
                             int variant, cudaStream_t s);

}  // namespace attnsel::cuda::detail
