// Shared fused attention forward algorithm for every CPU ISA path.
//
// Include ONLY from an ISA translation unit (attention_cpu_<isa>.cpp), after that unit has defined
// `struct Isa` inside `namespace attnsel::cpu::detail { namespace { ... } }`. Everything here lives in
// an anonymous namespace, so each ISA unit gets its own private copy: no inline function compiled with
// AVX flags can be merged by the linker into the code of a less capable path (ODR hazard).
//
// Algorithm (flash-attention style, online softmax, fp32 accumulation), per work item (batch, head, query block):
//   * the query block is packed once, transposed into panels Qp[panel][d][PW] (PW = Isa::W * Isa::NV queries);
//   * keys are walked in tiles of BK; K and V tiles are used in place when they are fp32 with unit dim stride,
//     otherwise converted into small per-thread fp32 tiles (shared by all panels of the block);
//   * per panel and key tile: S^T[key][query] = K · Qp (register-blocked R x PW micro-kernel, broadcasts from K,
//     head_dim in L1-sized blocks and short summation chunks for accuracy), masks, then an online softmax done
//     "vertically" (each SIMD lane is one query: no horizontal reductions; the column max comes from the GEMM
//     epilogue on unmasked tiles; exponent fma(s, scale*log2 e, -max) and a polynomial exp2), then
//     O^T[dv][query] = alpha * O^T + V^T · P^T with the same register blocking (broadcasts from V).
//   Scores never exist beyond a BK x PW tile; causal tiles past a panel's last query are skipped.
// Work items are handed out dynamically over the caller's parallel_for (see Kernel::chunk).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <new>
#include <thread>
#include <type_traits>

#ifdef __AVX2__
#include <immintrin.h>
#endif

#include "../attention_params.h"
#include "attention_cpu_elements.h"

namespace attnsel::cpu::detail {
namespace {

using kernels::AttentionParams;
using kernels::MaskKind;
using kernels::ScalarType;
using i64 = std::int64_t;

constexpr float kLog2e = 1.44269504088896340736f;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr float kLn2 = 0.69314718055994530942f;

// Own min/max: avoids instantiating std templates in a TU with ISA flags.
inline i64 imin(i64 a, i64 b) { return a < b ? a : b; }
inline i64 imax(i64 a, i64 b) { return a > b ? a : b; }
inline i64 ceil_div(i64 a, i64 b) { return (a + b - 1) / b; }

// Converts n elements (source stride `st` elements) to fp32; the ISA converts contiguous runs.
template <class Is>
inline void convert_row(const float* s, i64 st, float* d, i64 n) {
  if (st == 1) {
    std::memcpy(d, s, sizeof(float) * n);
  } else {
    for (i64 i = 0; i < n; ++i) d[i] = s[i * st];
  }
}
template <class Is>
inline void convert_row(const Bf16* s, i64 st, float* d, i64 n) {
  if (st == 1) {
    Is::cvt_bf16(reinterpret_cast<const std::uint16_t*>(s), d, n);
  } else {
    for (i64 i = 0; i < n; ++i) d[i] = to_f32(s[i * st]);
  }
}
template <class Is>
inline void convert_row(const Half* s, i64 st, float* d, i64 n) {
  if (st == 1) {
    Is::cvt_f16(reinterpret_cast<const std::uint16_t*>(s), d, n);
  } else {
    for (i64 i = 0; i < n; ++i) d[i] = to_f32(s[i * st]);
  }
}

// d[j*ld + i] = s[i*ls + j] for an 8x8 fp32 block: packing query rows into the transposed panels and writing
// the output back. With AVX2 it is 24 shuffles instead of 64 strided scalar moves (which were ~12% of a short
// sequence such as CLIP's 77 tokens).
inline void transpose8(const float* s, i64 ls, float* d, i64 ld) {
#ifdef __AVX2__
  __m256 r[8], t[8];
  for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(s + i * ls);
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    r[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
    r[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xEE);
    r[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    r[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
  }
  for (int i = 0; i < 4; ++i) {
    _mm256_storeu_ps(d + i * ld, _mm256_permute2f128_ps(r[i], r[i + 4], 0x20));
    _mm256_storeu_ps(d + (i + 4) * ld, _mm256_permute2f128_ps(r[i], r[i + 4], 0x31));
  }
#else
  for (int i = 0; i < 8; ++i)
    for (int j = 0; j < 8; ++j) d[j * ld + i] = s[i * ls + j];
#endif
}

inline float load_mask_value(const void* base, ScalarType t, i64 off) {
  switch (t) {
    case ScalarType::F32: return static_cast<const float*>(base)[off];
    case ScalarType::BF16: return to_f32(static_cast<const Bf16*>(base)[off]);
    case ScalarType::F16: return to_f32(static_cast<const Half*>(base)[off]);
  }
  return 0.f;
}

// ---- per-thread scratch ----------------------------------------------------------------------------
struct Scratch {
  float* base = nullptr;
  float *qp, *o, *s, *kt, *vt, *m, *l, *alpha, *rows;  // rows: 8 query rows in fp32 (packing, write-back)
  explicit Scratch(i64 bq, i64 bk, i64 pw, i64 d, i64 dv) {
    auto up = [](i64 n) { return (n + 15) & ~i64(15); };  // keep each region 64-byte aligned
    const i64 nq = up(bq * d), no = up(bq * dv), ns = up(bk * pw), nk = up(bk * d), nv = up(bk * dv), nb = up(bq),
              nr = 8 * (d > dv ? d : dv);
    base = static_cast<float*>(
        ::operator new(sizeof(float) * (nq + no + ns + nk + nv + 3 * nb + nr), std::align_val_t(64)));
    qp = base;
    o = qp + nq;
    s = o + no;
    kt = s + ns;
    vt = kt + nk;
    m = vt + nv;
    l = m + nb;
    alpha = l + nb;
    rows = alpha + nb;
  }
  ~Scratch() { ::operator delete(base, std::align_val_t(64)); }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
};

struct Plan {
  const AttentionParams* p;
  i64 n_items;
  i64 next = 0;  // next work item to hand out (atomic builtins; no std::atomic instantiation in ISA units)
  i64 bq, bk, n_qb, group;
  float score_scale;
  bool k_direct, v_direct;
};

template <class Is, class E>
struct Kernel {
  static constexpr int W = Is::W, NV = Is::NV, PW = Is::W * Is::NV, R = Is::R;
  // Queries per transposed group when packing Q and writing O (8x8 blocks; the scalar path's panel is 4 wide).
  static constexpr int G = PW % 8 == 0 ? 8 : PW;
  // d[j*ld + i] = s[i*ls + j] for i < RS, j < CS.
  template <int RS, int CS>
  static void transpose(const float* s, i64 ls, float* d, i64 ld) {
    if constexpr (RS == 8 && CS == 8) {
      transpose8(s, ls, d, ld);
    } else {
      for (int i = 0; i < RS; ++i)
        for (int j = 0; j < CS; ++j) d[j * ld + i] = s[i * ls + j];
    }
  }
  using V = typename Is::V;
  using M = typename Is::M;
  // exp2 polynomial degree: fp32 data needs ~1 ulp; bf16/fp16 outputs can't show errors below ~1e-4.
  static constexpr int kExpDeg = std::is_same_v<E, float> ? 6 : 4;

  // Both GEMMs are C[RR x PW] = A[RR x K] * B[K x PW] with B and C of row stride PW, register-blocked as
  // RR x NV vectors (12 accumulators on AVX2), A broadcast one element at a time.

  // QK: A(r, k) = A[r*lda + k] (rows = keys), K = head_dim. C = scale (per column; null = 1) * A*B.
  // The dot product is summed in chunks of kDimChunk, each from zero in registers and then added to C, so the fp32
  // rounding of long dot products (head_dim 128..512) stays at the level of a blocked GEMM, not of one long chain.
  // 32: chunks of 16 were ~5% slower, one long chain failed the "<= 2x SDPA's error" rule at head_dim 96..512.
  // head_dim >= 256 uses 64 (3% faster there; scores are summed from more, smaller terms per chunk at the usual
  // 1/sqrt(D) scale, and the error stayed at SDPA's level), and so do 128 and 192 (two or three chunks: +3-4% at
  // 128, each fold through memory costs; worst error seen 1.45x SDPA's at 128, 1.6x at 256; 96 as 64 + 32 did not
  // stay within 2x). head_dim <= 64 is one chunk: no fold through memory
  // (~3% faster at 64; a 64-long chain stayed within the error rule, 96 did not).
  static constexpr i64 kDimChunk = 32, kDimChunkWide = 64;
  // acc: C already holds a partial sum (an earlier block of head_dim) to add to.
  // mx (final block only, may be null): per-column running max of the stored values (saves the softmax a pass
  // over the tile). It may drop NaN; see softmax_tile for why that is harmless.
  // Micro-kernels stay out of line, so every dtype instantiation runs the same machine code for them.
  template <int RR, i64 CHUNK>
  __attribute__((noinline)) static void micro_qk(i64 K, const float* __restrict A, i64 lda, const float* __restrict B,
                              float* __restrict C, const float* __restrict scale, bool acc, float* __restrict mx) {
    const float* a[RR];
#pragma GCC unroll 16
    for (int r = 0; r < RR; ++r) a[r] = A + r * lda;
    V c[RR][NV];
#pragma GCC unroll 16
    for (int r = 0; r < RR; ++r)
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) c[r][v] = Is::zero();  // (K >= 1 always; keeps the compiler sure of it)
    for (i64 k0 = 0; k0 < K; k0 += CHUNK) {
#pragma GCC unroll 16
      for (int r = 0; r < RR; ++r)
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) c[r][v] = Is::zero();
      const i64 k1 = imin(K, k0 + CHUNK);
      for (i64 k = k0; k < k1; ++k) {
        V b[NV];
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) b[v] = Is::load(B + k * PW + v * W);
#pragma GCC unroll 16
        for (int r = 0; r < RR; ++r) {
          const V x = Is::bcast(a[r] + k);
#pragma GCC unroll 4
          for (int v = 0; v < NV; ++v) c[r][v] = Is::fma(x, b[v], c[r][v]);
        }
      }
      if (k1 < K) {  // not the last chunk: fold into C
        if (k0 == 0 && !acc) {
#pragma GCC unroll 16
          for (int r = 0; r < RR; ++r)
#pragma GCC unroll 4
            for (int v = 0; v < NV; ++v) Is::store(C + r * PW + v * W, c[r][v]);
        } else {
#pragma GCC unroll 16
          for (int r = 0; r < RR; ++r)
#pragma GCC unroll 4
            for (int v = 0; v < NV; ++v) Is::store(C + r * PW + v * W, Is::add(Is::load(C + r * PW + v * W), c[r][v]));
        }
      } else if (k0 > 0 || acc) {
#pragma GCC unroll 16
        for (int r = 0; r < RR; ++r)
#pragma GCC unroll 4
          for (int v = 0; v < NV; ++v) c[r][v] = Is::add(Is::load(C + r * PW + v * W), c[r][v]);
      }
    }
    if (scale != nullptr) {
      V sv[NV];
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) sv[v] = Is::load(scale + v * W);
#pragma GCC unroll 16
      for (int r = 0; r < RR; ++r)
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) c[r][v] = Is::mul(c[r][v], sv[v]);
    }
    if (mx != nullptr) {
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) {
        V m = Is::load(mx + v * W);
#pragma GCC unroll 16
        for (int r = 0; r < RR; ++r) m = Is::max(m, c[r][v]);
        Is::store(mx + v * W, m);
      }
    }
#pragma GCC unroll 16
    for (int r = 0; r < RR; ++r)
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) Is::store(C + r * PW + v * W, c[r][v]);
  }

  // PV: A(r, k) = A[r + k*lda] (rows = value dims, K = keys of the tile). C = alpha (per column) * C + A*B,
  // the tile's products summed from zero first (short chains), then folded in with one fma.
  template <int RR>
  __attribute__((noinline)) static void micro_pv(i64 K, const float* __restrict A, i64 lda, const float* __restrict B,
                              float* __restrict C, const float* __restrict alpha) {
    // One or two rows (the value-dim tail at head_dim 128 and 512, 2 = 128 mod 6) have too few accumulators to
    // cover the FMA latency: they get a second set for odd keys (micro_pv<2> ran at about half the speed per flop).
    constexpr int NS = RR <= 2 ? 2 : 1;
    V c[NS][RR][NV];
#pragma GCC unroll 2
    for (int s = 0; s < NS; ++s)
#pragma GCC unroll 16
      for (int r = 0; r < RR; ++r)
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) c[s][r][v] = Is::zero();
    auto step = [&](i64 k, V(&cs)[RR][NV]) __attribute__((always_inline)) {
      V b[NV];
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) b[v] = Is::load(B + k * PW + v * W);
      const float* a = A + k * lda;
#pragma GCC unroll 16
      for (int r = 0; r < RR; ++r) {
        const V x = Is::bcast(a + r);
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) cs[r][v] = Is::fma(x, b[v], cs[r][v]);
      }
    };
    i64 k = 0;
    if constexpr (NS == 2) {
      for (; k + 1 < K; k += 2) {
        step(k, c[0]);
        step(k + 1, c[1]);
      }
#pragma GCC unroll 16
      for (int r = 0; r < RR; ++r)
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) c[0][r][v] = Is::add(c[0][r][v], c[1][r][v]);
    }
    for (; k < K; ++k) step(k, c[0]);
    V al[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) al[v] = Is::load(alpha + v * W);
#pragma GCC unroll 16
    for (int r = 0; r < RR; ++r)
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v)
        Is::store(C + r * PW + v * W, Is::fma(Is::load(C + r * PW + v * W), al[v], c[0][r][v]));
  }

  template <int RR, i64 CHUNK>
  static inline void qk_tail(int rem, i64 K, const float* A, i64 lda, const float* B, float* C, const float* scale,
                             bool acc, float* mx) {
    if (rem == RR) {
      micro_qk<RR, CHUNK>(K, A, lda, B, C, scale, acc, mx);
    } else if constexpr (RR > 1) {
      qk_tail<RR - 1, CHUNK>(rem, K, A, lda, B, C, scale, acc, mx);
    }
  }
  template <int RR>
  static inline void pv_tail(int rem, i64 K, const float* A, i64 lda, const float* B, float* C, const float* alpha) {
    if (rem == RR) {
      micro_pv<RR>(K, A, lda, B, C, alpha);
    } else if constexpr (RR > 1) {
      pv_tail<RR - 1>(rem, K, A, lda, B, C, alpha);
    }
  }

  // S^T[key][query] = K (rows = keys, row stride lda) · Qp panel (D x PW).
  // head_dim is walked in blocks of kDimBlock so the block of the Q panel (kDimBlock x PW floats) stays in L1
  // while every key group of the tile uses it (a 512 x 16 fp32 panel alone would fill a 32 KiB L1).
  static constexpr i64 kDimBlock = 128;
  static void gemm_qk(i64 rows, i64 D, const float* A, i64 lda, const float* B, float* C, const float* scale,
                      float* mx) {
    if (D >= 256 || D <= kDimChunkWide || D % kDimChunkWide == 0)
      gemm_qk_impl<kDimChunkWide>(rows, D, A, lda, B, C, scale, mx);
    else gemm_qk_impl<kDimChunk>(rows, D, A, lda, B, C, scale, mx);
  }
  template <i64 CHUNK>
  static void gemm_qk_impl(i64 rows, i64 D, const float* A, i64 lda, const float* B, float* C, const float* scale,
                           float* mx) {
    for (i64 d0 = 0; d0 < D; d0 += kDimBlock) {
      const i64 dl = imin(kDimBlock, D - d0);
      const bool last = d0 + dl >= D;
      const float* sc = last ? scale : nullptr;
      float* m = last ? mx : nullptr;
      const bool acc = d0 > 0;
      i64 r0 = 0;
      for (; r0 + R <= rows; r0 += R)
        micro_qk<R, CHUNK>(dl, A + r0 * lda + d0, lda, B + d0 * PW, C + r0 * PW, sc, acc, m);
      if (r0 < rows)
        qk_tail<R - 1, CHUNK>(int(rows - r0), dl, A + r0 * lda + d0, lda, B + d0 * PW, C + r0 * PW, sc, acc, m);
    }
  }
  // O^T[dv][query] = alpha * O^T + V^T (V rows = keys, row stride lda) · P^T (keys x PW).
  static void gemm_pv(i64 rows, i64 K, const float* A, i64 lda, const float* B, float* C, const float* alpha) {
    i64 r0 = 0;
    for (; r0 + R <= rows; r0 += R) micro_pv<R>(K, A + r0, lda, B, C + r0 * PW, alpha);
    if (r0 < rows) pv_tail<R - 1>(int(rows - r0), K, A + r0, lda, B, C + r0 * PW, alpha);
  }

  // S[j * PW] *= cs for one vector column. Out of line on purpose: inlined, GCC's default -ffp-contract=fast may
  // fuse this product with the later subtraction of the max into an fma, which keeps the residue it must drop.
  __attribute__((noinline)) static void scale_column(float* S, i64 nk, float cs_scalar) {
    const V cs = Is::set1(cs_scalar);
    for (i64 j = 0; j < nk; ++j) Is::store(S + j * PW, Is::mul(Is::load(S + j * PW), cs));
  }

  // p = exp2(s * cs - max) (FMA: S holds raw scores) or exp2(s - max) in place down one vector column of S;
  // returns the column sums. One running sum, fed pairwise: two sums plus the exp constants spilled a sum to the
  // stack (AVX2 has 16 registers), and the store/reload then set the pace of the loop.
  template <bool FMA>
  __attribute__((always_inline)) static inline V exp_column(float* S, i64 nk, V cs, V nmu) {
    auto arg = [&](V x) { return FMA ? Is::fma(x, cs, nmu) : Is::add(x, nmu); };
    V sum = Is::zero();
    i64 j = 0;
    for (; j + 1 < nk; j += 2) {
      V p0 = Is::template exp2<kExpDeg>(arg(Is::load(S + j * PW)));
      V p1 = Is::template exp2<kExpDeg>(arg(Is::load(S + (j + 1) * PW)));
      Is::store(S + j * PW, p0);
      Is::store(S + (j + 1) * PW, p1);
      sum = Is::add(sum, Is::add(p0, p1));
    }
    if (j < nk) {
      V p0 = Is::template exp2<kExpDeg>(arg(Is::load(S + j * PW)));
      Is::store(S + j * PW, p0);
      sum = Is::add(sum, p0);
    }
    return sum;
  }

  // Online softmax on one panel's score tile S[nk][PW], vertically: lane = query. Turns S into P in place;
  // updates m (running max, log2 units), l; writes the rescale factor of the old accumulator to alpha.
  // RAW: S holds raw q·k and cs = scale*log2(e) > 0; the exponent is then fma(s, cs, -max) with a single rounding
  // (the rounding of the max itself is a common shift that cancels in the normalisation). Otherwise S is already
  // in log2 units.
  // FUSED: the column maxima of S were already gathered by the Q·K^T kernel into `fmax`.
  // NaN: the max may or may not keep a NaN score, but exp2 of a NaN score is NaN either way, so the row's l and
  // output become NaN, as in PyTorch. (A row whose only visible scores are NaN keeps m = -inf: its p are still
  // NaN, l = NaN != 0, so it is not mistaken for a fully masked row.)
  template <bool RAW, bool FUSED>
  static inline void softmax_tile(float* S, i64 nk, float* m, float* l, float* alpha, float cs_scalar,
                                  const float* fmax) {
    const V ninf = Is::set1(kNegInf);
    const V zero = Is::zero();
    const V cs = Is::set1(cs_scalar);
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      V mt = ninf;
      if constexpr (FUSED) {
        mt = Is::load(fmax + v * W);
      } else {
        V mt1 = ninf;
        i64 j = 0;
        for (; j + 1 < nk; j += 2) {
          mt = Is::max(mt, Is::load(S + j * PW + v * W));
          mt1 = Is::max(mt1, Is::load(S + (j + 1) * PW + v * W));
        }
        if (j < nk) mt = Is::max(mt, Is::load(S + j * PW + v * W));
        mt = Is::max(mt, mt1);
      }
      if constexpr (RAW) mt = Is::mul(mt, cs);  // cs > 0: max commutes with the scaling
      const V mo = Is::load(m + v * W);
      const V mn = Is::max(mo, mt);
      // A row with nothing visible yet keeps m = -inf; subtract 0 there so exp2(-inf) = 0, not NaN.
      const V mu = Is::select(Is::eq(mn, ninf), zero, mn);
      const V nmu = Is::sub(zero, mu);
      const V al = Is::template exp2<kExpDeg>(Is::sub(mo, mu));
      V sum;
      if constexpr (RAW) {
        // The fma keeps the max's own rounding residue, up to half an ulp of mu: beyond 2^24 (scale * |q·k| of
        // ~1e7, e.g. scale 1e10) that leaves exp2's range and zeroed or garbled the whole row. There, round the
        // products first (in S), so the max's exponent is exactly 0 and every other one <= 0.
        alignas(64) float mus[W];
        Is::store(mus, mu);
        bool huge = false;
        for (int i = 0; i < W; ++i) huge |= std::fabs(mus[i]) >= 16777216.f;
        if (huge) {
          scale_column(S + v * W, nk, cs_scalar);
          sum = exp_column<false>(S + v * W, nk, cs, nmu);
        } else {
          sum = exp_column<true>(S + v * W, nk, cs, nmu);
        }
      } else {
        sum = exp_column<false>(S + v * W, nk, cs, nmu);
      }
      Is::store(l + v * W, Is::fma(Is::load(l + v * W), al, sum));
      Is::store(m + v * W, mn);
      Is::store(alpha + v * W, al);
    }
  }

  // Bool mask: hide keys (-inf). Additive mask: S holds raw q·k here; S = S * cs + log2(e) * mask.
  static void apply_mask(const AttentionParams& p, i64 b, i64 h, i64 qa, i64 nvalid, i64 k0, i64 nk, float* S,
                         float cs) {
    const i64* ms = p.mask_stride;
    if (p.mask_kind == MaskKind::Bool) {
      const std::uint8_t* base = static_cast<const std::uint8_t*>(p.mask) + b * ms[0] + h * ms[1];
      for (i64 c = 0; c < nvalid; ++c) {
        const std::uint8_t* row = base + (qa + c) * ms[2] + k0 * ms[3];
        for (i64 j = 0; j < nk; ++j)
          if (!row[j * ms[3]]) S[j * PW + c] = kNegInf;
      }
    } else {
      const i64 off0 = b * ms[0] + h * ms[1];
      for (i64 c = 0; c < nvalid; ++c) {
        const i64 off = off0 + (qa + c) * ms[2] + k0 * ms[3];
        for (i64 j = 0; j < nk; ++j)
          S[j * PW + c] = S[j * PW + c] * cs + kLog2e * load_mask_value(p.mask, p.mask_dtype, off + j * ms[3]);
      }
    }
  }

  static void work_item(const Plan& pl, Scratch& sc, i64 item) {
    const AttentionParams& p = *pl.p;
    const i64 D = p.head_dim, Dv = p.head_dim_v, Sq = p.seq_q, Sk = p.seq_kv;
    // Items come as (b, h, t), handed out in order; causal blocks go heaviest (last queries) first so the light
    // ones fill in at the end.
    const i64 t = item % pl.n_qb;
    const i64 bh = item / pl.n_qb;
    const i64 qb = p.causal ? pl.n_qb - 1 - t : t;
    const i64 h = bh % p.heads_q, b = bh / p.heads_q;
    const i64 hk = h / pl.group;
    const i64 q0 = qb * pl.bq;
    const i64 nq = imin(pl.bq, Sq - q0);
    const i64 npan = ceil_div(nq, PW);

    // Raw scores need a positive scale: -inf (hidden keys) must stay -inf through the scaling.
    const bool raw = p.mask_kind != MaskKind::Additive && pl.score_scale > 0.f;
    alignas(64) float csv[PW];
    for (int i = 0; i < PW; ++i) csv[i] = pl.score_scale;
    // Pack the query block, transposed into panels, G queries at a time: rows to fp32 (in place when they are
    // fp32 with unit stride), then 8x8 transposes. Queries past the block are zeros.
    const E* qbase = static_cast<const E*>(p.q) + b * p.q_stride[0] + h * p.q_stride[1];
    const i64 qst = p.q_stride[3];
    for (i64 pan = 0; pan < npan; ++pan) {
      float* dst = sc.qp + pan * D * PW;
      for (i64 c0 = 0; c0 < PW; c0 += G) {
        const i64 r0 = pan * PW + c0;
        const float* src = sc.rows;
        i64 ls = D;
        if (std::is_same_v<E, float> && qst == 1 && r0 + G <= nq) {
          src = reinterpret_cast<const float*>(qbase + (q0 + r0) * p.q_stride[2]);
          ls = p.q_stride[2];
        } else {
          for (i64 i = 0; i < G; ++i) {
            if (r0 + i < nq) convert_row<Is>(qbase + (q0 + r0 + i) * p.q_stride[2], qst, sc.rows + i * D, D);
            else std::memset(sc.rows + i * D, 0, sizeof(float) * D);
          }
        }
        i64 d = 0;
        for (; d + 8 <= D; d += 8) transpose<G, 8>(src + d, ls, dst + d * PW + c0, PW);
        for (; d < D; ++d)
          for (i64 i = 0; i < G; ++i) dst[d * PW + c0 + i] = src[i * ls + d];
      }
    }
    std::memset(sc.o, 0, sizeof(float) * npan * Dv * PW);
    for (i64 i = 0; i < npan * PW; ++i) {
      sc.m[i] = kNegInf;
      sc.l[i] = 0.f;
    }

    const E* kbase = static_cast<const E*>(p.k) + b * p.k_stride[0] + hk * p.k_stride[1];
    const E* vbase = static_cast<const E*>(p.v) + b * p.v_stride[0] + hk * p.v_stride[1];
    const i64 kend = p.causal ? imin(Sk, q0 + nq) : Sk;  // keys past the block's last query are never visible
    for (i64 k0 = 0; k0 < kend; k0 += pl.bk) {
      const i64 nk = imin(pl.bk, kend - k0);
      const float* kt;
      const float* vt;
      i64 kld, vld;
      if (pl.k_direct) {
        kt = reinterpret_cast<const float*>(kbase + k0 * p.k_stride[2]);
        kld = p.k_stride[2];
      } else {
        for (i64 j = 0; j < nk; ++j)
          convert_row<Is>(kbase + (k0 + j) * p.k_stride[2], p.k_stride[3], sc.kt + j * D, D);
        kt = sc.kt;
        kld = D;
      }
      if (pl.v_direct) {
        vt = reinterpret_cast<const float*>(vbase + k0 * p.v_stride[2]);
        vld = p.v_stride[2];
      } else {
        for (i64 j = 0; j < nk; ++j)
          convert_row<Is>(vbase + (k0 + j) * p.v_stride[2], p.v_stride[3], sc.vt + j * Dv, Dv);
        vt = sc.vt;
        vld = Dv;
      }
      for (i64 pan = 0; pan < npan; ++pan) {
        const i64 qa = q0 + pan * PW;
        const i64 nvalid = imin(PW, nq - pan * PW);
        i64 nkp = nk;
        if (p.causal) {
          nkp = imin(nk, qa + nvalid - k0);  // keys beyond the panel's last query: skip
          if (nkp <= 0) continue;
        }
        float* S = sc.s;
        // Raw scores when possible (see softmax_tile); otherwise log2 units: the GEMM scales by scale*log2(e),
        // or the additive mask does it together with the add.
        const bool additive = p.mask_kind == MaskKind::Additive;
        // Unmasked tile: the GEMM gathers the column maxima. A masked tile needs them after masking.
        const bool diag = p.causal && k0 + nkp - 1 > qa;
        const bool fused = p.mask_kind == MaskKind::None && !diag;
        alignas(64) float fmax[PW];
        if (fused)
          for (int i = 0; i < PW; ++i) fmax[i] = kNegInf;
        gemm_qk(nkp, D, kt, kld, sc.qp + pan * D * PW, S, (raw || additive) ? nullptr : csv, fused ? fmax : nullptr);
        if (additive) apply_mask(p, b, h, qa, nvalid, k0, nkp, S, pl.score_scale);
        if (diag) {
          // Diagonal tile: key k0+j is hidden from queries qa+c with qa+c < k0+j.
          for (i64 j = 0; j < nkp; ++j) {
            const i64 lim = k0 + j - qa;
            for (i64 c = 0; c < lim; ++c) S[j * PW + c] = kNegInf;
          }
        }
        if (p.mask_kind == MaskKind::Bool) apply_mask(p, b, h, qa, nvalid, k0, nkp, S, pl.score_scale);
        float* mp = sc.m + pan * PW;
        float* lp = sc.l + pan * PW;
        float* ap = sc.alpha + pan * PW;
        if (raw) {
          if (fused) softmax_tile<true, true>(S, nkp, mp, lp, ap, pl.score_scale, fmax);
          else softmax_tile<true, false>(S, nkp, mp, lp, ap, pl.score_scale, nullptr);
        } else {
          if (fused) softmax_tile<false, true>(S, nkp, mp, lp, ap, 1.f, fmax);
          else softmax_tile<false, false>(S, nkp, mp, lp, ap, 1.f, nullptr);
        }
        gemm_pv(Dv, nkp, vt, vld, S, sc.o + pan * Dv * PW, sc.alpha + pan * PW);
      }
    }

    // Normalise (vertically, lane = query) and write out G queries at a time through 8x8 transposes, straight
    // into the output when it is fp32 with unit stride. Rows that saw no key (l == 0) are zeros.
    E* obase = static_cast<E*>(p.out) + b * p.out_stride[0] + h * p.out_stride[1];
    const i64 ost = p.out_stride[3];
    for (i64 pan = 0; pan < npan; ++pan) {
      float* o = sc.o + pan * Dv * PW;
      alignas(64) float inv[PW];
      alignas(64) float keep[PW];  // all-ones bits where l != 0 (select mask source)
      for (int c = 0; c < PW; ++c) {
        const float lv = sc.l[pan * PW + c];
        inv[c] = lv == 0.f ? 0.f : 1.f / lv;
        keep[c] = lv == 0.f ? 0.f : 1.f;
      }
      if (p.lse) {  // m is in log2 units: lse = ln(2) * (m + log2(l))
        float* lrow = p.lse + (b * p.heads_q + h) * p.seq_q + q0 + pan * PW;
        for (i64 c = 0; c < PW && pan * PW + c < nq; ++c) {
          const float lv = sc.l[pan * PW + c];
          lrow[c] = lv == 0.f ? kNegInf : kLn2 * (sc.m[pan * PW + c] + std::log2(lv));
        }
      }
      for (int v = 0; v < NV; ++v) {
        const V iv = Is::load(inv + v * W);
        const auto zero_row = Is::eq(Is::load(keep + v * W), Is::zero());
        for (i64 d = 0; d < Dv; ++d) {
          float* x = o + d * PW + v * W;
          Is::store(x, Is::select(zero_row, Is::zero(), Is::mul(Is::load(x), iv)));
        }
      }
      for (i64 c0 = 0; c0 < PW && pan * PW + c0 < nq; c0 += G) {
        const i64 r0 = pan * PW + c0;
        const i64 nr = imin(G, nq - r0);
        const bool direct = std::is_same_v<E, float> && ost == 1 && nr == G;
        float* dst = direct ? reinterpret_cast<float*>(obase + (q0 + r0) * p.out_stride[2]) : sc.rows;
        const i64 ld = direct ? p.out_stride[2] : Dv;
        i64 d = 0;
        for (; d + 8 <= Dv; d += 8) transpose<8, G>(o + d * PW + c0, PW, dst + d, ld);
        for (; d < Dv; ++d)
          for (i64 i = 0; i < G; ++i) dst[i * ld + d] = o[d * PW + c0 + i];
        if (!direct) {
          for (i64 i = 0; i < nr; ++i) {
            E* row = obase + (q0 + r0 + i) * p.out_stride[2];
            for (i64 dd = 0; dd < Dv; ++dd) from_f32(sc.rows[i * Dv + dd], row + dd * ost);
          }
        }
      }
    }
  }

  // Each chunk the caller's parallel_for hands us is treated as "a worker is free": it pulls items from a shared
  // counter until none are left. This balances causal work and survives a core being busy with something else
  // (a static split would wait for the slowest half). Results do not depend on which worker runs an item.
  static void chunk(void* ctx, i64 begin, i64 end) {
    if (begin >= end) return;
    Plan& pl = *static_cast<Plan*>(ctx);
    i64 it = __atomic_fetch_add(&pl.next, 1, __ATOMIC_RELAXED);
    if (it >= pl.n_items) return;
    Scratch sc(pl.bq, pl.bk, PW, pl.p->head_dim, pl.p->head_dim_v);
    for (; it < pl.n_items; it = __atomic_fetch_add(&pl.next, 1, __ATOMIC_RELAXED)) work_item(pl, sc, it);
  }

  static void run(const AttentionParams& p) {
    const i64 bh = p.batch * p.heads_q;
    if (bh == 0 || p.seq_q == 0 || p.head_dim_v == 0) return;
    Plan pl;
    pl.p = &p;
    pl.group = p.heads_kv > 0 ? p.heads_q / p.heads_kv : 1;
    pl.score_scale = p.scale * kLog2e;
    // Key tile: twice as long for head sizes <= 128, where the K/V tiles are small: fewer micro-kernel calls, whose
    // fixed cost (C read/write, epilogue) is then spread over more keys (+0.5-1.5% at 64 and 128). At 512, 192 keys
    // no longer fit L2 next to the query block (-4%), and 48 or 72 were no better than 96.
    pl.bk = imax(p.head_dim, p.head_dim_v) <= 128 ? 2 * Is::BK : Is::BK;
    pl.k_direct = std::is_same_v<E, float> && p.k_stride[3] == 1;
    pl.v_direct = std::is_same_v<E, float> && p.v_stride[3] == 1;
    // Query block: big enough to amortise K/V conversion (every block converts the head's K/V tiles), small
    // enough to give every core several items (dynamic scheduling balances the rest).
    static const i64 cores = imax(1, i64(std::thread::hardware_concurrency()));  // (a syscall: ask once)
    const i64 min_items = (pl.k_direct && pl.v_direct ? 8 : 4) * cores;
    i64 bq = Is::BQ;
    while (bq > PW && bh * ceil_div(p.seq_q, bq) < min_items) bq /= 2;
    if (bq < PW) bq = PW;
    pl.bq = bq;
    pl.n_qb = ceil_div(p.seq_q, bq);
    const i64 n = bh * pl.n_qb;
    pl.n_items = n;
    if (p.parallel_for && n > 1) {
      p.parallel_for(n, &pl, &Kernel::chunk);
    } else {
      chunk(&pl, 0, n);
    }
  }
};

template <class Is>
void run_forward(const AttentionParams& p) {
  switch (p.dtype) {
    case ScalarType::F32: Kernel<Is, float>::run(p); break;
    case ScalarType::BF16: Kernel<Is, Bf16>::run(p); break;
    case ScalarType::F16: Kernel<Is, Half>::run(p); break;
  }
}

}  // namespace
}  // namespace attnsel::cpu::detail
