// Scalar conversions between bf16 / fp16 storage and fp32, shared by the kernel and every ISA's tail loops.
// Like attention_cpu_kernel.h, everything is in an anonymous namespace: each ISA unit keeps a private copy,
// so no copy compiled with AVX flags can be merged into a less capable path.
#pragma once

#include <cstdint>
#include <cstring>

namespace attnsel::cpu::detail {
namespace {

// ---- element types -------------------------------------------------------------------------------
struct Bf16 { std::uint16_t bits; };
struct Half { std::uint16_t bits; };

inline float to_f32(float x) { return x; }
inline float to_f32(Bf16 x) {
  std::uint32_t u = std::uint32_t(x.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline float to_f32(Half x) {
  _Float16 h;
  std::memcpy(&h, &x.bits, 2);
  return static_cast<float>(h);
}
inline void from_f32(float v, float* d) { *d = v; }
inline void from_f32(float v, Bf16* d) {
  std::uint32_t u;
  std::memcpy(&u, &v, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) {  // NaN: keep it a (quiet) NaN
    d->bits = std::uint16_t((u >> 16) | 0x40u);
    return;
  }
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
  d->bits = std::uint16_t(u >> 16);
}
inline void from_f32(float v, Half* d) {
  _Float16 h = static_cast<_Float16>(v);
  std::memcpy(&d->bits, &h, 2);
}

}  // namespace
}  // namespace attnsel::cpu::detail
