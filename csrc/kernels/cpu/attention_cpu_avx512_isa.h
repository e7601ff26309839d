// AVX-512 vector traits shared by the avx512 and avx512_bf16 units (each includes it into its own
// anonymous namespace). 16 fp32 lanes, micro-kernel 12 rows x 32 queries (24 of the 32 zmm registers).
#pragma once

// GCC 12 warns (falsely) about the self-initialised "undefined" operands inside its AVX-512 intrinsics.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "attention_cpu_elements.h"

namespace attnsel::cpu::detail {
namespace {

struct Isa {
  static constexpr int W = 16, NV = 2, R = 12;
  static constexpr std::int64_t BQ = 128, BK = 96;
  using V = __m512;
  using M = __mmask16;
  static V zero() { return _mm512_setzero_ps(); }
  static V set1(float x) { return _mm512_set1_ps(x); }
  static V load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, V v) { _mm512_storeu_ps(p, v); }
  static V bcast(const float* p) { return _mm512_set1_ps(*p); }
  static V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static V add(V a, V b) { return _mm512_add_ps(a, b); }
  static V sub(V a, V b) { return _mm512_sub_ps(a, b); }
  static V mul(V a, V b) { return _mm512_mul_ps(a, b); }
  static V max(V a, V b) { return _mm512_max_ps(a, b); }
  static M eq(V a, V b) { return _mm512_cmp_ps_mask(a, b, _CMP_EQ_OQ); }
  static V select(M m, V t, V f) { return _mm512_mask_blend_ps(m, f, t); }

  // Same scheme and polynomials as the AVX2 path (see there).
  template <int DEG>
  static V exp2(V x) {
    const V magic = _mm512_set1_ps(12582912.f + 127.f);
    x = _mm512_max_ps(_mm512_set1_ps(-127.f), x);
    const V t = _mm512_add_ps(x, magic);
    const V f = _mm512_sub_ps(x, _mm512_sub_ps(t, magic));
    V p;
    if constexpr (DEG >= 6) {
      p = _mm512_set1_ps(1.5332507609855384e-04f);
      p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3394701527431607e-03f));
      p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.618490934371948e-03f));
      p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5503424257040024e-02f));
      p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022647738456726e-01f));
      p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.931471824645996e-01f));
      p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
    } else {
      p = _mm512_set1_ps(9.55411046743393e-03f);
      p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.587037652730942e-02f));
      p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.402469664812088e-01f));
      p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.931280493736267e-01f));
      p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.99999463558197e-01f));
    }
    return _mm512_mul_ps(p, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_castps_si512(t), 23)));
  }

  static void cvt_bf16(const std::uint16_t* s, float* d, std::int64_t n) {
    std::int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
      const __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + i)));
      _mm512_storeu_ps(d + i, _mm512_castsi512_ps(_mm512_slli_epi32(w, 16)));
    }
    for (; i < n; ++i) d[i] = to_f32(Bf16{s[i]});
  }
  static void cvt_f16(const std::uint16_t* s, float* d, std::int64_t n) {
    std::int64_t i = 0;
    for (; i + 16 <= n; i += 16)
      _mm512_storeu_ps(d + i, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + i))));
    for (; i < n; ++i) d[i] = _cvtsh_ss(s[i]);
  }
};

}  // namespace
}  // namespace attnsel::cpu::detail
