// The native dispatch table keyed by (backend, device) and the attention entry point shared by the
// op registration and the C++ API.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

#include "attnsel/attnsel.h"
#include "kernels/attention_params.h"

namespace attnsel::torch_glue {

// Inputs after validation (the mask as the caller gave it: kernels index it through make_params's 4-d strides).
struct AttentionCall {
  const at::Tensor& q;
  const at::Tensor& k;
  const at::Tensor& v;
  const std::optional<at::Tensor>& mask;  // bool or floating additive, 1-4 dims broadcastable to [B, Hq, Sq, Sk]
  bool causal;
  double scale;       // resolved (1/sqrt(D) by default)
  bool return_lse;    // the caller needs the log-sum-exp (a kernel that cannot give it refuses)
};

// out: [B, Hq, Sq, Dv]. lse: [B, Hq, Sq] fp32 (natural log; -inf for a row that sees no key) when the call asked
// for it; otherwise whatever the kernel has for free (native fills it, others leave it undefined).
struct AttentionResult {
  at::Tensor out;
  at::Tensor lse;
};

using KernelFn = AttentionResult (*)(const AttentionCall& call);

void register_kernel(BackendId backend, DeviceType device, KernelFn fn);
KernelFn find_kernel(BackendId backend, DeviceType device);

// Op-level backend ids besides the named ones (>= 0): this thread's policy (forced > component > global > auto),
// and auto (the planner's fastest backend that accepts the call).
inline constexpr std::int64_t kContextBackend = -1;
inline constexpr std::int64_t kAutoBackend = -2;

// backend: a named id, kContextBackend or kAutoBackend. Caller mistakes raise c10::ValueError (TORCH_CHECK_VALUE).
// Returns (out, lse); lse is an empty tensor unless return_lse (the op's schema needs a defined tensor).
std::tuple<at::Tensor, at::Tensor> attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                             const std::optional<at::Tensor>& attn_mask, bool is_causal,
                                             std::optional<double> scale, std::int64_t backend, bool return_lse);

// The backend the op runs for this call: `backend` when >= 0 (checked: it must accept the call), else the planner's
// answer (auto, or this thread's policy). needs_grad: the output needs a backward pass (backends without one are
// refused); needs_lse likewise. Raises c10::ValueError with every reason when nothing can run it. Validate the
// inputs first.
BackendId plan_backend(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                       const std::optional<at::Tensor>& attn_mask, bool is_causal, std::int64_t backend,
                       bool needs_grad, bool needs_lse = false);

// The checks of validate_inputs without building the broadcast mask (for callers that do not index it).
void check_call_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                       const std::optional<at::Tensor>& attn_mask);

// The call's signature as the planner takes it (mask: as given, or broadcast to 4-d; checked).
CallSignature call_signature(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                             const std::optional<at::Tensor>& mask, bool is_causal, bool needs_grad, bool needs_lse);

// Whether the torch_sdpa backend hands this call to PyTorch's SDPA unchanged (it casts a mask of another dtype,
// folds causal into a mask, gives a 1-d mask a leading dim and an expanded mask back compact): then a caller may call
// SDPA itself for the same result (the eager route does). sdpa.cpp, beside the changes it describes.
bool sdpa_takes_call_unchanged(const at::Tensor& q, const std::optional<at::Tensor>& mask, bool is_causal);

// Whether autograd will differentiate this call's output (grad mode on and an input requires grad).
bool inputs_need_grad(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v);

// Checks q/k/v and the mask (ValueError on caller mistakes); returns the mask broadcast to [B, Hq, Sq, Sk] as a
// stride-0 view.
std::optional<at::Tensor> validate_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                          const std::optional<at::Tensor>& attn_mask);

// Output shapes for the fake (meta) implementation.
std::tuple<at::Tensor, at::Tensor> attention_meta(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                  const std::optional<at::Tensor>& attn_mask, bool is_causal,
                                                  std::optional<double> scale, std::int64_t backend,
                                                  bool return_lse);

// Fills kernel parameters from tensors (no copies): shared by the CPU and CUDA glue.
kernels::AttentionParams make_params(const AttentionCall& call, at::Tensor& out);

DType selector_dtype(const at::Tensor& t);
DeviceType selector_device(const at::Tensor& t);

// Registration hooks implemented by each glue file; ops.cpp calls them once at load.
void register_native_cpu();
void register_sdpa();
void register_bridges();
#ifdef ATTNSEL_WITH_CUDA
void register_native_cuda();
#endif

}  // namespace attnsel::torch_glue
