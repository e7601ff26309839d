// The C++ tensor API (<attnsel/torch.h>): calls the registered op through the dispatcher, so native and Python
// callers share one selection path, one (backend, device) kernel table and the op's autograd kernel (gradients).
#include "attnsel/torch.h"

#include "backward.h"

namespace attnsel {

at::Tensor attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const AttentionOptions& opts) {
  const std::int64_t backend = opts.backend ? static_cast<std::int64_t>(*opts.backend) : -1;
  return std::get<0>(
      torch_glue::attention_op().call(q, k, v, opts.attn_mask, opts.is_causal, opts.scale, backend, false));
}

std::tuple<at::Tensor, at::Tensor> attention_with_lse(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                      const AttentionOptions& opts) {
  const std::int64_t backend = opts.backend ? static_cast<std::int64_t>(*opts.backend) : -1;
  return torch_glue::attention_op().call(q, k, v, opts.attn_mask, opts.is_causal, opts.scale, backend, true);
}

}  // namespace attnsel
