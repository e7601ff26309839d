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
  // The descriptor declares whether this library returns the log-sum-exp; the planner refused the call otherwise.
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("attnsel::bridge", "")
                             .typed<std::tuple<at::Tensor, at::Tensor>(
                                 const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                 const std::optional<at::Tensor>&, bool, double, std::int64_t, bool)>();
  auto [out, lse] = op.call(call.q, call.k, call.v, call.mask, call.causal, call.scale,
                            static_cast<std::int64_t>(kBackend), call.return_lse);
  if (!call.return_lse) return {out, {}};
  TORCH_CHECK(lse.dim() == 3 && lse.size(0) == call.q.size(0) && lse.size(1) == call.q.size(1) &&
                  lse.size(2) == call.q.size(2) && lse.scalar_type() == at::kFloat,
              "attnsel.attention: backend ", backend_name(kBackend), " returned a log-sum-exp of shape ",
              lse.sizes(), " and dtype ", lse.scalar_type(), "; expected [B, Hq, Sq] float32");
  return {out, lse};
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
