// Portable fused CPU attention (online softmax, one query row at a time). ISA-specific fast paths
// replace this file's inner loops; this is the correctness baseline.
#include "attention_cpu.h"

#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

namespace attnsel::cpu {
namespace {

float load(const void* base, std::int64_t i, ScalarType t) {
  switch (t) {
    case ScalarType::F32: return static_cast<const float*>(base)[i];
    case ScalarType::BF16: {
      std::uint32_t bits = static_cast<std::uint32_t>(static_cast<const std::uint16_t*>(base)[i]) << 16;
      float f;
      std::memcpy(&f, &bits, 4);
      return f;
    }
    case ScalarType::F16: {
      const std::uint16_t h = static_cast<const std::uint16_t*>(base)[i];
      const std::uint32_t sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff;
      std::uint32_t bits;
      if (exp == 0) {
        if (man == 0) {
          bits = sign;
        } else {  // subnormal: normalise
          int e = -1;
          std::uint32_t m = man;
          do { ++e; m <<= 1; } while ((m & 0x400u) == 0);
          bits = sign | static_cast<std::uint32_t>(127 - 15 - e) << 23 | (m & 0x3ffu) << 13;
        }
      } else if (exp == 31) {
        bits = sign | 0x7f800000u | man << 13;
      } else {
        bits = sign | (exp + 127 - 15) << 23 | man << 13;
      }
      float f;
      std::memcpy(&f, &bits, 4);
      return f;
    }
  }
  return 0.f;
}

void store(void* base, std::int64_t i, float x, ScalarType t) {
  switch (t) {
    case ScalarType::F32: static_cast<float*>(base)[i] = x; return;
    case ScalarType::BF16: {
      std::uint32_t bits;
      std::memcpy(&bits, &x, 4);
      if ((bits & 0x7fffffffu) > 0x7f800000u) {
        static_cast<std::uint16_t*>(base)[i] = static_cast<std::uint16_t>((bits >> 16) | 0x40);  // quiet NaN
        return;
      }
      bits += 0x7fffu + ((bits >> 16) & 1u);  // round to nearest even
      static_cast<std::uint16_t*>(base)[i] = static_cast<std::uint16_t>(bits >> 16);
      return;
    }
    case ScalarType::F16: {
      static_cast<_Float16*>(base)[i] = static_cast<_Float16>(x);
      return;
    }
  }
}

struct Job {
  const AttentionParams* p;
};

void run_rows(void* ctx, std::int64_t begin, std::int64_t end) {
  const AttentionParams& p = *static_cast<Job*>(ctx)->p;
  const std::int64_t group = p.heads_q / p.heads_kv;
  std::vector<float> qrow(p.head_dim), acc(p.head_dim_v);
  for (std::int64_t row = begin; row < end; ++row) {
    const std::int64_t i = row % p.seq_q, h = (row / p.seq_q) % p.heads_q, b = row / (p.seq_q * p.heads_q);
    const std::int64_t hk = h / group;
    const std::int64_t qo = b * p.q_stride[0] + h * p.q_stride[1] + i * p.q_stride[2];
    for (std::int64_t d = 0; d < p.head_dim; ++d) qrow[d] = load(p.q, qo + d * p.q_stride[3], p.dtype);
    float m = -std::numeric_limits<float>::infinity(), l = 0.f;
    std::fill(acc.begin(), acc.end(), 0.f);
    const std::int64_t kv_end = p.causal ? std::min(p.seq_kv, i + 1) : p.seq_kv;
    for (std::int64_t j = 0; j < kv_end; ++j) {
      float s;
      if (p.mask_kind == MaskKind::Bool) {
        const std::int64_t mo = b * p.mask_stride[0] + h * p.mask_stride[1] + i * p.mask_stride[2] + j * p.mask_stride[3];
        if (!static_cast<const std::uint8_t*>(p.mask)[mo]) continue;
      }
      const std::int64_t ko = b * p.k_stride[0] + hk * p.k_stride[1] + j * p.k_stride[2];
      float dot = 0.f;
      for (std::int64_t d = 0; d < p.head_dim; ++d) dot += qrow[d] * load(p.k, ko + d * p.k_stride[3], p.dtype);
      s = dot * p.scale;
      if (p.mask_kind == MaskKind::Additive) {
        const std::int64_t mo = b * p.mask_stride[0] + h * p.mask_stride[1] + i * p.mask_stride[2] + j * p.mask_stride[3];
        s += load(p.mask, mo, p.mask_dtype);
      }
      if (s == -std::numeric_limits<float>::infinity()) continue;
      const float m_new = std::max(m, s);
      const float corr = std::exp(m - m_new), e = std::exp(s - m_new);
      l = l * corr + e;
      const std::int64_t vo = b * p.v_stride[0] + hk * p.v_stride[1] + j * p.v_stride[2];
      for (std::int64_t d = 0; d < p.head_dim_v; ++d) acc[d] = acc[d] * corr + e * load(p.v, vo + d * p.v_stride[3], p.dtype);
      m = m_new;
    }
    const float inv = l > 0.f ? 1.f / l : 0.f;  // fully masked row -> zeros
    const std::int64_t oo = b * p.out_stride[0] + h * p.out_stride[1] + i * p.out_stride[2];
    for (std::int64_t d = 0; d < p.head_dim_v; ++d) store(p.out, oo + d * p.out_stride[3], acc[d] * inv, p.dtype);
  }
}

}  // namespace

void attention_forward(const AttentionParams& p) {
  Job job{&p};
  const std::int64_t rows = p.batch * p.heads_q * p.seq_q;
  if (p.parallel_for) p.parallel_for(rows, &job, &run_rows);
  else run_rows(&job, 0, rows);
}

std::string_view active_isa() { return "scalar"; }
bool isa_supported(std::string_view isa) { return isa == "scalar"; }
bool set_isa(std::string_view isa) { return isa == "scalar"; }

}  // namespace attnsel::cpu
