// ATen glue for our fused CPU kernel (backend `native` on CPU).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <limits>

#include "dispatch.h"
#include "kernels/cpu/attention_cpu.h"

namespace attnsel::torch_glue {
namespace {

void parallel_over_aten(std::int64_t n, void* ctx, void (*fn)(void*, std::int64_t, std::int64_t)) {
  at::parallel_for(0, n, 1, [&](std::int64_t begin, std::int64_t end) { fn(ctx, begin, end); });
}

AttentionResult native_cpu(const AttentionCall& call) {
  TORCH_CHECK_VALUE(call.q.size(3) <= cpu::kMaxHeadDim && call.v.size(3) <= cpu::kMaxHeadDim,
              "attnsel.attention: head_dim ", std::max(call.q.size(3), call.v.size(3)),
              " exceeds the limit ", cpu::kMaxHeadDim, " of the native CPU kernel");
  at::Tensor out = at::empty({call.q.size(0), call.q.size(1), call.q.size(2), call.v.size(3)}, call.q.options());
  // The log-sum-exp costs one float per query row: always filled, so a backward pass can reuse it.
  at::Tensor lse = at::empty({call.q.size(0), call.q.size(1), call.q.size(2)}, call.q.options().dtype(at::kFloat));
  if (out.numel() == 0) {
    // Nothing to compute; with no keys every row's log-sum-exp is -inf. head_dim_v 0 with keys is not computed.
    TORCH_CHECK_VALUE(!call.return_lse || call.v.size(3) > 0 || call.k.size(2) == 0,
                      "attnsel.attention: the native CPU kernel gives no log-sum-exp when head_dim_v is 0");
    lse.fill_(-std::numeric_limits<float>::infinity());
    return {out, lse};
  }
  kernels::AttentionParams p = make_params(call, out);
  p.lse = lse.data_ptr<float>();
  p.parallel_for = &parallel_over_aten;
  cpu::attention_forward(p);
  return {out, lse};
}

}  // namespace

void register_native_cpu() {
  register_kernel(BackendId::NATIVE, DeviceType::CPU, &native_cpu);
  BackendDescriptor d;
  d.backend = BackendId::NATIVE;
  d.device = DeviceType::CPU;
  d.f32 = d.f16 = d.bf16 = true;
  d.max_head = static_cast<int>(cpu::kMaxHeadDim);
  d.library = "attnsel's fused CPU kernel";  // (the ISA is chosen at the first call: ATTNSEL_CPU_ISA may be bad)
  Features& f = d.features;
  f.bool_mask = f.additive_mask = f.causal = f.causal_any_lengths = f.grouped_query = true;
  f.different_lengths = f.different_value_head = f.lse = f.deterministic = true;
  d.auto_rank = 10;  // ahead of torch_sdpa: measured 0.97-2.0x PyTorch's CPU SDPA (benchmarks/results/cpu_vm.json)
  register_backend(std::move(d));
}

}  // namespace attnsel::torch_glue
