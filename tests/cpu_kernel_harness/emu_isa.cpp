// Test-only "ISA": the shared kernel template instantiated with portable 16-lane vectors and the AVX-512 block
// geometry (W=16, NV=2, R=12, BQ=128, BK=96). This machine cannot run AVX-512, so this checks the template
// logic for that geometry (panel width 32, 12-row micro-kernel and its tails); the intrinsics themselves are
// only compile-tested. Uses the same exp2 scheme (magic-number rounding, fitted polynomials) in scalar form.
#include <cmath>
#include <cstdint>
#include <cstring>

#include "../../csrc/kernels/attention_params.h"
#include "../../csrc/kernels/cpu/attention_cpu_elements.h"

namespace attnsel::cpu::detail {
namespace {

struct Isa {
  static constexpr int W = 16, NV = 2, R = 12;
  static constexpr std::int64_t BQ = 128, BK = 96;
  struct V { float x[16]; };
  struct M { bool x[16]; };
  static V zero() { return set1(0.f); }
  static V set1(float a) { V v; for (float& e : v.x) e = a; return v; }
  static V load(const float* p) { V v; std::memcpy(v.x, p, sizeof v.x); return v; }
  static void store(float* p, V v) { std::memcpy(p, v.x, sizeof v.x); }
  static V bcast(const float* p) { return set1(*p); }
  static V fma(V a, V b, V c) { for (int i = 0; i < 16; ++i) c.x[i] = std::fma(a.x[i], b.x[i], c.x[i]); return c; }
  static V add(V a, V b) { for (int i = 0; i < 16; ++i) a.x[i] += b.x[i]; return a; }
  static V sub(V a, V b) { for (int i = 0; i < 16; ++i) a.x[i] -= b.x[i]; return a; }
  static V mul(V a, V b) { for (int i = 0; i < 16; ++i) a.x[i] *= b.x[i]; return a; }
  static V max(V a, V b) { for (int i = 0; i < 16; ++i) a.x[i] = a.x[i] > b.x[i] ? a.x[i] : b.x[i]; return a; }
  static M eq(V a, V b) { M m; for (int i = 0; i < 16; ++i) m.x[i] = a.x[i] == b.x[i]; return m; }
  static V select(M m, V t, V f) { for (int i = 0; i < 16; ++i) f.x[i] = m.x[i] ? t.x[i] : f.x[i]; return f; }
  template <int DEG>
  static V exp2(V v) {
    for (float& x : v.x) {
      const float magic = 12582912.f + 127.f;
      x = -127.f > x ? -127.f : x;  // like maxps(-127, x): NaN stays
      const float t = x + magic;
      const float f = x - (t - magic);
      float p;
      if (DEG >= 6) {
        p = 1.5332507609855384e-04f;
        p = std::fma(p, f, 1.3394701527431607e-03f);
        p = std::fma(p, f, 9.618490934371948e-03f);
        p = std::fma(p, f, 5.5503424257040024e-02f);
        p = std::fma(p, f, 2.4022647738456726e-01f);
        p = std::fma(p, f, 6.931471824645996e-01f);
        p = std::fma(p, f, 1.f);
      } else {
        p = 9.55411046743393e-03f;
        p = std::fma(p, f, 5.587037652730942e-02f);
        p = std::fma(p, f, 2.402469664812088e-01f);
        p = std::fma(p, f, 6.931280493736267e-01f);
        p = std::fma(p, f, 9.99999463558197e-01f);
      }
      std::uint32_t tb;
      std::memcpy(&tb, &t, 4);
      const std::uint32_t eb = tb << 23;
      float e;
      std::memcpy(&e, &eb, 4);
      x = p * e;
    }
    return v;
  }
  static void cvt_bf16(const std::uint16_t* s, float* d, std::int64_t n) {
    for (std::int64_t i = 0; i < n; ++i) d[i] = to_f32(Bf16{s[i]});
  }
  static void cvt_f16(const std::uint16_t* s, float* d, std::int64_t n) {
    for (std::int64_t i = 0; i < n; ++i) d[i] = to_f32(Half{s[i]});
  }
};

}  // namespace
}  // namespace attnsel::cpu::detail

#include "../../csrc/kernels/cpu/attention_cpu_kernel.h"

namespace attnsel::cpu::detail {
void forward_emu16(const kernels::AttentionParams& p) { run_forward<Isa>(p); }
}  // namespace attnsel::cpu::detail
