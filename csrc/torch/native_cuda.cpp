// ATen glue for our fused CUDA kernel (backend `native` on CUDA). Built only with ATTNSEL_WITH_CUDA.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "dispatch.h"
#include "kernels/cuda/attention_cuda.h"

namespace attnsel::torch_glue {
namespace {

// A 1x1x1xhead_size problem standing for a selection request: what selection knows (head size, dtype).
kernels::AttentionParams request_params(const SelectionRequest& r) {
  alignas(16) static char dummy[16];
  kernels::AttentionParams p;
  p.q = p.k = p.v = dummy;
  p.out = dummy;
  p.dtype = r.dtype == DType::F32 ? kernels::ScalarType::F32
                                  : (r.dtype == DType::F16 ? kernels::ScalarType::F16 : kernels::ScalarType::BF16);
  p.batch = p.heads_q = p.heads_kv = p.seq_q = p.seq_kv = 1;
  p.head_dim = p.head_dim_v = r.head_size;
  for (auto* st : {&p.q_stride, &p.k_stride, &p.v_stride, &p.out_stride}) {
    (*st)[0] = (*st)[1] = (*st)[2] = r.head_size;  // rows of head_size elements, last dim contiguous
    (*st)[3] = 1;
  }
  return p;
}

// Selection-time check: the kernel's limits that depend only on head size, dtype and the GPU.
std::string selection_check(const SelectionRequest& r) {
  if (at::cuda::device_count() == 0) return "no CUDA GPU is visible";
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  return cuda::refusal(request_params(r), prop->major, prop->minor);
}

bool prefers_native(const SelectionRequest& r) {
  return at::cuda::device_count() > 0 && cuda::faster_than_sdpa(request_params(r));
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
  set_capability_check(BackendId::NATIVE, DeviceType::CUDA, &selection_check);
  set_native_preference(DeviceType::CUDA, &prefers_native);
  const bool gpu = at::hasCUDA();
  set_backend_availability(BackendId::NATIVE, DeviceType::CUDA, gpu, gpu ? "" : "no CUDA GPU is visible");
}

}  // namespace attnsel::torch_glue
