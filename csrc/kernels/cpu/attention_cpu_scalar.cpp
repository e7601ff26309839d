// Portable path (baseline flags): the shared algorithm with one float per "vector".
#include <cmath>
#include <cstdint>
#include <cstring>

#include "attention_cpu_isa.h"
#include "attention_cpu_elements.h"

namespace attnsel::cpu::detail {
namespace {

struct Isa {
  static constexpr int W = 1, NV = 4, R = 4;
  static constexpr std::int64_t BQ = 64, BK = 96;
  using V = float;
  using M = bool;
  static V zero() { return 0.f; }
  static V set1(float x) { return x; }
  static V load(const float* p) { return *p; }
  static void store(float* p, V v) { *p = v; }
  static V bcast(const float* p) { return *p; }
  static V fma(V a, V b, V c) { return a * b + c; }
  static V add(V a, V b) { return a + b; }
  static V sub(V a, V b) { return a - b; }
  static V mul(V a, V b) { return a * b; }
  static V max(V a, V b) { return a > b ? a : b; }  // like maxps: NaN in either gives b
  static M eq(V a, V b) { return a == b; }
  static V select(M m, V t, V f) { return m ? t : f; }
  template <int DEG>
  static V exp2(V x) { return std::exp2(x); }  // libm: exact enough for every dtype
  static void cvt_bf16(const std::uint16_t* s, float* d, std::int64_t n) {
    for (std::int64_t i = 0; i < n; ++i) d[i] = to_f32(Bf16{s[i]});
  }
  static void cvt_f16(const std::uint16_t* s, float* d, std::int64_t n) {
    for (std::int64_t i = 0; i < n; ++i) d[i] = to_f32(Half{s[i]});
  }
};

}  // namespace
}  // namespace attnsel::cpu::detail

#include "attention_cpu_kernel.h"

namespace attnsel::cpu::detail {
void forward_scalar(const kernels::AttentionParams& p) { run_forward<Isa>(p); }
}  // namespace attnsel::cpu::detail
