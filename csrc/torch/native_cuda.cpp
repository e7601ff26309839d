// ATen glue for our fused CUDA kernel (backend `native` on CUDA). Built only with ATTNSEL_WITH_CUDA.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "dispatch.h"
#include "kernels/cuda/attention_cuda.h"

namespace attnsel::torch_glue {
namespace {

// Kernel parameters standing for a call signature (sizes, dtype, mask kind and broadcast, causal; contiguous
// layout), so the planner asks the kernel's own refusal about the call.
kernels::AttentionParams signature_params(const CallSignature& c) {
  alignas(16) static char dummy[16];
  kernels::AttentionParams p;
  p.q = p.k = p.v = dummy;
  p.out = dummy;
  p.dtype = c.dtype == DType::F32 ? kernels::ScalarType::F32
                                  : (c.dtype == DType::F16 ? kernels::ScalarType::F16 : kernels::ScalarType::BF16);
  p.batch = c.batch;
  p.heads_q = c.heads_q;
  p.heads_kv = c.heads_kv;
  p.seq_q = c.seq_q;
  p.seq_kv = c.seq_kv;
  p.head_dim = c.head_dim;
  p.head_dim_v = c.value_head_dim();
  const auto contiguous = [](std::int64_t* st, std::int64_t heads, std::int64_t seq, std::int64_t dim) {
    st[3] = 1;
    st[2] = dim;
    st[1] = seq * dim;
    st[0] = heads * seq * dim;
  };
  contiguous(p.q_stride, c.heads_q, c.seq_q, c.head_dim);
  contiguous(p.k_stride, c.heads_kv, c.seq_kv, c.head_dim);
  contiguous(p.v_stride, c.heads_kv, c.seq_kv, p.head_dim_v);
  contiguous(p.out_stride, c.heads_q, c.seq_q, p.head_dim_v);
  if (c.mask != MaskKind::None) {
    p.mask = dummy;
    p.mask_kind = c.mask == MaskKind::Bool ? kernels::MaskKind::Bool : kernels::MaskKind::Additive;
    p.mask_stride[0] = c.seq_kv;
    p.mask_stride[1] = c.mask_key_padding ? 0 : c.seq_q * c.seq_kv;
    p.mask_stride[2] = c.mask_key_padding ? 0 : c.seq_kv;
    p.mask_stride[3] = 1;
  }
  p.causal = c.causal;
  return p;
}

// Plan-time check: the kernel's own limits for the call on this GPU.
std::string call_check(const CallSignature& c) {
  if (at::cuda::device_count() == 0) return "no CUDA GPU is visible";
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  return cuda::refusal(signature_params(c), prop->major, prop->minor);
}

// Where `auto` without a tuning entry tries native ahead of PyTorch SDPA: head sizes PyTorch's fast kernels refuse,
// masked calls (1.01-2.0x PyTorch's best masked kernel on the H200, benchmarks/results/cuda_h200.json), and where
// the kernel layer measured it faster.
bool prefers_native(const CallSignature& c) {
  if (at::cuda::device_count() == 0) return false;
  if (c.head_dim > 256) return true;  // 2.1x PyTorch's efficient kernel forward+backward at 512 too
  // Calls that need gradients: our composed backward is far slower than SDPA's (backward_cuda_h200.json).
  return !c.needs_grad && (c.mask != MaskKind::None || cuda::faster_than_sdpa(signature_params(c)));
}

AttentionResult native_cuda(const AttentionCall& call) {
  c10::cuda::CUDAGuard guard(call.q.device());
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  at::Tensor out = at::empty({call.q.size(0), call.q.size(1), call.q.size(2), call.v.size(3)}, call.q.options());
  // Log-sum-exp, [B, Hq, Sq] fp32 (the kernels write it in the epilogue; -inf for rows that see no key).
  at::Tensor lse = call.return_lse
                       ? at::empty({call.q.size(0), call.q.size(1), call.q.size(2)}, call.q.options().dtype(at::kFloat))
                       : at::Tensor();
  if (out.numel() == 0) return {out, lse};
  kernels::AttentionParams p = make_params(call, out);
  if (lse.defined()) p.lse = lse.data_ptr<float>();
  std::string why = cuda::refusal(p, prop->major, prop->minor);
  if (!why.empty()) {
    // Layouts the kernel cannot stream (inner stride != 1, unaligned rows): run on contiguous copies.
    const at::Tensor q = call.q.contiguous(), k = call.k.contiguous(), v = call.v.contiguous();
    AttentionCall packed{q, k, v, call.mask, call.causal, call.scale, call.return_lse};
    kernels::AttentionParams pp = make_params(packed, out);
    pp.lse = p.lse;
    if (cuda::refusal(pp, prop->major, prop->minor).empty()) {
      cuda::attention_forward(pp, at::cuda::getCurrentCUDAStream().stream());
      return {out, lse};
    }
  }
  TORCH_CHECK_VALUE(why.empty(), "attnsel.attention: the native CUDA kernel cannot run this input: ", why,
                    " (torch_sdpa runs it)");
  cuda::attention_forward(p, at::cuda::getCurrentCUDAStream().stream());
  return {out, lse};
}

}  // namespace

void register_native_cuda() {
  register_kernel(BackendId::NATIVE, DeviceType::CUDA, &native_cuda);
  BackendDescriptor d;
  d.backend = BackendId::NATIVE;
  d.device = DeviceType::CUDA;
  d.f16 = d.bf16 = true;
  d.min_head = 8;
  d.max_head = 512;  // multiples of 8 up to 256, and 512: the kernel's own check (call_check) says which
  d.min_sm = 80;
  d.library = "attnsel's fused CUDA kernel";
  Features& f = d.features;
  f.bool_mask = f.additive_mask = f.causal = f.causal_any_lengths = f.grouped_query = true;
  f.different_lengths = f.lse = f.backward = f.deterministic = true;  // backward: csrc/torch/backward.cpp
  d.check = &call_check;
  d.auto_rank = 40;        // behind torch_sdpa ...
  d.prefers = &prefers_native;
  d.preferred_rank = 20;   // ... except where measured faster (ahead of SDPA, behind flash-attn 3)
  d.available = at::hasCUDA();
  if (!d.available) d.unavailable_reason = "no CUDA GPU is visible";
  register_backend(std::move(d));
}

}  // namespace attnsel::torch_glue
