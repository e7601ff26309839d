// The one op-registration file: schema, CPU/CUDA/Meta implementations and the kernel table setup.
#include <ATen/Context.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

#include "backward.h"
#include "dispatch.h"

namespace attnsel::torch_glue {
namespace {

void register_all_kernels() {
  register_native_cpu();
  register_sdpa();
  register_bridges();
#ifdef ATTNSEL_WITH_CUDA
  register_native_cuda();
#else
  BackendDescriptor d;  // known, so `attnsel backends` and refusals say why it cannot run
  d.backend = BackendId::NATIVE;
  d.device = DeviceType::CUDA;
  d.f16 = d.bf16 = true;
  d.available = false;
  d.unavailable_reason = "attnsel was built without CUDA (rebuild with a CUDA PyTorch, or ATTNSEL_FORCE_CUDA=1)";
  register_backend(std::move(d));
#endif
}

// Runs when the library loads, before any op call can reach the table.
const bool g_registered = (register_all_kernels(), true);

}  // namespace
}  // namespace attnsel::torch_glue

TORCH_LIBRARY(attnsel, m) {
  m.def(
      "attention(Tensor q, Tensor k, Tensor v, Tensor? attn_mask=None, bool is_causal=False, float? scale=None, "
      "int backend=-1, bool return_lse=False) -> (Tensor out, Tensor lse)");
  // What the Python bridges implement (flash-attn, sageattention): defined here so the kernel
  // table can call it; its implementation is registered from Python (attnsel/bridges.py) through torch.library.
  m.def("bridge(Tensor q, Tensor k, Tensor v, Tensor? attn_mask, bool is_causal, float scale, int backend, "
        "bool return_lse=False) -> (Tensor out, Tensor lse)");
}

TORCH_LIBRARY_IMPL(attnsel, CPU, m) { m.impl("attention", &attnsel::torch_glue::attention); }
TORCH_LIBRARY_IMPL(attnsel, CUDA, m) { m.impl("attention", &attnsel::torch_glue::attention); }
TORCH_LIBRARY_IMPL(attnsel, Meta, m) { m.impl("attention", &attnsel::torch_glue::attention_meta); }

// ---- gradients (backward.{h,cpp}) --------------------------------------------------------------------------------
// attention's autograd kernel picks and records the backend; attention_backward is the backward entry it calls (a
// real op, so torch.compile traces it). Double backward is not implemented: attention_backward's autograd says so.
TORCH_LIBRARY_FRAGMENT(attnsel, m) {
  m.def(
      "attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? grad_lse, "
      "Tensor? attn_mask, bool is_causal, float? scale, int backend, bool mask_grad) -> (Tensor grad_q, "
      "Tensor grad_k, Tensor grad_v, Tensor grad_mask)");
}

TORCH_LIBRARY_IMPL(attnsel, Autograd, m) {
  m.impl("attention", &attnsel::torch_glue::attention_autograd_kernel);
  m.impl("attention_backward", torch::autograd::autogradNotImplementedFallback());
}
TORCH_LIBRARY_IMPL(attnsel, CPU, m) { m.impl("attention_backward", &attnsel::torch_glue::attention_backward); }
TORCH_LIBRARY_IMPL(attnsel, CUDA, m) { m.impl("attention_backward", &attnsel::torch_glue::attention_backward); }
TORCH_LIBRARY_IMPL(attnsel, Meta, m) { m.impl("attention_backward", &attnsel::torch_glue::attention_backward_meta); }
