// AVX2 + FMA + F16C path: 8 fp32 lanes, micro-kernel 6 rows x 16 queries (12 accumulators), or 4 rows x 24 queries
// from head_dim 128 (IsaWide).
#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "attention_cpu_isa.h"
#include "attention_cpu_elements.h"

namespace attnsel::cpu::detail {
namespace {

struct Isa {
  static constexpr int W = 8, NV = 2, R = 6;
  static constexpr std::int64_t BQ = 128, BK = 96;
  using V = __m256;
  using M = __m256;
  static V zero() { return _mm256_setzero_ps(); }
  static V set1(float x) { return _mm256_set1_ps(x); }
  static V load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, V v) { _mm256_storeu_ps(p, v); }
  static V bcast(const float* p) { return _mm256_broadcast_ss(p); }
  static V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static V add(V a, V b) { return _mm256_add_ps(a, b); }
  static V sub(V a, V b) { return _mm256_sub_ps(a, b); }
  static V mul(V a, V b) { return _mm256_mul_ps(a, b); }
  static V max(V a, V b) { return _mm256_max_ps(a, b); }
  static M eq(V a, V b) { return _mm256_cmp_ps(a, b, _CMP_EQ_OQ); }
  static V select(M m, V t, V f) { return _mm256_blendv_ps(f, t, m); }

  // 2^x: x = n + f, |f| <= 1/2, 2^f by a polynomial fitted for relative error: degree 6 (1.4 ulp) for fp32 data,
  // degree 4 (5e-6, far below a bf16/fp16 ulp) for 16-bit data. 2^n is built in the exponent field: adding
  // 1.5*2^23 + 127 rounds x to an integer n and leaves n + 127 in the low mantissa bits, one shift from the
  // exponent. max() keeps NaN (maxps returns its second operand on NaN) and clamps at -127, where n + 127 = 0 gives
  // exactly 0. Callers pass x <= 0 (or NaN).
  template <int DEG>
  static V exp2(V x) {
    const V magic = _mm256_set1_ps(12582912.f + 127.f);
    x = _mm256_max_ps(_mm256_set1_ps(-127.f), x);
    const V t = _mm256_add_ps(x, magic);
    const V f = _mm256_sub_ps(x, _mm256_sub_ps(t, magic));
    V p;
    if constexpr (DEG >= 6) {
      p = _mm256_set1_ps(1.5332507609855384e-04f);
      p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.3394701527431607e-03f));
      p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(9.618490934371948e-03f));
      p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(5.5503424257040024e-02f));
      p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(2.4022647738456726e-01f));
      p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(6.931471824645996e-01f));
      p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.f));
    } else {
      p = _mm256_set1_ps(9.55411046743393e-03f);
      p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(5.587037652730942e-02f));
      p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(2.402469664812088e-01f));
      p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(6.931280493736267e-01f));
      p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(9.99999463558197e-01f));
    }
    return _mm256_mul_ps(p, _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_castps_si256(t), 23)));
  }

  static void cvt_bf16(const std::uint16_t* s, float* d, std::int64_t n) {
    std::int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
      const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i)));
      _mm256_storeu_ps(d + i, _mm256_castsi256_ps(_mm256_slli_epi32(w, 16)));
    }
    for (; i < n; ++i) d[i] = to_f32(Bf16{s[i]});
  }
  static void cvt_f16(const std::uint16_t* s, float* d, std::int64_t n) {
    std::int64_t i = 0;
    for (; i + 8 <= n; i += 8)
      _mm256_storeu_ps(d + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i))));
    for (; i < n; ++i) d[i] = _cvtsh_ss(s[i]);
  }
};

// Same vectors, panel of 24 queries and 4-row micro-kernels: 4 broadcasts per 12 FMAs instead of 6, which made
// head_dim 128 and 512 ~1.5-2% faster on one core. Not below 128: 2.5% slower at 64, and a 24-query panel wastes
// more on short sequences (CLIP's 77 tokens: -20%). Query blocks stay multiples of 24 when halved.
// Used only with many query blocks (64, tuned on 2 cores): blocks of 96 split 1024 queries into 11 (10 full + 1 of
// 64), and with few blocks the cores finish unevenly (1 head x 1024 at head_dim 512: 0.94x SDPA instead of 1.0x).
struct IsaWide : Isa {
  static constexpr int NV = 3, R = 4;
  static constexpr std::int64_t BQ = 96;
};

}  // namespace
}  // namespace attnsel::cpu::detail

#include "attention_cpu_kernel.h"

namespace attnsel::cpu::detail {
void forward_avx2(const kernels::AttentionParams& p) {
  const std::int64_t blocks = p.batch * p.heads_q * ((p.seq_q + IsaWide::BQ - 1) / IsaWide::BQ);
  if ((p.head_dim >= 128 || p.head_dim_v >= 128) && blocks >= 64) run_forward<IsaWide>(p);
  else run_forward<Isa>(p);
}
}  // namespace attnsel::cpu::detail
