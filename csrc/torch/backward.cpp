// Gradients of attnsel::attention: the op's autograd kernel (which backend ran, what it saved) and the backward
// entry (native CPU kernel; an ATen-composed backward for native CUDA and direct calls on the SDPA family).
#include "backward.h"

#include <ATen/ATen.h>
#include <ATen/ExpandUtils.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>

#include <cmath>
#include <limits>

#include "dispatch.h"
#include "kernels/cpu/attention_cpu.h"
#include "kernels/cpu/attention_cpu_backward.h"

namespace attnsel::torch_glue {

const c10::TypedOperatorHandle<decltype(attention)>& attention_op() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("attnsel::attention", "").typed<decltype(attention)>();
  return op;
}

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

constexpr double kNegInf = -std::numeric_limits<double>::infinity();

// Backends whose kernel is made of differentiable ATen ops (PyTorch SDPA): run above autograd, they get PyTorch's
// own backward.
bool differentiable_kernel(BackendId b) {
  return b == BackendId::TORCH_SDPA || b == BackendId::SDPA_CUDNN || b == BackendId::SDPA_FLASH ||
         b == BackendId::SDPA_EFFICIENT || b == BackendId::SDPA_MATH;
}


const auto& attention_backward_op() {
  static const auto op = c10::Dispatcher::singleton()
                              .findSchemaOrThrow("attnsel::attention_backward", "")
                              .typed<decltype(torch_glue::attention_backward)>();
  return op;
}

// `native` with its own backward: forward through the op (below autograd), saving the log-sum-exp it computes.
struct NativeAttention : public torch::autograd::Function<NativeAttention> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               const std::optional<at::Tensor>& attn_mask, bool is_causal, std::optional<double> scale,
                               std::int64_t backend, bool return_lse) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [out, lse] = attention_op().call(q, k, v, attn_mask, is_causal, scale, backend,
                                          /*return_lse=*/true);  // both native kernels write it
    ctx->save_for_backward({q, k, v, out, lse, attn_mask ? *attn_mask : at::Tensor()});
    ctx->saved_data["is_causal"] = is_causal;
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["backend"] = backend;
    ctx->saved_data["return_lse"] = return_lse;
    if (return_lse) return {out, lse};
    at::Tensor no_lse = at::empty({0}, q.options().dtype(at::kFloat));
    ctx->mark_non_differentiable({no_lse});
    return {out, no_lse};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor &q = saved[0], &k = saved[1], &v = saved[2], &out = saved[3], &lse = saved[4];
    std::optional<at::Tensor> mask;
    if (saved[5].defined()) mask = saved[5];
    // The mask is the 4th differentiable input when present (edges count defined tensors only).
    const bool mask_grad = mask && mask->is_floating_point() && ctx->needs_input_grad(3);
    const at::Tensor grad_out = grads[0].defined() ? grads[0] : at::zeros_like(out);
    std::optional<at::Tensor> grad_lse;
    if (ctx->saved_data["return_lse"].toBool() && grads[1].defined()) grad_lse = grads[1];
    auto [dq, dk, dv, dmask] = attention_backward_op().call(
        grad_out, q, k, v, out, lse, grad_lse, mask, ctx->saved_data["is_causal"].toBool(),
        ctx->saved_data["scale"].toOptional<double>(), ctx->saved_data["backend"].toInt(), mask_grad);
    return {dq, dk, dv, mask_grad ? dmask : at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

void parallel_over_aten(std::int64_t n, void* ctx, void (*fn)(void*, std::int64_t, std::int64_t)) {
  at::parallel_for(0, n, 1, [&](std::int64_t begin, std::int64_t end) { fn(ctx, begin, end); });
}

struct Grads {
  at::Tensor dq, dk, dv, dmask;  // dmask: fp32 [B, Hq, Sq, Sk] or undefined
};

Grads native_cpu_backward(const at::Tensor& grad_out, const AttentionCall& call, at::Tensor out,
                          const at::Tensor& lse, const at::Tensor& delta, bool mask_grad) {
  const at::Tensor &q = call.q, &k = call.k, &v = call.v;
  Grads g;
  g.dq = at::empty(q.sizes(), q.options());
  g.dk = at::empty(k.sizes(), k.options());
  g.dv = at::empty(v.sizes(), v.options());
  if (mask_grad) g.dmask = at::zeros({q.size(0), q.size(1), q.size(2), k.size(2)}, q.options().dtype(at::kFloat));
  cpu::AttentionBackwardParams bp;
  bp.fwd = make_params(call, out);
  bp.fwd.parallel_for = &parallel_over_aten;
  bp.dout = grad_out.data_ptr();
  bp.lse = lse.data_ptr<float>();
  bp.delta = delta.data_ptr<float>();
  bp.dq = g.dq.data_ptr();
  bp.dk = g.dk.data_ptr();
  bp.dv = g.dv.data_ptr();
  for (int i = 0; i < 4; ++i) {
    bp.dout_stride[i] = grad_out.stride(i);
    bp.dq_stride[i] = g.dq.stride(i);
    bp.dk_stride[i] = g.dk.stride(i);
    bp.dv_stride[i] = g.dv.stride(i);
  }
  if (mask_grad) bp.dmask = g.dmask.data_ptr<float>();
  cpu::attention_backward(bp);
  return g;
}

// The same algorithm from ATen ops on any device, fp32, over chunks of query rows so that the score-sized
// temporaries stay under ~256 MiB. lse empty: recomputed from each chunk's scores.
Grads composed_backward(const at::Tensor& grad_out, const AttentionCall& call, const at::Tensor& lse,
                        const at::Tensor& delta, bool mask_grad) {
  const at::Tensor &q = call.q, &k = call.k, &v = call.v;
  const std::int64_t B = q.size(0), Hq = q.size(1), Sq = q.size(2), D = q.size(3);
  const std::int64_t Hkv = k.size(1), Sk = k.size(2), Dv = v.size(3), G = Hq / Hkv;
  const auto f32 = q.options().dtype(at::kFloat);
  // Query heads grouped under their kv head: [B, Hkv, G, S, .]; K and V broadcast over the group.
  const at::Tensor qf = q.to(at::kFloat).reshape({B, Hkv, G, Sq, D});
  const at::Tensor kf = k.to(at::kFloat).unsqueeze(2);
  const at::Tensor vf = v.to(at::kFloat).unsqueeze(2);
  const at::Tensor dof = grad_out.to(at::kFloat).reshape({B, Hkv, G, Sq, Dv});
  const at::Tensor delta5 = delta.reshape({B, Hkv, G, Sq, 1});
  const bool have_lse = lse.numel() > 0;
  const at::Tensor lse5 = have_lse ? lse.reshape({B, Hkv, G, Sq, 1}) : at::Tensor();
  at::Tensor dq = at::empty({B, Hkv, G, Sq, D}, f32);
  at::Tensor dk = at::zeros({B, Hkv, Sk, D}, f32);
  at::Tensor dv = at::zeros({B, Hkv, Sk, Dv}, f32);
  at::Tensor dmask = mask_grad ? at::zeros({B, Hq, Sq, Sk}, f32) : at::Tensor();
  const std::int64_t row_bytes = std::max<std::int64_t>(1, B * Hq * Sk) * 4 * 3;  // scores, P, dP per query row
  const std::int64_t rows = std::max<std::int64_t>(1, (std::int64_t(256) << 20) / row_bytes);
  for (std::int64_t i0 = 0; i0 < Sq; i0 += rows) {
    const std::int64_t c = std::min(rows, Sq - i0);
    const at::Tensor qc = qf.narrow(3, i0, c);
    at::Tensor s = at::matmul(qc, kf.transpose(-1, -2)).mul_(call.scale);
    if (call.mask) {
      const at::Tensor m = call.mask->narrow(2, i0, c).reshape({B, Hkv, G, c, Sk});
      if (m.scalar_type() == at::kBool) s.masked_fill_(m.logical_not(), kNegInf);
      else s.add_(m.to(at::kFloat));
    }
    if (call.causal) {  // query i sees keys j <= i
      const at::Tensor i = at::arange(i0, i0 + c, f32.dtype(at::kLong)).unsqueeze(1);
      s.masked_fill_(at::arange(Sk, f32.dtype(at::kLong)).unsqueeze(0) > i, kNegInf);
    }
    at::Tensor lc = have_lse ? lse5.narrow(3, i0, c) : at::logsumexp(s, -1, true);
    lc = at::where(lc.isneginf(), at::zeros_like(lc), lc);  // rows that see no key: P = exp(-inf) = 0, not NaN
    const at::Tensor p = s.sub_(lc).exp_();
    const at::Tensor doc = dof.narrow(3, i0, c);
    dv.add_(at::matmul(p.transpose(-1, -2), doc).sum(2));
    const at::Tensor ds = at::matmul(doc, vf.transpose(-1, -2)).sub_(delta5.narrow(3, i0, c)).mul_(p);
    if (mask_grad) dmask.narrow(2, i0, c).copy_(ds.reshape({B, Hq, c, Sk}));
    dq.narrow(3, i0, c).copy_(at::matmul(ds, kf));
    dk.add_(at::matmul(ds.transpose(-1, -2), qc).sum(2));
  }
  return {dq.mul_(call.scale).reshape({B, Hq, Sq, D}).to(q.scalar_type()), dk.mul_(call.scale).to(k.scalar_type()),
          dv.to(v.scalar_type()), dmask};
}

}  // namespace

// The planner refuses backends whose descriptor declares no backward; these are the ones implemented here.
void check_backward_implemented(BackendId backend) {
  TORCH_CHECK(backend == BackendId::NATIVE || differentiable_kernel(backend), "attnsel.attention: backend '",
              backend_name(backend), "' declares a backward pass that attention_backward does not implement");
}

namespace {

bool needs_grad(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                const std::optional<at::Tensor>& attn_mask) {
  return at::GradMode::is_enabled() &&
         (q.requires_grad() || k.requires_grad() || v.requires_grad() || (attn_mask && attn_mask->requires_grad()));
}

std::tuple<at::Tensor, at::Tensor> differentiable_attention(const at::Tensor& q, const at::Tensor& k,
                                                            const at::Tensor& v,
                                                            const std::optional<at::Tensor>& attn_mask,
                                                            bool is_causal, std::optional<double> scale,
                                                            std::int64_t backend, bool return_lse) {
  check_call_inputs(q, k, v, attn_mask);
  const BackendId chosen = plan_backend(q, k, v, attn_mask, is_causal, backend, /*needs_grad=*/true, return_lse);
  check_backward_implemented(chosen);
  // The choice is made once, here: the backward pass uses the same backend, whatever the context is by then.
  if (differentiable_kernel(chosen))
    return attention(q, k, v, attn_mask, is_causal, scale, static_cast<std::int64_t>(chosen), return_lse);
  variable_list outs =
      NativeAttention::apply(q, k, v, attn_mask, is_causal, scale, static_cast<std::int64_t>(chosen), return_lse);
  return {outs[0], outs[1]};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> attention_autograd_kernel(c10::DispatchKeySet keys, const at::Tensor& q,
                                                             const at::Tensor& k, const at::Tensor& v,
                                                             const std::optional<at::Tensor>& attn_mask,
                                                             bool is_causal, std::optional<double> scale,
                                                             std::int64_t backend, bool return_lse) {
  if (needs_grad(q, k, v, attn_mask))
    return differentiable_attention(q, k, v, attn_mask, is_causal, scale, backend, return_lse);
  // No gradients: straight to the kernel below autograd, without a second dispatch-key computation.
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return attention_op().redispatch(keys & c10::after_autograd_keyset, q, k, v, attn_mask, is_causal, scale, backend,
                                   return_lse);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_backward(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const std::optional<at::Tensor>& grad_lse, const std::optional<at::Tensor>& attn_mask,
    bool is_causal, std::optional<double> scale, std::int64_t backend, bool mask_grad) {
  const std::optional<at::Tensor> mask = validate_inputs(q, k, v, attn_mask);
  const std::int64_t B = q.size(0), Hq = q.size(1), Sq = q.size(2);
  const std::vector<std::int64_t> out_shape = {B, Hq, Sq, v.size(3)};
  TORCH_CHECK_VALUE(out.sizes() == out_shape && grad_out.sizes() == out_shape,
                    "attnsel.attention_backward: out and grad_out must have shape [B, Hq, Sq, Dv] = ", out_shape,
                    ", got ", out.sizes(), " and ", grad_out.sizes());
  TORCH_CHECK_VALUE(out.scalar_type() == q.scalar_type() && grad_out.scalar_type() == q.scalar_type(),
                    "attnsel.attention_backward: out and grad_out must have q's dtype ", q.scalar_type());
  const std::vector<std::int64_t> lse_shape = {B, Hq, Sq};
  TORCH_CHECK_VALUE(lse.numel() == 0 || (lse.sizes() == lse_shape && lse.scalar_type() == at::kFloat),
                    "attnsel.attention_backward: lse must be empty or float32 of shape [B, Hq, Sq] = ", lse_shape);
  TORCH_CHECK_VALUE(!grad_lse || (grad_lse->sizes() == lse_shape && lse.numel() > 0),
                    "attnsel.attention_backward: grad_lse needs the forward's lse, both of shape ", lse_shape);
  TORCH_CHECK_VALUE(!mask_grad || (mask && mask->is_floating_point()),
                    "attnsel.attention_backward: mask_grad needs an additive (floating) attn_mask");
  const BackendId chosen = plan_backend(q, k, v, attn_mask, is_causal, backend, /*needs_grad=*/true, grad_lse.has_value());
  check_backward_implemented(chosen);
  const double resolved_scale = scale ? *scale : 1.0 / std::sqrt(static_cast<double>(q.size(3)));
  const AttentionCall call{q, k, v, mask, is_causal, resolved_scale, false};

  // delta = rowsum(dO * O) - d(lse): the softmax backward's row term (d lse / d s = P adds d(lse) * P to dS).
  at::Tensor delta = (grad_out.to(at::kFloat) * out.to(at::kFloat)).sum(-1);
  if (grad_lse) delta = delta - grad_lse->to(at::kFloat);
  delta = delta.contiguous();

  Grads g;
  if (chosen == BackendId::NATIVE && !q.is_cuda() && lse.numel() > 0) {
    TORCH_CHECK_VALUE(q.size(3) <= cpu::kMaxHeadDim && v.size(3) <= cpu::kMaxHeadDim,
                      "attnsel.attention_backward: head_dim above ", cpu::kMaxHeadDim, " on the native CPU kernel");
    g = native_cpu_backward(grad_out, call, out, lse.contiguous(), delta, mask_grad);
  } else {
    g = composed_backward(grad_out, call, lse, delta, mask_grad);
  }
  at::Tensor grad_mask = mask_grad ? at::sum_to(g.dmask, attn_mask->sizes()).to(attn_mask->scalar_type())
                                   : at::empty({0}, q.options());
  return {g.dq, g.dk, g.dv, grad_mask};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_backward_meta(
    const at::Tensor&, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor&,
    const at::Tensor&, const std::optional<at::Tensor>&, const std::optional<at::Tensor>& attn_mask, bool,
    std::optional<double>, std::int64_t, bool mask_grad) {
  check_call_inputs(q, k, v, attn_mask);
  at::Tensor grad_mask = mask_grad && attn_mask ? at::empty(attn_mask->sizes(), attn_mask->options())
                                                : at::empty({0}, q.options());
  return {at::empty(q.sizes(), q.options()), at::empty(k.sizes(), k.options()), at::empty(v.sizes(), v.options()),
          grad_mask};
}

}  // namespace attnsel::torch_glue
