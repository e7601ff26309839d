// Gradients of attnsel::attention: the autograd kernel of the op and the attention_backward op it calls.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/DispatchKeySet.h>

#include <optional>
#include <tuple>

#include "attnsel/attnsel.h"
#include "dispatch.h"

namespace attnsel::torch_glue {

// The registered op attnsel::attention, called through the dispatcher (its autograd kernel first): the C++ API's
// entry, so native callers get gradients too.
const c10::TypedOperatorHandle<decltype(attention)>& attention_op();

// The Autograd-key kernel of attnsel::attention. Without gradients it passes the call straight to the kernel below.
// With them it plans the backend (needs_grad: the planner refuses backends whose descriptor has no backward) and
// records it: `native` saves its log-sum-exp and gets attention_backward; the SDPA family runs above autograd, so
// PyTorch's own SDPA backward applies.
std::tuple<at::Tensor, at::Tensor> attention_autograd_kernel(c10::DispatchKeySet keys, const at::Tensor& q,
                                                             const at::Tensor& k, const at::Tensor& v,
                                                             const std::optional<at::Tensor>& attn_mask,
                                                             bool is_causal, std::optional<double> scale,
                                                             std::int64_t backend, bool return_lse);

// (grad_q, grad_k, grad_v, grad_mask) of the attention that `backend` computed. lse: the forward's log-sum-exp, or
// an empty tensor (then recomputed). grad_lse: the gradient flowing into a returned lse. grad_mask is the additive
// mask's gradient in the mask's own shape and dtype when mask_grad, else an empty tensor.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_backward(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const std::optional<at::Tensor>& grad_lse, const std::optional<at::Tensor>& attn_mask,
    bool is_causal, std::optional<double> scale, std::int64_t backend, bool mask_grad);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_backward_meta(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const std::optional<at::Tensor>& grad_lse, const std::optional<at::Tensor>& attn_mask,
    bool is_causal, std::optional<double> scale, std::int64_t backend, bool mask_grad);

}  // namespace attnsel::torch_glue
