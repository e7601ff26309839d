// PyTorch's scaled_dot_product_attention: `torch_sdpa` (PyTorch picks its sub-kernel, any device) and the CUDA
// backends pinned to one sub-kernel (`sdpa_cudnn`, `sdpa_flash`, `sdpa_efficient`, `sdpa_math`).
#include <ATen/ATen.h>
#include <ATen/Context.h>

#include <limits>
#include <mutex>
#include <vector>

#include "dispatch.h"

namespace attnsel::torch_glue {
namespace {

// Expanded by the caller: stride 0 over a dim of size > 1.
bool expanded(const at::Tensor& mask) {
  for (int64_t i = 0; i < mask.dim(); ++i)
    if (mask.stride(i) == 0 && mask.size(i) > 1) return true;
  return false;
}

// A mask expanded by the caller (stride 0 where it repeats): give SDPA those dims back as size 1, since some of its
// kernels (and a dtype cast) would otherwise materialise the whole [B, Hq, Sq, Sk] mask.
at::Tensor compact(const at::Tensor& mask) {
  if (!expanded(mask)) return mask;
  std::vector<int64_t> sizes(mask.sizes().begin(), mask.sizes().end());
  for (int64_t i = 0; i < mask.dim(); ++i)
    if (mask.stride(i) == 0 && sizes[i] > 1) sizes[i] = 1;
  return mask.as_strided(sizes, mask.strides(), mask.storage_offset());
}

at::Tensor run_sdpa(const AttentionCall& call) {
  std::optional<at::Tensor> mask;
  if (call.mask) mask = compact(*call.mask);
  if (mask && mask->dim() == 1) mask = mask->unsqueeze(0);  // SDPA reads dim -2: a 1-d key mask raised IndexError
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
  return at::scaled_dot_product_attention(call.q, call.k, call.v, mask, 0.0, causal, call.scale, gqa);
}

AttentionResult torch_sdpa(const AttentionCall& call) {
  TORCH_CHECK_VALUE(!call.return_lse, "attnsel.attention: torch_sdpa does not return the log-sum-exp (use native)");
  return {run_sdpa(call), {}};
}

// PyTorch selects SDPA sub-kernels from process-wide flags (what torch.nn.attention.sdpa_kernel sets too): pin one
// for the call, under a lock so our own concurrent calls do not see each other's pin, then restore the user's.
enum class Pin { CuDNN, Flash, Efficient, Math };

template <Pin kPin, BackendId kBackend>
AttentionResult pinned(const AttentionCall& call) {
  TORCH_CHECK_VALUE(!call.return_lse, "attnsel.attention: the pinned SDPA backends do not return the log-sum-exp");
  static std::mutex mutex;
  std::lock_guard<std::mutex> lock(mutex);
  at::Context& ctx = at::globalContext();
  const bool flash = ctx.userEnabledFlashSDP(), efficient = ctx.userEnabledMemEfficientSDP(),
             math = ctx.userEnabledMathSDP(), cudnn = ctx.userEnabledCuDNNSDP(),
             overrideable = ctx.userEnabledOverrideableSDP();
  const auto set = [&ctx](bool f, bool e, bool m, bool c, bool o) {
    ctx.setSDPUseFlash(f);
    ctx.setSDPUseMemEfficient(e);
    ctx.setSDPUseMath(m);
    ctx.setSDPUseCuDNN(c);
    ctx.setSDPUseOverrideable(o);
  };
  set(kPin == Pin::Flash, kPin == Pin::Efficient, kPin == Pin::Math, kPin == Pin::CuDNN, false);
  try {
    at::Tensor out = run_sdpa(call);
    set(flash, efficient, math, cudnn, overrideable);
    return {out, {}};
  } catch (const c10::Error& e) {
    set(flash, efficient, math, cudnn, overrideable);
    // PyTorch's kernel checks are finer than the descriptor (alignment, mask strides): still a refusal, not a crash.
    TORCH_CHECK_VALUE(false, "attnsel.attention: backend ", backend_name(kBackend),
                      " (PyTorch SDPA pinned to one kernel) cannot run this call: ", e.what_without_backtrace(),
                      " (PyTorch's warnings above say why; torch_sdpa lets PyTorch choose)");
  } catch (...) {
    set(flash, efficient, math, cudnn, overrideable);
    throw;
  }
}

BackendDescriptor sdpa_descriptor(BackendId id, DeviceType device) {
  BackendDescriptor d;
  d.backend = id;
  d.device = device;
  Features& f = d.features;
  f.causal = f.causal_any_lengths = f.grouped_query = f.different_lengths = true;
  f.backward = true;  // PyTorch's own SDPA backward (csrc/torch/backward.cpp runs these above autograd)
  switch (id) {
    case BackendId::TORCH_SDPA:
      d.f32 = d.f16 = d.bf16 = true;
      f.bool_mask = f.additive_mask = f.different_value_head = true;
      d.library = "torch.nn.functional.scaled_dot_product_attention (PyTorch picks its sub-kernel)";
      d.auto_rank = device == DeviceType::CPU ? 20 : 30;
      break;
    case BackendId::SDPA_CUDNN:  // by PyTorch's cuDNN SDPA checks: half types, head sizes up to 128, no masks
      d.f16 = d.bf16 = true;
      d.max_head = 128;
      d.head_multiple = 8;
      d.min_sm = 80;
      f.different_value_head = false;
      d.library = "PyTorch SDPA pinned to cuDNN";
      break;
    case BackendId::SDPA_FLASH:  // FlashAttention-2 inside PyTorch: half types, head sizes up to 256, no masks
      d.f16 = d.bf16 = true;
      d.max_head = 256;
      d.head_multiple = 8;
      d.min_sm = 80;
      d.library = "PyTorch SDPA pinned to its flash kernel";
      break;
    case BackendId::SDPA_EFFICIENT:  // memory-efficient kernel: masks, head sizes a multiple of 8
      d.f32 = d.f16 = d.bf16 = true;
      d.head_multiple = 8;
      d.min_sm = 50;
      f.bool_mask = f.additive_mask = f.different_value_head = true;
      d.library = "PyTorch SDPA pinned to its memory-efficient kernel";
      break;
    case BackendId::SDPA_MATH:
      d.f32 = d.f16 = d.bf16 = true;
      f.bool_mask = f.additive_mask = f.different_value_head = f.deterministic = true;
      d.library = "PyTorch SDPA pinned to its math kernel";
      break;
    default:
      break;
  }
  if (device == DeviceType::CUDA && !at::hasCUDA()) {
    d.available = false;
    d.unavailable_reason = "this PyTorch build has no CUDA (or no GPU is visible)";
  }
  return d;
}

}  // namespace

bool sdpa_takes_call_unchanged(const at::Tensor& q, const std::optional<at::Tensor>& mask, bool is_causal) {
  if (!mask) return true;  // run_sdpa changes only masks
  const bool castless = mask->scalar_type() == at::kBool || mask->scalar_type() == q.scalar_type();
  return castless && !is_causal && mask->dim() >= 2 && !expanded(*mask);
}

void register_sdpa() {
  for (DeviceType device : {DeviceType::CPU, DeviceType::CUDA}) {
    register_kernel(BackendId::TORCH_SDPA, device, &torch_sdpa);
    register_backend(sdpa_descriptor(BackendId::TORCH_SDPA, device));
  }
  register_kernel(BackendId::SDPA_CUDNN, DeviceType::CUDA, &pinned<Pin::CuDNN, BackendId::SDPA_CUDNN>);
  register_kernel(BackendId::SDPA_FLASH, DeviceType::CUDA, &pinned<Pin::Flash, BackendId::SDPA_FLASH>);
  register_kernel(BackendId::SDPA_EFFICIENT, DeviceType::CUDA, &pinned<Pin::Efficient, BackendId::SDPA_EFFICIENT>);
  register_kernel(BackendId::SDPA_MATH, DeviceType::CUDA, &pinned<Pin::Math, BackendId::SDPA_MATH>);
  for (BackendId id : {BackendId::SDPA_CUDNN, BackendId::SDPA_FLASH, BackendId::SDPA_EFFICIENT, BackendId::SDPA_MATH})
    register_backend(sdpa_descriptor(id, DeviceType::CUDA));
}

}  // namespace attnsel::torch_glue
