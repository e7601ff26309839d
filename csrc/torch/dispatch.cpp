// Input validation, backend resolution and the (backend, device) kernel table.
#include "dispatch.h"

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>
#include <c10/util/Exception.h>

#include <array>
#include <atomic>
#include <cmath>
#include <stdexcept>

namespace attnsel::torch_glue {
namespace {

// Written only while the library loads (ops.cpp), read on every call: plain array, no lock.
std::array<std::array<KernelFn, kNumDeviceTypes>, kNumBackends> g_table{};

std::string shape_str(const at::Tensor& t) {
  std::string s = "[";
  for (int64_t i = 0; i < t.dim(); ++i) s += (i ? ", " : "") + std::to_string(t.size(i));
  return s + "]";
}

// Checks that an SDPA-style mask broadcasts to [B, Hq, Sq, Sk] (dtype, device, sizes).
void check_mask(const at::Tensor& mask, const at::Tensor& q, const at::Tensor& k) {
  const std::array<int64_t, 4> target = {q.size(0), q.size(1), q.size(2), k.size(2)};
  TORCH_CHECK_VALUE(mask.dim() >= 1 && mask.dim() <= 4, "attnsel.attention: attn_mask must have 1 to 4 dims, got ",
              mask.dim());
  TORCH_CHECK_VALUE(mask.scalar_type() == at::kBool || mask.scalar_type() == q.scalar_type() ||
                  mask.scalar_type() == at::kFloat,
              "attnsel.attention: attn_mask must be bool, float32 or the query's dtype (", q.scalar_type(),
              "), got ", mask.scalar_type());
  TORCH_CHECK_VALUE(mask.device() == q.device(), "attnsel.attention: attn_mask is on ", mask.device(),
              " but the query is on ", q.device());
  const int64_t offset = 4 - mask.dim();
  for (int64_t i = 0; i < mask.dim(); ++i) {
    const int64_t m = mask.size(i), t = target[offset + i];
    TORCH_CHECK_VALUE(m == 1 || m == t, "attnsel.attention: attn_mask of shape ", shape_str(mask),
                " does not broadcast to [B, Hq, Sq, Sk] = [", target[0], ", ", target[1], ", ", target[2], ", ",
                target[3], "]");
  }
}

// Stride of a mask given with 1 to 4 dims (right-aligned) along dim of [B, Hq, Sq, Sk]: 0 where it broadcasts
// (a missing leading dim or size 1), else its own stride (itself 0 where the caller expanded it).
int64_t broadcast_stride(const at::Tensor& mask, int64_t dim) {
  const int64_t own = dim - (4 - mask.dim());
  return own < 0 || mask.size(own) == 1 ? 0 : mask.stride(own);
}

// The mask broadcast to [B, Hq, Sq, Sk] as a stride-0 view (what the kernels index), checked first.
at::Tensor broadcast_mask(const at::Tensor& mask, const at::Tensor& q, const at::Tensor& k) {
  check_mask(mask, q, k);
  return mask.expand({q.size(0), q.size(1), q.size(2), k.size(2)});
}

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  TORCH_CHECK_VALUE(q.dim() == 4 && k.dim() == 4 && v.dim() == 4,
              "attnsel.attention: q, k, v must be 4-d (batch, heads, seq, head_dim), got q ", shape_str(q), ", k ",
              shape_str(k), ", v ", shape_str(v));
  TORCH_CHECK_VALUE(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(),
              "attnsel.attention: q, k, v must share a dtype, got ", q.scalar_type(), ", ", k.scalar_type(), ", ",
              v.scalar_type());
  TORCH_CHECK_VALUE(q.scalar_type() == at::kFloat || q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16,
              "attnsel.attention: dtype must be float32, float16 or bfloat16, got ", q.scalar_type());
  TORCH_CHECK_VALUE(q.device() == k.device() && q.device() == v.device(),
              "attnsel.attention: q, k, v must be on one device, got ", q.device(), ", ", k.device(), ", ",
              v.device());
  TORCH_CHECK_VALUE(q.size(0) == k.size(0) && q.size(0) == v.size(0), "attnsel.attention: batch sizes differ: q ",
              shape_str(q), ", k ", shape_str(k), ", v ", shape_str(v));
  TORCH_CHECK_VALUE(k.size(1) == v.size(1) && k.size(2) == v.size(2), "attnsel.attention: k ", shape_str(k), " and v ",
              shape_str(v), " must share heads and sequence length");
  TORCH_CHECK_VALUE(k.size(1) > 0 && q.size(1) % k.size(1) == 0, "attnsel.attention: q heads (", q.size(1),
              ") must be a multiple of k/v heads (", k.size(1), ")");
  TORCH_CHECK_VALUE(q.size(3) == k.size(3), "attnsel.attention: q and k head_dim differ: ", q.size(3), " vs ",
              k.size(3));
  TORCH_CHECK_VALUE(q.size(3) > 0, "attnsel.attention: head_dim must be positive");
}

}  // namespace

DType selector_dtype(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kHalf: return DType::F16;
    case at::kBFloat16: return DType::BF16;
    default: return DType::F32;
  }
}

DeviceType selector_device(const at::Tensor& t) { return t.is_cuda() ? DeviceType::CUDA : DeviceType::CPU; }

void register_kernel(BackendId backend, DeviceType device, KernelFn fn) {
  g_table[static_cast<int>(backend)][static_cast<int>(device)] = fn;
}

KernelFn find_kernel(BackendId backend, DeviceType device) {
  return g_table[static_cast<int>(backend)][static_cast<int>(device)];
}

void check_call_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                       const std::optional<at::Tensor>& attn_mask) {
  check_inputs(q, k, v);
  if (attn_mask) check_mask(*attn_mask, q, k);
}

std::optional<at::Tensor> validate_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                          const std::optional<at::Tensor>& attn_mask) {
  check_inputs(q, k, v);
  if (!attn_mask) return std::nullopt;
  return broadcast_mask(*attn_mask, q, k);
}

CallSignature call_signature(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                             const std::optional<at::Tensor>& mask, bool is_causal, bool needs_grad, bool needs_lse) {
  CallSignature c;
  c.batch = q.size(0);
  c.heads_q = q.size(1);
  c.heads_kv = k.size(1);
  c.seq_q = q.size(2);
  c.seq_kv = k.size(2);
  c.head_dim = static_cast<int>(q.size(3));
  c.head_dim_v = static_cast<int>(v.size(3));
  c.dtype = selector_dtype(q);
  c.device = selector_device(q);
  if (mask) {
    c.mask = mask->scalar_type() == at::kBool ? MaskKind::Bool : MaskKind::Additive;
    // Broadcast over heads and queries = one row of keys per batch.
    c.mask_key_padding = broadcast_stride(*mask, 1) == 0 && broadcast_stride(*mask, 2) == 0;
  }
  c.causal = is_causal;
  c.needs_grad = needs_grad;
  c.needs_lse = needs_lse;
  return c;
}

bool inputs_need_grad(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  return at::GradMode::is_enabled() && (q.requires_grad() || k.requires_grad() || v.requires_grad());
}

BackendId plan_backend(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                       const std::optional<at::Tensor>& attn_mask, bool is_causal, std::int64_t backend,
                       bool needs_grad, bool needs_lse) {
  TORCH_CHECK_VALUE(backend >= kAutoBackend && backend < kNumBackends, "attnsel.attention: backend id ", backend,
                    " out of range [", kAutoBackend, ", ", kNumBackends - 1, "] (", kAutoBackend, " = auto, ",
                    kContextBackend, " = this thread's policy)");
  const CallSignature call = call_signature(q, k, v, attn_mask, is_causal, needs_grad, needs_lse);
  try {
    if (backend == kContextBackend) {
      const std::optional<ComponentContext> ctx = current_component();
      return select_for_call_backend(call, ctx ? &*ctx : nullptr);
    }
    return plan_call_backend(call, backend >= 0 ? std::optional<BackendId>(static_cast<BackendId>(backend))
                                                : std::nullopt);
  } catch (const std::invalid_argument& e) {
    std::string what = e.what();
    if (what.rfind("attnsel: ", 0) == 0) what = what.substr(9);
    TORCH_CHECK_VALUE(false, "attnsel.attention: ", what);  // ValueError in Python, like the front's
  }
}

std::tuple<at::Tensor, at::Tensor> attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                             const std::optional<at::Tensor>& attn_mask, bool is_causal,
                                             std::optional<double> scale, std::int64_t backend, bool return_lse) {
  check_call_inputs(q, k, v, attn_mask);  // no broadcast view: make_params derives its strides (~1 us saved)
  const DeviceType device = selector_device(q);
  const BackendId chosen = plan_backend(q, k, v, attn_mask, is_causal, backend, inputs_need_grad(q, k, v),
                                        return_lse);
  KernelFn fn = find_kernel(chosen, device);
  TORCH_CHECK(fn != nullptr, "attnsel.attention: backend '", backend_name(chosen), "' has no native kernel on ",
              device_name(device), " (bridged backends run through attnsel.attention in Python)");
  const double resolved_scale = scale ? *scale : 1.0 / std::sqrt(static_cast<double>(q.size(3)));
  AttentionResult r = fn(AttentionCall{q, k, v, attn_mask, is_causal, resolved_scale, return_lse});
  if (!return_lse) return {r.out, at::empty({0}, q.options().dtype(at::kFloat))};
  TORCH_CHECK(r.lse.defined(), "attnsel.attention: backend '", backend_name(chosen), "' returned no log-sum-exp");
  return {r.out, r.lse};
}

std::tuple<at::Tensor, at::Tensor> attention_meta(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                  const std::optional<at::Tensor>& attn_mask, bool,
                                                  std::optional<double>, std::int64_t, bool return_lse) {
  check_call_inputs(q, k, v, attn_mask);
  at::Tensor out = at::empty({q.size(0), q.size(1), q.size(2), v.size(3)}, q.options());
  at::Tensor lse = return_lse ? at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat))
                              : at::empty({0}, q.options().dtype(at::kFloat));
  return {out, lse};
}

kernels::AttentionParams make_params(const AttentionCall& c, at::Tensor& out) {
  kernels::AttentionParams p;
  auto dtype = [](const at::Tensor& t) {
    switch (t.scalar_type()) {
      case at::kHalf: return kernels::ScalarType::F16;
      case at::kBFloat16: return kernels::ScalarType::BF16;
      default: return kernels::ScalarType::F32;
    }
  };
  p.q = c.q.data_ptr();
  p.k = c.k.data_ptr();
  p.v = c.v.data_ptr();
  p.out = out.data_ptr();
  p.dtype = dtype(c.q);
  p.batch = c.q.size(0);
  p.heads_q = c.q.size(1);
  p.heads_kv = c.k.size(1);
  p.seq_q = c.q.size(2);
  p.seq_kv = c.k.size(2);
  p.head_dim = c.q.size(3);
  p.head_dim_v = c.v.size(3);
  for (int i = 0; i < 4; ++i) {
    p.q_stride[i] = c.q.stride(i);
    p.k_stride[i] = c.k.stride(i);
    p.v_stride[i] = c.v.stride(i);
    p.out_stride[i] = out.stride(i);
  }
  if (c.mask) {
    const at::Tensor& m = *c.mask;
    p.mask = m.data_ptr();
    p.mask_kind = m.scalar_type() == at::kBool ? kernels::MaskKind::Bool : kernels::MaskKind::Additive;
    p.mask_dtype = dtype(m);
    for (int64_t i = 0; i < 4; ++i) p.mask_stride[i] = broadcast_stride(m, i);
  }
  p.causal = c.causal;
  p.scale = static_cast<float>(c.scale);
  return p;
}

}  // namespace attnsel::torch_glue
