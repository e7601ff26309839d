// Dispatcher for the native CUDA attention forward: capability checks (refusal) and kernel choice.
#include "attention_cuda.h"

#include <cmath>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>

#include "flash_fwd_launch.h"
#include "flash_fwd_sm80.cuh"

namespace attnsel::cuda {

namespace {

using kernels::MaskKind;
using kernels::ScalarType;

// Opt-in shared memory per block by compute capability (what the D=512 kernel needs to know).
int smem_optin_bytes(int major, int minor) {
  if (major == 8 && (minor == 0 || minor == 7)) return 163 * 1024;
  if (major == 9 || major == 10) return 227 * 1024;
  return 99 * 1024;  // sm_86, sm_89, sm_12x
}

// A [B, H, S, D] operand: last dim contiguous; 16-byte aligned base and row/head/batch strides so each
// thread can move 16-byte chunks. A stride of a size-1 dimension is never used, so it is not checked.
std::string layout_problem(const char* name, const void* ptr, const std::int64_t (&st)[4], std::int64_t b,
                           std::int64_t h, std::int64_t s, std::int64_t d) {
  if (ptr == nullptr) return std::string(name) + " is null";
  if (d > 1 && st[3] != 1)
    return std::string(name) + " last dim is not contiguous (stride " + std::to_string(st[3]) + ", need 1)";
  if (reinterpret_cast<std::uintptr_t>(ptr) % 16 != 0) return std::string(name) + " data pointer is not 16-byte aligned";
  const std::int64_t sizes[3] = {b, h, s};
  static const char* dims[3] = {"batch", "head", "seq"};
  for (int i = 0; i < 3; ++i)
    if (sizes[i] > 1 && st[i] % 8 != 0)
      return std::string(name) + " " + dims[i] + " stride " + std::to_string(st[i]) +
             " is not a multiple of 8 elements (16-byte rows needed)";
  return {};
}

detail::FwdArgs make_args(const kernels::AttentionParams& p) {
  detail::FwdArgs a{};
  a.q = p.q;
  a.k = p.k;
  a.v = p.v;
  a.o = p.out;
  a.q_sb = p.batch > 1 ? p.q_stride[0] : 0;
  a.q_sh = p.heads_q > 1 ? p.q_stride[1] : 0;
  a.q_ss = p.q_stride[2];
  a.k_sb = p.batch > 1 ? p.k_stride[0] : 0;
  a.k_sh = p.heads_kv > 1 ? p.k_stride[1] : 0;
  a.k_ss = p.k_stride[2];
  a.v_sb = p.batch > 1 ? p.v_stride[0] : 0;
  a.v_sh = p.heads_kv > 1 ? p.v_stride[1] : 0;
  a.v_ss = p.v_stride[2];
  a.o_sb = p.batch > 1 ? p.out_stride[0] : 0;
  a.o_sh = p.heads_q > 1 ? p.out_stride[1] : 0;
  a.o_ss = p.out_stride[2];
  a.group = static_cast<int>(p.heads_q / p.heads_kv);
  a.seq_q = static_cast<int>(p.seq_q);
  a.seq_kv = static_cast<int>(p.seq_kv);
  a.scale_log2 = p.scale * 1.4426950408889634f;
  return a;
}

}  // namespace

std::string refusal(const AttentionParams& p, int sm_major, int sm_minor) {
  if (sm_major < 8)
    return "needs compute capability >= 8.0 (mma.sync bf16/fp16), device is " + std::to_string(sm_major) + "." +
           std::to_string(sm_minor);
  if (p.dtype == ScalarType::F32) return "dtype float32 not supported (bf16 and fp16 only)";
  if (p.mask_kind != MaskKind::None) return "attention masks are not supported (only is_causal)";
  const std::int64_t d = p.head_dim;
  if (d != 64 && d != 128 && d != 256 && d != 512)
    return "head_dim " + std::to_string(d) + " not in {64,128,256,512}";
  if (p.head_dim_v != d)
    return "head_dim_v " + std::to_string(p.head_dim_v) + " differs from head_dim " + std::to_string(d);
  if (d == 512 && smem_optin_bytes(sm_major, sm_minor) < 210 * 1024)
    return "head_dim 512 needs ~202 KB shared memory per block (sm_90/sm_100); device " +
           std::to_string(sm_major) + "." + std::to_string(sm_minor) + " has less";
  if (p.batch < 0 || p.heads_q <= 0 || p.heads_kv <= 0 || p.seq_q < 0) return "invalid sizes";
  if (p.heads_q % p.heads_kv != 0)
    return "heads_q " + std::to_string(p.heads_q) + " is not a multiple of heads_kv " + std::to_string(p.heads_kv);
  if (p.seq_kv <= 0) return "seq_kv is 0 (softmax over no keys)";
  if (p.batch > 65535 || p.heads_q > 65535) return "batch and heads must be <= 65535 (grid limits)";
  if (p.seq_q > std::numeric_limits<int>::max() - 1024 || p.seq_kv > std::numeric_limits<int>::max() - 1024)
    return "sequence length exceeds int32";
  if (!std::isfinite(p.scale) || p.scale <= 0.f) return "scale must be finite and > 0";
  std::string why;
  if (!(why = layout_problem("q", p.q, p.q_stride, p.batch, p.heads_q, p.seq_q, d)).empty()) return why;
  if (!(why = layout_problem("k", p.k, p.k_stride, p.batch, p.heads_kv, p.seq_kv, d)).empty()) return why;
  if (!(why = layout_problem("v", p.v, p.v_stride, p.batch, p.heads_kv, p.seq_kv, d)).empty()) return why;
  if (p.out == nullptr) return "out is null";
  if (p.out_stride[3] != 1) return "out last dim is not contiguous";
  if (reinterpret_cast<std::uintptr_t>(p.out) % 4 != 0) return "out is not 4-byte aligned";
  for (int i = 0; i < 3; ++i)
    if (p.out_stride[i] % 2 != 0) return "out strides must be even (2-element stores)";
  return {};
}

namespace detail {

bool device_is_sm90() {
  // Cached per device: attribute queries are cheap but not free on every call.
  static int cached[64];  // 0 unknown, 1 yes, 2 no
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0) return false;
  if (dev >= 64) dev = 63;
  if (cached[dev] == 0) {
    int major = 0, minor = 0;
    cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev);
    cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev);
    cached[dev] = (major == 9 && minor == 0) ? 1 : 2;
  }
  return cached[dev] == 1;
}

void attention_forward_variant(const kernels::AttentionParams& p, void* stream, int variant) {
  if (p.batch == 0 || p.seq_q == 0) return;
  const FwdArgs a = make_args(p);
  const bool bf16 = p.dtype == ScalarType::BF16;
  const int B = static_cast<int>(p.batch), H = static_cast<int>(p.heads_q);
  auto s = static_cast<cudaStream_t>(stream);
  cudaError_t e = cudaErrorInvalidValue;
#ifdef ATTNSEL_HAVE_SM90A
  // Hopper: the warp-specialised TMA/wgmma kernel by default (variant -1 or >= 10); variants 0.. keep the
  // mma.sync kernels. cudaErrorNotSupported means no tensor map could be made (driver without
  // cuTensorMapEncodeTiled): the mma.sync kernel below serves instead.
  if (p.head_dim != 512 && (variant < 0 || variant >= 10) && device_is_sm90()) {
    e = run_wg_sm90(a, static_cast<int>(p.head_dim), B, H, bf16, p.causal, variant, s);
    if (e != cudaErrorNotSupported) {
      if (e != cudaSuccess)
        throw std::runtime_error(std::string("attnsel native CUDA attention launch failed: ") + cudaGetErrorString(e));
      return;
    }
  }
#endif
  switch (p.head_dim) {
    case 64: e = run_hdim64(a, B, H, bf16, p.causal, variant, s); break;
    case 128: e = run_hdim128(a, B, H, bf16, p.causal, variant, s); break;
    case 256: e = run_hdim256(a, B, H, bf16, p.causal, variant, s); break;
    case 512: e = run_hdim512(a, B, H, bf16, p.causal, variant, s); break;
    default: throw std::invalid_argument("attnsel native CUDA attention: unsupported head_dim");
  }
  if (e != cudaSuccess)
    throw std::runtime_error(std::string("attnsel native CUDA attention launch failed: ") + cudaGetErrorString(e));
}

}  // namespace detail

bool faster_than_sdpa(const AttentionParams& p) {
#ifdef ATTNSEL_HAVE_SM90A
  // H100, benchmarks/results/cuda_h100.json: the warp-specialised kernel at head_dim 128 runs at 0.99-1.19x
  // cuDNN (Flux, Wan, causal); at 64 it trails cuDNN on long rows (SD-UNet 0.89x), so SDPA keeps those.
  return p.head_dim == 128 && p.dtype != ScalarType::F32 && detail::device_is_sm90();
#else
  (void)p;
  return false;
#endif
}

void attention_forward(const AttentionParams& p, void* stream) { detail::attention_forward_variant(p, stream, -1); }

}  // namespace attnsel::cuda
