// ATen glue for our fused CPU kernel (backend `native` on CPU).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include "dispatch.h"
#include "kernels/cpu/attention_cpu.h"

namespace attnsel::torch_glue {
namespace {

void parallel_over_aten(std::int64_t n, void* ctx, void (*fn)(void*, std::int64_t, std::int64_t)) {
  at::parallel_for(0, n, 1, [&](std::int64_t begin, std::int64_t end) { fn(ctx, begin, end); });
}

at::Tensor native_cpu(const AttentionCall& call) {
  TORCH_CHECK(call.q.size(3) <= cpu::kMaxHeadDim && call.v.size(3) <= cpu::kMaxHeadDim,
              "attnsel.attention: head_dim ", std::max(call.q.size(3), call.v.size(3)),
              " exceeds the limit ", cpu::kMaxHeadDim, " of the native CPU kernel");
  at::Tensor out = at::empty({call.q.size(0), call.q.size(1), call.q.size(2), call.v.size(3)}, call.q.options());
  if (out.numel() == 0) return out;
  kernels::AttentionParams p = make_params(call, out);
  p.parallel_for = &parallel_over_aten;
  cpu::attention_forward(p);
  return out;
}

}  // namespace

void register_native_cpu() {
  register_kernel(BackendId::NATIVE, DeviceType::CPU, &native_cpu);
  set_backend_availability(BackendId::NATIVE, DeviceType::CPU, true, "");
}

}  // namespace attnsel::torch_glue
