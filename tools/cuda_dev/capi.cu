// Dev harness: a C ABI over the native CUDA attention so Python can drive it through ctypes
// (no torch build needed on the device). Not part of the extension.
#include <cstdint>
#include <cstring>
#include <exception>
#include <string>

#include "../../csrc/kernels/cuda/attention_cuda.h"
#include "../../csrc/kernels/cuda/flash_fwd_launch.h"

using attnsel::kernels::AttentionParams;
using attnsel::kernels::MaskKind;
using attnsel::kernels::ScalarType;

static thread_local std::string g_msg;

static ScalarType scalar(int dtype) {
  return dtype == 0 ? ScalarType::F32 : dtype == 1 ? ScalarType::F16 : ScalarType::BF16;
}

static AttentionParams make(const void* q, const void* k, const void* v, void* out, int dtype, const std::int64_t* sizes,
                            const std::int64_t* qs, const std::int64_t* ks, const std::int64_t* vs,
                            const std::int64_t* os, int causal, float scale) {
  AttentionParams p;
  p.q = q;
  p.k = k;
  p.v = v;
  p.out = out;
  p.dtype = scalar(dtype);
  p.batch = sizes[0];
  p.heads_q = sizes[1];
  p.heads_kv = sizes[2];
  p.seq_q = sizes[3];
  p.seq_kv = sizes[4];
  p.head_dim = sizes[5];
  p.head_dim_v = sizes[6];
  for (int i = 0; i < 4; ++i) {
    p.q_stride[i] = qs[i];
    p.k_stride[i] = ks[i];
    p.v_stride[i] = vs[i];
    p.out_stride[i] = os[i];
  }
  p.causal = causal != 0;
  p.scale = scale;
  return p;
}

// sizes = {B, Hq, Hkv, Sq, Sk, D, Dv}; dtype 0 f32, 1 f16, 2 bf16. mask_kind 0 none, 1 bool (bytes), 2 additive
// (mask_dtype as dtype), ms its [B, Hq, Sq, Sk] element strides. lse: null, or [B, Hq, Sq] fp32 contiguous for the
// log-sum-exp. Returns "" on success, else the reason.
extern "C" const char* attnsel_dev_forward(const void* q, const void* k, const void* v, void* out, int dtype,
                                           const std::int64_t* sizes, const std::int64_t* qs,
                                           const std::int64_t* ks, const std::int64_t* vs,
                                           const std::int64_t* os, int causal, float scale, const void* mask,
                                           int mask_kind, int mask_dtype, const std::int64_t* ms, int sm_major,
                                           int sm_minor, int variant, void* stream, float* lse) {
  AttentionParams p = make(q, k, v, out, dtype, sizes, qs, ks, vs, os, causal, scale);
  p.lse = lse;
  if (mask_kind != 0) {
    p.mask_kind = mask_kind == 1 ? MaskKind::Bool : MaskKind::Additive;
    p.mask = mask;
    p.mask_dtype = scalar(mask_dtype);
    for (int i = 0; i < 4; ++i) p.mask_stride[i] = ms[i];
  }
  g_msg = attnsel::cuda::refusal(p, sm_major, sm_minor);
  if (!g_msg.empty()) {
    g_msg = "refused: " + g_msg;
    return g_msg.c_str();
  }
  try {
    attnsel::cuda::detail::attention_forward_variant(p, stream, variant);
  } catch (const std::exception& e) {
    g_msg = e.what();
  }
  return g_msg.c_str();
}
