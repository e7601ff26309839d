// attnsel C++ API for tensors: run attention through the same backend selection and kernel table as the Python op
// torch.ops.attnsel.attention. Needs Torch (link attnsel::torch); the torch-free API is <attnsel/attnsel.h>.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

#include "attnsel/attnsel.h"

namespace attnsel {

struct AttentionOptions {
  // SDPA-style mask broadcastable to [B, Hq, Sq, Sk]: bool (true = attend) or additive float.
  std::optional<at::Tensor> attn_mask;
  bool is_causal = false;
  // Softmax scale; nothing = 1/sqrt(head_dim).
  std::optional<double> scale;
  // Explicit backend (highest priority, and this thread's component scope is ignored); nothing = select with
  // this thread's context: forced > component scope > global > automatic.
  std::optional<BackendId> backend;
};

// q: [B, Hq, Sq, D], k: [B, Hkv, Sk, D], v: [B, Hkv, Sk, Dv] (Hq a multiple of Hkv) -> [B, Hq, Sq, Dv].
// Throws c10::ValueError when the chosen backend cannot run the input (with every reason), c10::Error for
// malformed inputs.
at::Tensor attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const AttentionOptions& opts = {});

// The same, also returning the log-sum-exp [B, Hq, Sq] (fp32, natural log, -inf for a row that sees no key);
// a backend that cannot produce it refuses with c10::ValueError.
std::tuple<at::Tensor, at::Tensor> attention_with_lse(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                      const AttentionOptions& opts = {});

}  // namespace attnsel
