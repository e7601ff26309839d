// Fused CPU attention backward (FlashAttention-2 style: recomputes the probabilities from the forward's saved
// log-sum-exp, never stores the full score matrix). Torch-free: raw pointers and element strides.
#pragma once

#include "../attention_params.h"

namespace attnsel::cpu {

// The forward's parameters (q, k, v, mask, causal, scale, shapes, strides, dtype, parallel_for; `out` and `lse`
// there are unused) plus what the backward pass reads and writes.
struct AttentionBackwardParams {
  kernels::AttentionParams fwd;
  const void* dout = nullptr;  // [B, Hq, Sq, Dv], dtype of q
  std::int64_t dout_stride[4] = {0, 0, 0, 0};
  const float* lse = nullptr;    // [B, Hq, Sq] fp32 contiguous: the forward's log-sum-exp (-inf: row sees no key)
  const float* delta = nullptr;  // [B, Hq, Sq] fp32 contiguous: rowsum(dout * out) - d(lse)
  void* dq = nullptr;            // [B, Hq, Sq, D], dtype of q
  void* dk = nullptr;            // [B, Hkv, Sk, D], dtype of q (summed over each kv head's query-head group)
  void* dv = nullptr;            // [B, Hkv, Sk, Dv], dtype of q
  std::int64_t dq_stride[4] = {0, 0, 0, 0};
  std::int64_t dk_stride[4] = {0, 0, 0, 0};
  std::int64_t dv_stride[4] = {0, 0, 0, 0};
  // Optional: gradient of the (additive) mask before broadcasting, [B, Hq, Sq, Sk] fp32 contiguous, zero-filled by
  // the caller; the kernel writes d(score) where a key is visible. Null = not wanted.
  float* dmask = nullptr;
};

// Runs the backward pass (baseline or AVX2 code, following the forward's ISA choice). Rows that see no key
// (lse = -inf) get zero gradients. The caller validates shapes; this trusts them.
void attention_backward(const AttentionBackwardParams& params);

}  // namespace attnsel::cpu
