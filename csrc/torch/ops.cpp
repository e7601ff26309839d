// The one op-registration file: schema, CPU/CUDA/Meta implementations and the kernel table setup.
#include <ATen/Context.h>
#include <torch/library.h>

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
  m.def("bridge(Tensor q, Tensor k, Tensor v, Tensor? attn_mask, bool is_causal, float scale, int backend) -> Tensor");
}

TORCH_LIBRARY_IMPL(attnsel, CPU, m) { m.impl("attention", &attnsel::torch_glue::attention); }
TORCH_LIBRARY_IMPL(attnsel, CUDA, m) { m.impl("attention", &attnsel::torch_glue::attention); }
TORCH_LIBRARY_IMPL(attnsel, Meta, m) { m.impl("attention", &attnsel::torch_glue::attention_meta); }
