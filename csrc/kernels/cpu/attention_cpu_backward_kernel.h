// Shared CPU attention backward algorithm. Include ONLY from attention_cpu_backward{,_avx2}.cpp: everything is in
// an anonymous namespace, so each unit (compiled with its own ISA flags) keeps a private copy (no ODR merging of
// AVX code into the baseline path). Block products run on a small register-blocked kernel written with GCC vector types.
//
// FlashAttention-2 style, fp32 accumulation. With s = scale * q.k + mask, P = exp(s - lse) (recomputed from the
// forward's log-sum-exp), dP = dO . V^T, dS = P * (dP - delta), delta = rowsum(dO * O) - d(lse):
//   dV = sum P^T dO, dK = scale * sum dS^T Q (over the kv head's whole query-head group: grouped-query heads are
//   summed without atomics), dQ = scale * sum dS K. Two schedules:
//   * fused (enough batch x kv heads to load every core): one work item per (batch, kv head) walks its key blocks
//     and, per block, every query block of the group: 5 block products per tile, dQ summed in an fp32 buffer;
//   * split (few heads, e.g. a VAE's single head): pass 1 has one item per (batch, kv head, key block) for dK, dV,
//     pass 2 one per (batch, query head, query block) for dQ; both recompute P and dP (7 block products instead
//     of 5), but every output keeps one writer and there are items for every core.
// Causal blocks that see no key are skipped.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <thread>
#include <utility>
#include <vector>

#include "attention_cpu_backward.h"
#include "attention_cpu_elements.h"

namespace attnsel::cpu::detail {
namespace {

using kernels::AttentionParams;
using kernels::MaskKind;
using kernels::ScalarType;
using i64 = std::int64_t;

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

inline i64 bmin(i64 a, i64 b) { return a < b ? a : b; }
inline i64 bmax(i64 a, i64 b) { return a > b ? a : b; }
inline i64 bceil_div(i64 a, i64 b) { return (a + b - 1) / b; }

template <class T>
inline void load_row(const T* s, i64 st, float* __restrict d, i64 n) {
  if (st == 1) {
    for (i64 i = 0; i < n; ++i) d[i] = to_f32(s[i]);
  } else {
    for (i64 i = 0; i < n; ++i) d[i] = to_f32(s[i * st]);
  }
}

template <class T>
inline void store_row(const float* __restrict s, float mul, T* d, i64 st, i64 n) {
  for (i64 i = 0; i < n; ++i) from_f32(s[i] * mul, d + i * st);
}

// VW floats as one GCC vector: the including unit sets ATTNSEL_BWD_VEC_WIDTH (16 for AVX-512, 8 otherwise; the
// baseline unit's 8-wide vectors become pairs of SSE registers).
#ifndef ATTNSEL_BWD_VEC_WIDTH
#define ATTNSEL_BWD_VEC_WIDTH 8
#endif
constexpr int VW = ATTNSEL_BWD_VEC_WIDTH;
typedef float vf __attribute__((vector_size(VW * 4)));
typedef std::int32_t vi __attribute__((vector_size(VW * 4)));

inline vf loadv(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline void storev(float* p, vf v) { std::memcpy(p, &v, sizeof(v)); }
// Every lane x ({} + x would cost a scalar add before the broadcast: 0 + x is not x for x = -0).
template <std::size_t... I>
inline vf splat_lanes(float x, std::index_sequence<I...>) {
  return vf{((void)I, x)...};
}
inline vf splat(float x) { return splat_lanes(x, std::make_index_sequence<VW>{}); }

// exp(x) for x <= ~0 (scores minus their row's log-sum-exp); exactly 0 below -87 (masked keys stay exactly 0).
// 2^n * e^y with n = round(x log2 e), |y| <= ln2/2, degree-7 Taylor polynomial: relative error ~1e-7.
inline vf expv(vf x) {
  const vf tiny = splat(-87.f);
  const auto dead = x < tiny;
  x = dead ? tiny : x;
  const vf magic = splat(12582912.f);  // 1.5 * 2^23: adding it rounds to an integer
  const vf t = x * splat(1.44269504088896341f);
  const vf r = (t + magic) - magic;
  const vf y = (t - r) * splat(0.69314718055994531f);
  vf p = splat(1.f / 5040);
  p = p * y + splat(1.f / 720);
  p = p * y + splat(1.f / 120);
  p = p * y + splat(1.f / 24);
  p = p * y + splat(1.f / 6);
  p = p * y + splat(0.5f);
  p = p * y + splat(1.f);
  p = p * y + splat(1.f);
  const vi n = __builtin_convertvector(r, vi);
  const vf two_n = (vf)((n + 127) << 23);
  return dead ? splat(0.f) : p * two_n;
}

// C[m][n] += sum_k A(m, k) * B[k][n] for RM rows: A(m, k) = A[m * ars + k * aks]; B and C rows are contiguous.
// Register block RM x 2VW (two vectors per row); the K loop sums in registers from zero and adds to C at the end
// (gemm passes at most kChunk terms: shorter fp32 sums). Not inlined: inlined into the callers, GCC kept the
// accumulators on the stack.
template <int RM>
__attribute__((noinline)) void gemm_rows(i64 N, i64 K, const float* A, i64 ars, i64 aks, const float* B, i64 ldb,
                                         float* C, i64 ldc) {
  i64 n = 0;
  for (; n + 2 * VW <= N; n += 2 * VW) {
    vf c0[RM], c1[RM];
    _Pragma("GCC unroll 8") for (int r = 0; r < RM; ++r) c0[r] = vf{}, c1[r] = vf{};
    for (i64 k = 0; k < K; ++k) {
      const vf b0 = loadv(B + k * ldb + n), b1 = loadv(B + k * ldb + n + VW);
      _Pragma("GCC unroll 8") for (int r = 0; r < RM; ++r) {
        const vf a = splat(A[r * ars + k * aks]);
        c0[r] += a * b0;
        c1[r] += a * b1;
      }
    }
    _Pragma("GCC unroll 8") for (int r = 0; r < RM; ++r) {
      storev(C + r * ldc + n, loadv(C + r * ldc + n) + c0[r]);
      storev(C + r * ldc + n + VW, loadv(C + r * ldc + n + VW) + c1[r]);
    }
  }
  for (; n + VW <= N; n += VW) {
    vf c0[RM];
    _Pragma("GCC unroll 8") for (int r = 0; r < RM; ++r) c0[r] = vf{};
    for (i64 k = 0; k < K; ++k) {
      const vf b0 = loadv(B + k * ldb + n);
      _Pragma("GCC unroll 8") for (int r = 0; r < RM; ++r) c0[r] += splat(A[r * ars + k * aks]) * b0;
    }
    _Pragma("GCC unroll 8") for (int r = 0; r < RM; ++r) storev(C + r * ldc + n, loadv(C + r * ldc + n) + c0[r]);
  }
  for (; n < N; ++n) {
    for (int r = 0; r < RM; ++r) {
      float c = 0.f;
      for (i64 k = 0; k < K; ++k) c += A[r * ars + k * aks] * B[k * ldb + n];
      C[r * ldc + n] += c;
    }
  }
}

inline void gemm_chunk(i64 M, i64 N, i64 K, const float* A, i64 ars, i64 aks, const float* B, i64 ldb, float* C,
                       i64 ldc) {
  constexpr int RM = 6;
  i64 m = 0;
  for (; m + RM <= M; m += RM) gemm_rows<RM>(N, K, A + m * ars, ars, aks, B, ldb, C + m * ldc, ldc);
  const float* a = A + m * ars;
  float* c = C + m * ldc;
  switch (M - m) {
    case 5: gemm_rows<5>(N, K, a, ars, aks, B, ldb, c, ldc); break;
    case 4: gemm_rows<4>(N, K, a, ars, aks, B, ldb, c, ldc); break;
    case 3: gemm_rows<3>(N, K, a, ars, aks, B, ldb, c, ldc); break;
    case 2: gemm_rows<2>(N, K, a, ars, aks, B, ldb, c, ldc); break;
    case 1: gemm_rows<1>(N, K, a, ars, aks, B, ldb, c, ldc); break;
    default: break;
  }
}

// C += A . B (see gemm_rows), summing over K in chunks of at most 64 terms.
inline void gemm(i64 M, i64 N, i64 K, const float* A, i64 ars, i64 aks, const float* B, i64 ldb, float* C, i64 ldc) {
  constexpr i64 kChunk = 64;
  for (i64 k0 = 0; k0 < K; k0 += kChunk)
    gemm_chunk(M, N, bmin(kChunk, K - k0), A + k0 * aks, ars, aks, B + k0 * ldb, ldb, C, ldc);
}

inline float additive_mask_value(const void* m, ScalarType t, i64 off) {
  switch (t) {
    case ScalarType::BF16: return to_f32(static_cast<const Bf16*>(m)[off]);
    case ScalarType::F16: return to_f32(static_cast<const Half*>(m)[off]);
    default: return static_cast<const float*>(m)[off];
  }
}

template <class E>
struct Backward {
  static constexpr i64 BQ = 64, BK = 64;  // query rows x keys per block (BK: a multiple of VW)

  struct Plan {
    const AttentionBackwardParams* p;
    i64 group, n_qb, n_kb, n_items;
    i64 next;  // work counter, shared by the workers
    // Split schedule: every kv head's K (row-major) and K^T, V^T (rows padded to skp keys) in fp32, converted
    // once instead of once per tile; per head: [Sk][D], [D][skp], [Dv][skp]. Null in the fused schedule.
    float* kv_cache = nullptr;
    i64 skp = 0, head_floats = 0;
    // Split schedule: every query head's Q and dO in fp32, [Sq][D] then [Sq][Dv] per head (pass 1 reads each query
    // block once per key block).
    float* q_cache = nullptr;
  };

  // Per-worker fp32 tiles.
  struct Scratch {
    std::vector<float> q, dout, kf, kt, vt, s, dp, acc_a, acc_b;
    // Fused schedule: a kv head's query-head group converted once, [G][Sq][D] and [G][Sq][Dv], and its dQ.
    std::vector<float> q_group, dout_group, dq_group;
    const float* qb = nullptr;    // the current query block's rows, [nq][D] ...
    const float* doutb = nullptr;  // ... and their output gradients, [nq][Dv]
    const float* kfb = nullptr;    // the current key block: K rows [nk][D] ...
    const float* ktb = nullptr;    // ... K^T [D][ldt] and V^T [Dv][ldt]
    const float* vtb = nullptr;
    i64 ldt = BK;
    Scratch(i64 D, i64 Dv)
        : q(BQ * D), dout(BQ * bmax(Dv, 1)), kf(BK * D), kt(D * BK), vt(bmax(Dv, 1) * BK), s(BQ * BK), dp(BQ * BK),
          acc_a(bmax(BQ, BK) * D), acc_b(BK * bmax(Dv, 1)) {}
  };

  static const E* at(const void* base, const i64* st, i64 b, i64 h, i64 i) {
    return static_cast<const E*>(base) + b * st[0] + h * st[1] + i * st[2];
  }
  static E* at_mut(void* base, const i64* st, i64 b, i64 h, i64 i) {
    return static_cast<E*>(base) + b * st[0] + h * st[1] + i * st[2];
  }

  // Points the scratch at keys [j0, j0 + nk) of kv head hk: K rows, K^T and V^T in fp32 (from the split
  // schedule's cache, or converted into the scratch).
  static void load_kv(const Plan& pl, Scratch& sc, i64 b, i64 hk, i64 j0, i64 nk) {
    const auto& p = pl.p->fwd;
    const i64 D = p.head_dim, Dv = p.head_dim_v;
    if (pl.kv_cache) {
      const float* head = pl.kv_cache + (b * p.heads_kv + hk) * pl.head_floats;
      sc.kfb = head + j0 * D;
      sc.ktb = head + p.seq_kv * D + j0;
      sc.vtb = head + p.seq_kv * D + D * pl.skp + j0;
      sc.ldt = pl.skp;
      return;
    }
    convert_kv(p, b, hk, j0, nk, sc.kf.data(), sc.kt.data(), sc.vt.data(), BK, sc.acc_b.data());
    sc.kfb = sc.kf.data();
    sc.ktb = sc.kt.data();
    sc.vtb = sc.vt.data();
    sc.ldt = BK;
  }

  // K rows [j0, j0 + nk) into kf [nk][D] and kt [D][ldt]; V into vt [Dv][ldt] (vrow: Dv floats of scratch).
  static void convert_kv(const AttentionParams& p, i64 b, i64 hk, i64 j0, i64 nk, float* kf, float* kt, float* vt,
                         i64 ldt, float* vrow) {
    const i64 D = p.head_dim, Dv = p.head_dim_v;
    for (i64 j = 0; j < nk; ++j) {
      float* row = kf + j * D;
      load_row(at(p.k, p.k_stride, b, hk, j0 + j), p.k_stride[3], row, D);
      for (i64 d = 0; d < D; ++d) kt[d * ldt + j] = row[d];
    }
    for (i64 j = 0; j < nk; ++j) {
      load_row(at(p.v, p.v_stride, b, hk, j0 + j), p.v_stride[3], vrow, Dv);
      for (i64 e = 0; e < Dv; ++e) vt[e * ldt + j] = vrow[e];
    }
  }

  static void cache_item(const Plan& pl, Scratch& sc, i64 item) {
    const auto& p = pl.p->fwd;
    float* head = pl.kv_cache + item * pl.head_floats;
    const i64 D = p.head_dim;
    convert_kv(p, item / p.heads_kv, item % p.heads_kv, 0, p.seq_kv, head, head + p.seq_kv * D,
               head + p.seq_kv * D + D * pl.skp, pl.skp, sc.acc_b.data());
  }

  // Points the scratch at query rows [i0, i0 + nq) of head hq and their output gradients, in fp32 (from the split
  // schedule's cache, or converted into the scratch).
  static void load_q(const Plan& pl, Scratch& sc, i64 b, i64 hq, i64 i0, i64 nq) {
    const AttentionBackwardParams& bp = *pl.p;
    const auto& p = bp.fwd;
    const i64 D = p.head_dim, Dv = p.head_dim_v;
    if (pl.q_cache) {
      const float* head = pl.q_cache + (b * p.heads_q + hq) * p.seq_q * (D + Dv);
      sc.qb = head + i0 * D;
      sc.doutb = head + p.seq_q * D + i0 * Dv;
      return;
    }
    convert_q(bp, b, hq, i0, nq, sc.q.data(), sc.dout.data());
    sc.qb = sc.q.data();
    sc.doutb = sc.dout.data();
  }

  static void convert_q(const AttentionBackwardParams& bp, i64 b, i64 hq, i64 i0, i64 nq, float* q, float* dout) {
    const auto& p = bp.fwd;
    const i64 D = p.head_dim, Dv = p.head_dim_v;
    for (i64 i = 0; i < nq; ++i) {
      load_row(at(p.q, p.q_stride, b, hq, i0 + i), p.q_stride[3], q + i * D, D);
      load_row(at(bp.dout, bp.dout_stride, b, hq, i0 + i), bp.dout_stride[3], dout + i * Dv, Dv);
    }
  }

  static void q_cache_item(const Plan& pl, Scratch&, i64 item) {
    const auto& p = pl.p->fwd;
    float* head = pl.q_cache + item * p.seq_q * (p.head_dim + p.head_dim_v);
    convert_q(*pl.p, item / p.heads_q, item % p.heads_q, 0, p.seq_q, head, head + p.seq_q * p.head_dim);
  }

  // For the loaded query rows and key block: s <- P, dp <- dS (zero where a key is hidden or the row sees none).
  static void tile(const AttentionBackwardParams& bp, Scratch& sc, i64 b, i64 hq, i64 i0, i64 nq, i64 j0, i64 nk) {
    const auto& p = bp.fwd;
    const i64 D = p.head_dim, Dv = p.head_dim_v;
    const i64 row_base = (b * p.heads_q + hq) * p.seq_q;
    float* S = sc.s.data();
    float* dP = sc.dp.data();
    const i64 nk8 = (nk + VW - 1) / VW * VW;  // rows are BK (a multiple of VW) long: vector loops round up
    for (i64 i = 0; i < nq; ++i) std::memset(S + i * BK, 0, sizeof(float) * nk8);
    gemm(nq, nk, D, sc.qb, D, 1, sc.ktb, sc.ldt, S, BK);
    for (i64 i = 0; i < nq; ++i) std::memset(dP + i * BK, 0, sizeof(float) * nk8);
    gemm(nq, nk, Dv, sc.doutb, Dv, 1, sc.vtb, sc.ldt, dP, BK);
    for (i64 i = 0; i < nq; ++i) {
      const i64 row = i0 + i;
      float* __restrict s = S + i * BK;
      float* __restrict dp = dP + i * BK;
      const float lse = bp.lse[row_base + row];
      // Keys this row can see inside the block (causal: j <= row).
      const i64 nvis = p.causal ? bmin(nk, bmax(0, row - j0 + 1)) : nk;
      if (lse == kNegInf || nvis == 0) {
        std::memset(s, 0, sizeof(float) * BK);
        std::memset(dp, 0, sizeof(float) * BK);
        continue;
      }
      for (i64 j = 0; j < nvis; ++j) s[j] *= p.scale;
      if (p.mask_kind != MaskKind::None) {
        const i64* ms = p.mask_stride;
        const i64 off = b * ms[0] + hq * ms[1] + row * ms[2] + j0 * ms[3];
        if (p.mask_kind == MaskKind::Bool) {
          const std::uint8_t* m = static_cast<const std::uint8_t*>(p.mask) + off;
          for (i64 j = 0; j < nvis; ++j)
            if (!m[j * ms[3]]) s[j] = kNegInf;
        } else {
          for (i64 j = 0; j < nvis; ++j) s[j] += additive_mask_value(p.mask, p.mask_dtype, off + j * ms[3]);
        }
      }
      for (i64 j = nvis; j < nk8; ++j) s[j] = kNegInf;
      const vf l = splat(lse), delta = splat(bp.delta[row_base + row]);
      for (i64 j = 0; j < nk8; j += VW) {
        const vf pr = expv(loadv(s + j) - l);
        storev(s + j, pr);
        storev(dp + j, pr * (loadv(dp + j) - delta));  // dS = P * (dP - delta)
      }
    }
  }

  // The mask's gradient is dS itself (the mask is added to the scaled scores).
  static void write_dmask(const AttentionBackwardParams& bp, const Scratch& sc, i64 b, i64 hq, i64 i0, i64 nq,
                          i64 j0, i64 nk) {
    const auto& p = bp.fwd;
    for (i64 i = 0; i < nq; ++i) {
      float* dm = bp.dmask + (((b * p.heads_q + hq) * p.seq_q) + i0 + i) * p.seq_kv + j0;
      std::memcpy(dm, sc.dp.data() + i * BK, sizeof(float) * nk);
    }
  }

  static void store_kv_grads(const AttentionBackwardParams& bp, const float* dk, const float* dv, i64 b, i64 hk,
                             i64 j0, i64 nk) {
    const auto& p = bp.fwd;
    const i64 D = p.head_dim, Dv = p.head_dim_v;
    for (i64 j = 0; j < nk; ++j) {
      store_row(dk + j * D, p.scale, at_mut(bp.dk, bp.dk_stride, b, hk, j0 + j), bp.dk_stride[3], D);
      store_row(dv + j * Dv, 1.f, at_mut(bp.dv, bp.dv_stride, b, hk, j0 + j), bp.dv_stride[3], Dv);
    }
  }

  // Pass 1 item: dK, dV of one key block of one kv head.
  static void kv_item(const Plan& pl, Scratch& sc, i64 item) {
    const AttentionBackwardParams& bp = *pl.p;
    const auto& p = bp.fwd;
    const i64 D = p.head_dim, Dv = p.head_dim_v;
    const i64 kb = item % pl.n_kb, bh = item / pl.n_kb, hk = bh % p.heads_kv, b = bh / p.heads_kv;
    const i64 j0 = kb * BK, nk = bmin(BK, p.seq_kv - j0);
    load_kv(pl, sc, b, hk, j0, nk);
    float* dk = sc.acc_a.data();
    float* dv = sc.acc_b.data();
    std::memset(dk, 0, sizeof(float) * nk * D);
    std::memset(dv, 0, sizeof(float) * nk * Dv);
    for (i64 g = 0; g < pl.group; ++g) {
      const i64 hq = hk * pl.group + g;
      for (i64 i0 = p.causal ? j0 : 0; i0 < p.seq_q; i0 += BQ) {  // causal: rows before j0 see no key here
        const i64 nq = bmin(BQ, p.seq_q - i0);
        load_q(pl, sc, b, hq, i0, nq);
        tile(bp, sc, b, hq, i0, nq, j0, nk);
        gemm(nk, Dv, nq, sc.s.data(), 1, BK, sc.doutb, Dv, dv, Dv);  // dV += P^T dO
        gemm(nk, D, nq, sc.dp.data(), 1, BK, sc.qb, D, dk, D);       // dK += dS^T Q
        if (bp.dmask) write_dmask(bp, sc, b, hq, i0, nq, j0, nk);
      }
    }
    store_kv_grads(bp, dk, dv, b, hk, j0, nk);
  }

  // Fused item: dK, dV of every key block of one kv head and dQ of its query-head group.
  static void head_item(const Plan& pl, Scratch& sc, i64 item) {
    const AttentionBackwardParams& bp = *pl.p;
    const auto& p = bp.fwd;
    const i64 D = p.head_dim, Dv = p.head_dim_v, Sq = p.seq_q;
    const i64 hk = item % p.heads_kv, b = item / p.heads_kv;
    sc.dq_group.assign(pl.group * Sq * D, 0.f);
    sc.q_group.resize(pl.group * Sq * D);
    sc.dout_group.resize(pl.group * Sq * Dv);
    for (i64 g = 0; g < pl.group; ++g) {
      const i64 hq = hk * pl.group + g;
      for (i64 i = 0; i < Sq; ++i) {
        load_row(at(p.q, p.q_stride, b, hq, i), p.q_stride[3], sc.q_group.data() + (g * Sq + i) * D, D);
        load_row(at(bp.dout, bp.dout_stride, b, hq, i), bp.dout_stride[3], sc.dout_group.data() + (g * Sq + i) * Dv,
                 Dv);
      }
    }
    float* dk = sc.acc_a.data();
    float* dv = sc.acc_b.data();
    for (i64 j0 = 0; j0 < p.seq_kv; j0 += BK) {
      const i64 nk = bmin(BK, p.seq_kv - j0);
      load_kv(pl, sc, b, hk, j0, nk);
      std::memset(dk, 0, sizeof(float) * nk * D);
      std::memset(dv, 0, sizeof(float) * nk * Dv);
      for (i64 g = 0; g < pl.group; ++g) {
        const i64 hq = hk * pl.group + g;
        for (i64 i0 = p.causal ? j0 : 0; i0 < Sq; i0 += BQ) {
          const i64 nq = bmin(BQ, Sq - i0);
          sc.qb = sc.q_group.data() + (g * Sq + i0) * D;
          sc.doutb = sc.dout_group.data() + (g * Sq + i0) * Dv;
          tile(bp, sc, b, hq, i0, nq, j0, nk);
          gemm(nk, Dv, nq, sc.s.data(), 1, BK, sc.doutb, Dv, dv, Dv);                     // dV += P^T dO
          gemm(nk, D, nq, sc.dp.data(), 1, BK, sc.qb, D, dk, D);                          // dK += dS^T Q
          gemm(nq, D, nk, sc.dp.data(), BK, 1, sc.kfb, D, sc.dq_group.data() + (g * Sq + i0) * D, D);  // dQ
          if (bp.dmask) write_dmask(bp, sc, b, hq, i0, nq, j0, nk);
        }
      }
      store_kv_grads(bp, dk, dv, b, hk, j0, nk);
    }
    for (i64 g = 0; g < pl.group; ++g)
      for (i64 i = 0; i < Sq; ++i)
        store_row(sc.dq_group.data() + (g * Sq + i) * D, p.scale,
                  at_mut(bp.dq, bp.dq_stride, b, hk * pl.group + g, i), bp.dq_stride[3], D);
  }

  // Pass 2 item: dQ of one query block of one query head.
  static void q_item(const Plan& pl, Scratch& sc, i64 item) {
    const AttentionBackwardParams& bp = *pl.p;
    const auto& p = bp.fwd;
    const i64 D = p.head_dim;
    const i64 qb = item % pl.n_qb, bh = item / pl.n_qb, hq = bh % p.heads_q, b = bh / p.heads_q;
    const i64 hk = hq / pl.group;
    const i64 i0 = qb * BQ, nq = bmin(BQ, p.seq_q - i0);
    const i64 key_end = p.causal ? bmin(p.seq_kv, i0 + nq) : p.seq_kv;  // causal: later keys are hidden
    load_q(pl, sc, b, hq, i0, nq);
    float* dq = sc.acc_a.data();
    std::memset(dq, 0, sizeof(float) * nq * D);
    for (i64 j0 = 0; j0 < key_end; j0 += BK) {
      const i64 nk = bmin(BK, key_end - j0);
      load_kv(pl, sc, b, hk, j0, nk);
      tile(bp, sc, b, hq, i0, nq, j0, nk);
      gemm(nq, D, nk, sc.dp.data(), BK, 1, sc.kfb, D, dq, D);  // dQ += dS K
    }
    for (i64 i = 0; i < nq; ++i)
      store_row(dq + i * D, p.scale, at_mut(bp.dq, bp.dq_stride, b, hq, i0 + i), bp.dq_stride[3], D);
  }

  // Each chunk from the caller's parallel_for is "a free worker" pulling items from the shared counter (balances
  // causal work, as the forward does).
  template <void (*Item)(const Plan&, Scratch&, i64)>
  static void chunk(void* ctx, i64 begin, i64 end) {
    if (begin >= end) return;
    Plan& pl = *static_cast<Plan*>(ctx);
    i64 it = __atomic_fetch_add(&pl.next, 1, __ATOMIC_RELAXED);
    if (it >= pl.n_items) return;
    Scratch sc(pl.p->fwd.head_dim, pl.p->fwd.head_dim_v);
    for (; it < pl.n_items; it = __atomic_fetch_add(&pl.next, 1, __ATOMIC_RELAXED)) Item(pl, sc, it);
  }

  template <void (*Item)(const Plan&, Scratch&, i64)>
  static void run_pass(Plan& pl, i64 n_items) {
    pl.n_items = n_items;
    pl.next = 0;
    if (n_items == 0) return;
    const auto& p = pl.p->fwd;
    if (p.parallel_for && n_items > 1) p.parallel_for(n_items, &pl, &chunk<Item>);
    else chunk<Item>(&pl, 0, n_items);
  }

  static void run(const AttentionBackwardParams& bp) {
    const auto& p = bp.fwd;
    if (p.batch == 0 || p.heads_q == 0) return;
    Plan pl;
    pl.p = &bp;
    pl.group = p.heads_q / p.heads_kv;
    pl.n_qb = bceil_div(p.seq_q, BQ);
    pl.n_kb = bceil_div(p.seq_kv, BK);
    static const i64 cores = bmax(1, i64(std::thread::hardware_concurrency()));  // (a syscall: ask once)
    const i64 heads = p.batch * p.heads_kv;
    if (heads >= 2 * cores || (pl.n_kb <= 1 && pl.n_qb <= 1)) {
      run_pass<&Backward::head_item>(pl, heads);
    } else {
      pl.skp = pl.n_kb * BK;
      pl.head_floats = p.seq_kv * p.head_dim + (p.head_dim + p.head_dim_v) * pl.skp;
      std::vector<float> cache(heads * pl.head_floats);
      pl.kv_cache = cache.data();
      run_pass<&Backward::cache_item>(pl, heads);
      std::vector<float> q_cache(p.batch * p.heads_q * p.seq_q * (p.head_dim + p.head_dim_v));
      pl.q_cache = q_cache.data();
      run_pass<&Backward::q_cache_item>(pl, p.batch * p.heads_q);
      run_pass<&Backward::kv_item>(pl, heads * pl.n_kb);
      run_pass<&Backward::q_item>(pl, p.batch * p.heads_q * pl.n_qb);
    }
  }
};

inline void run_backward(const AttentionBackwardParams& bp) {
  switch (bp.fwd.dtype) {
    case ScalarType::F32: Backward<float>::run(bp); break;
    case ScalarType::BF16: Backward<Bf16>::run(bp); break;
    case ScalarType::F16: Backward<Half>::run(bp); break;
  }
}

}  // namespace
}  // namespace attnsel::cpu::detail
