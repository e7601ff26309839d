// Attention forward parameters shared by the CPU and CUDA kernels.
// Raw pointers and element strides only; no ATen types, so the kernels stay torch-free.
#pragma once

#include <cstdint>

namespace attnsel::kernels {

enum class ScalarType : std::uint8_t { F32, F16, BF16 };
enum class MaskKind : std::uint8_t { None, Bool, Additive };

// Layout of every 4-d operand: [batch, heads, seq, dim], strides in elements (a broadcast dim has stride 0).
struct AttentionParams {
  const void* q = nullptr;  // [B, Hq, Sq, D]
  const void* k = nullptr;  // [B, Hkv, Sk, D]
  const void* v = nullptr;  // [B, Hkv, Sk, Dv]
  void* out = nullptr;      // [B, Hq, Sq, Dv], same dtype as q
  ScalarType dtype = ScalarType::F32;  // of q, k, v and out

  std::int64_t batch = 0, heads_q = 0, heads_kv = 0, seq_q = 0, seq_kv = 0, head_dim = 0, head_dim_v = 0;
  std::int64_t q_stride[4] = {0, 0, 0, 0};
  std::int64_t k_stride[4] = {0, 0, 0, 0};
  std::int64_t v_stride[4] = {0, 0, 0, 0};
  std::int64_t out_stride[4] = {0, 0, 0, 0};

  // Optional mask, [B, H, Sq, Sk] broadcast by strides. Bool: true = attend (bytes, 0/1).
  // Additive: added to the scaled scores; its dtype is mask_dtype (F32, or q's dtype).
  MaskKind mask_kind = MaskKind::None;
  const void* mask = nullptr;
  ScalarType mask_dtype = ScalarType::F32;
  std::int64_t mask_stride[4] = {0, 0, 0, 0};

  // Optional log-sum-exp output, [B, Hq, Sq] fp32 contiguous: natural log of sum_j exp(scale * q.k_j + mask_j) per
  // query row; -inf for a row that sees no key. Null = not wanted.
  float* lse = nullptr;

  bool causal = false;  // PyTorch's convention: query i sees keys j <= i (top-left aligned)
  float scale = 1.0f;   // multiplies q·k

  // CPU only: parallel runner supplied by the caller (the glue passes one over at::parallel_for).
  // Calls fn(ctx, begin, end) over disjoint chunks covering [0, n). Null = run serially.
  void (*parallel_for)(std::int64_t n, void* ctx, void (*fn)(void* ctx, std::int64_t begin, std::int64_t end)) =
      nullptr;
};

}  // namespace attnsel::kernels
