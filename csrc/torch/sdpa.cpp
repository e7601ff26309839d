// Bridge to PyTorch's scaled_dot_product_attention (backend `torch_sdpa`, any device).
#include <ATen/ATen.h>

#include <limits>

#include "dispatch.h"

namespace attnsel::torch_glue {
namespace {

AttentionResult torch_sdpa(const AttentionCall& call) {
  TORCH_CHECK_VALUE(!call.return_lse, "attnsel.attention: torch_sdpa does not return the log-sum-exp (use native)");
  std::optional<at::Tensor> mask = call.mask;
  // SDPA takes bool masks or masks of the query's dtype.
  if (mask && mask->scalar_type() != at::kBool && mask->scalar_type() != call.q.scalar_type())
    mask = mask->to(call.q.scalar_type());
  bool causal = call.causal;
  if (mask && causal) {  // SDPA refuses a mask with is_causal (RuntimeError): fold the top-left triangle into it
    const at::Tensor keep = at::ones({call.q.size(2), call.k.size(2)}, call.q.options().dtype(at::kBool)).tril();
    const double hidden = -std::numeric_limits<double>::infinity();
    mask = mask->scalar_type() == at::kBool ? mask->logical_and(keep) : mask->masked_fill(keep.logical_not(), hidden);
    causal = false;
  }
  const bool gqa = call.q.size(1) != call.k.size(1);
  return {at::scaled_dot_product_attention(call.q, call.k, call.v, mask, 0.0, causal, call.scale, gqa), {}};
}

}  // namespace

void register_sdpa() {
  register_kernel(BackendId::TORCH_SDPA, DeviceType::CPU, &torch_sdpa);
  register_kernel(BackendId::TORCH_SDPA, DeviceType::CUDA, &torch_sdpa);
  set_backend_availability(BackendId::TORCH_SDPA, DeviceType::CPU, true, "");
  // CUDA availability is reported by ops.cpp, which knows whether this Torch build has CUDA.
}

}  // namespace attnsel::torch_glue
