// Kernel-table entries for the backends implemented in Python (flash-attn, sageattention):
// they call the op attnsel::bridge, whose implementation attnsel/bridges.py registers through torch.library. So the
// op, the C++ API and torch.compile reach every backend; their descriptors come from the same Python module.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include "dispatch.h"

namespace attnsel::torch_glue {
namespace {

template <BackendId kBackend>
AttentionResult bridge(const AttentionCall& call) {
  TORCH_CHECK_VALUE(!call.return_lse, "attnsel.attention: backend ", backend_name(kBackend),
                    " does not return the log-sum-exp");
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("attnsel::bridge", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                               const std::optional<at::Tensor>&, bool, double, std::int64_t)>();
  return {op.call(call.q, call.k, call.v, call.mask, call.causal, call.scale, static_cast<std::int64_t>(kBackend)),
          {}};
}

}  // namespace

void register_bridges() {
  for (DeviceType device : {DeviceType::CPU, DeviceType::CUDA}) {
    register_kernel(BackendId::FA, device, &bridge<BackendId::FA>);
    register_kernel(BackendId::FA2, device, &bridge<BackendId::FA2>);
    register_kernel(BackendId::SAGE_ATTN, device, &bridge<BackendId::SAGE_ATTN>);
  }
}

}  // namespace attnsel::torch_glue
