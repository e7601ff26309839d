// Dispatcher for the native CUDA attention forward: capability checks (refusal) and kernel choice.
#include "attention_cuda.h"

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
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
  a.head_dim = static_cast<int>(p.head_dim);
  a.kv_cols = a.head_dim;
  a.lse = p.lse;
  a.scale = p.scale;
  constexpr float kLog2e = 1.4426950408889634f;
  // Masked kernels scale the scores before adding the mask, so their softmax runs on scale 1.
  a.scale_log2 = p.mask_kind == MaskKind::None ? p.scale * kLog2e : kLog2e;
  if (p.mask_kind != MaskKind::None) {
    a.mask = p.mask;
    a.mask_sb = p.batch > 1 ? p.mask_stride[0] : 0;
    a.mask_sh = p.heads_q > 1 ? p.mask_stride[1] : 0;
    a.mask_sq = p.seq_q > 1 ? p.mask_stride[2] : 0;
    a.mask_sk = p.seq_kv > 1 ? p.mask_stride[3] : 0;
    a.mask_f32 = p.mask_kind == MaskKind::Additive && p.mask_dtype == ScalarType::F32;
  }
  return a;
}

int mask_mode(const kernels::AttentionParams& p) {
  switch (p.mask_kind) {
    case MaskKind::Bool: return detail::kBoolMask;
    case MaskKind::Additive: return detail::kAddMask;
    default: return detail::kNoMask;
  }
}

// The size the kernels are built for: head sizes up to 256 run zero-padded to 64, 128 or 256 (sm_80 kernels); the
// Hopper kernels also have 80 and 96, so 72/80 and 88/96 pay for 80 and 96 columns, not 128. Variant 21 takes the
// next size up for 65-96 (96, 128) and 22 keeps K/V unpacked (flash_fwd_wg_sm90a.cu), for comparing.
int padded_head_dim(std::int64_t d) { return d <= 64 ? 64 : d <= 128 ? 128 : d <= 256 ? 256 : 512; }
int padded_head_dim_sm90(std::int64_t d, int variant) {
  if (d > 64 && d <= 80) return variant == 21 ? 96 : 80;
  if (d > 80 && d <= 96) return variant == 21 ? 128 : 96;
  return padded_head_dim(d);
}

// ATTNSEL_CUDA_KERNEL=mma keeps the sm_80 mma.sync kernels on Hopper too (tests check that path on an H100/H200).
bool force_mma_kernels() {
  static const bool force = [] {
    const char* v = std::getenv("ATTNSEL_CUDA_KERNEL");
    return v != nullptr && std::strcmp(v, "mma") == 0;
  }();
  return force;
}

}  // namespace

std::string refusal(const AttentionParams& p, int sm_major, int sm_minor) {
  if (sm_major < 8)
    return "needs compute capability >= 8.0 (mma.sync bf16/fp16), device is " + std::to_string(sm_major) + "." +
           std::to_string(sm_minor);
  if (p.dtype == ScalarType::F32) return "dtype float32 not supported (bf16 and fp16 only)";
  const std::int64_t d = p.head_dim;
  const std::string sizes = " (supported: multiples of 8 from 8 to 256, and 512)";
  if (d < 8) return "head_dim " + std::to_string(d) + " is below 8" + sizes;
  if (d % 8 != 0) return "head_dim " + std::to_string(d) + " is not a multiple of 8" + sizes;
  if (d > 256 && d != 512) return "head_dim " + std::to_string(d) + " is above 256 and not 512" + sizes;
  if (p.head_dim_v != d)
    return "head_dim_v " + std::to_string(p.head_dim_v) + " differs from head_dim " + std::to_string(d) +
           " (q, k and v must share one head size)";
  if (p.mask_kind != MaskKind::None) {
    if (p.mask == nullptr) return "mask data pointer is null";
    if (p.mask_kind == MaskKind::Additive && p.mask_dtype != ScalarType::F32 && p.mask_dtype != p.dtype)
      return "additive mask dtype must be float32 or q's dtype";
  }
  if (d == 512 && smem_optin_bytes(sm_major, sm_minor) < 210 * 1024)
    return "head_dim 512 needs ~202 KB shared memory per block (sm_90/sm_100); device " +
           std::to_string(sm_major) + "." + std::to_string(sm_minor) + " has less";
  if (p.batch < 0 || p.heads_q <= 0 || p.heads_kv <= 0 || p.seq_q < 0) return "invalid sizes";
  if (p.heads_q % p.heads_kv != 0)
    return "heads_q " + std::to_string(p.heads_q) + " is not a multiple of heads_kv " + std::to_string(p.heads_kv);
  if (p.seq_kv <= 0) return "seq_kv is 0 (softmax over no keys)";
  if (p.batch > 65535) return "batch " + std::to_string(p.batch) + " is above 65535 (grid limit)";
  if (p.heads_q > 65535) return "heads_q " + std::to_string(p.heads_q) + " is above 65535 (grid limit)";
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
  if (p.lse != nullptr && reinterpret_cast<std::uintptr_t>(p.lse) % 4 != 0) return "lse is not 4-byte aligned";
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
  FwdArgs a = make_args(p);
  if (variant == 25) {  // the default kernels with O stored from registers, for comparing
    a.o_from_registers = true;
    variant = -1;
  }
  const int mm = mask_mode(p);
  const bool bf16 = p.dtype == ScalarType::BF16;
  const int B = static_cast<int>(p.batch), H = static_cast<int>(p.heads_q);
  auto s = static_cast<cudaStream_t>(stream);
  cudaError_t e = cudaErrorInvalidValue;
#ifdef ATTNSEL_HAVE_SM90A
  // Hopper: the warp-specialised TMA/wgmma kernel by default (variant -1 or >= 10); variants 0.. keep the
  // mma.sync kernels. cudaErrorNotSupported means no tensor map could be made (driver without
  // cuTensorMapEncodeTiled): the mma.sync kernel below serves instead.
  if (p.head_dim != 512 && (variant < 0 || variant >= 10) && device_is_sm90() && !force_mma_kernels()) {
    e = run_wg_sm90(a, padded_head_dim_sm90(p.head_dim, variant), B, H, bf16, p.causal, mm, variant, s);
    if (e != cudaErrorNotSupported) {
      if (e != cudaSuccess)
        throw std::runtime_error(std::string("attnsel native CUDA attention launch failed: ") + cudaGetErrorString(e));
      return;
    }
  }
#endif
  // On Hopper with ATTNSEL_CUDA_KERNEL=mma, D=512 takes the mma.sync kernel too (its variant 1).
  const int v512 = force_mma_kernels() ? 1 : variant;
  switch (padded_head_dim(p.head_dim)) {
    case 64: e = run_hdim64(a, B, H, bf16, p.causal, mm, variant, s); break;
    case 128: e = run_hdim128(a, B, H, bf16, p.causal, mm, variant, s); break;
    case 256: e = run_hdim256(a, B, H, bf16, p.causal, mm, variant, s); break;
    case 512: e = run_hdim512(a, B, H, bf16, p.causal, mm, v512, s); break;
    default: throw std::invalid_argument("attnsel native CUDA attention: unsupported head_dim");
  }
  if (e != cudaSuccess)
    throw std::runtime_error(std::string("attnsel native CUDA attention launch failed: ") + cudaGetErrorString(e));
}

}  // namespace detail

bool faster_than_sdpa(const AttentionParams& p) {
#ifdef ATTNSEL_HAVE_SM90A
  // Unmasked calls on an H200 (bf16 and fp16, vs PyTorch's best SDPA kernel; benchmarks/results/cuda_h200_main.json,
  // eager / CUDA graphs). From 2048 keys: head_dim 128 1.02-1.15x (Flux 1.02x, Wan 1.15x, causal 8k 1.06x), 72-96
  // 1.02-1.14x, 256 1.04-1.05x; at 64 SD3.5's 4429 keys 1.24x (cuDNN slows down off a multiple of 64 keys) while on
  // a multiple of 64 the two are level (SD-UNet 4096: 1.01x / 1.02x), so SDPA keeps those. From 512 to 2048 keys
  // head_dim 128 leads too since O leaves through the copy engine (Wan cross-attention's 512 keys 1.06-1.07x / 1.12-
  // 1.14x, 8x24x1024² 1.03x / 1.06-1.07x), while 64 does not clearly (2x24x1024² 0.98x in graphs); shorter keys and
  // head sizes 97-120 and 136-248 are unmeasured and stay with SDPA.
  if (p.dtype == ScalarType::F32 || !detail::device_is_sm90() || p.seq_kv < 512) return false;
  const std::int64_t d = p.head_dim;
  if (p.seq_kv < 2048) return d == 128;
  return d == 128 || d == 256 || (d > 64 && d <= 96) || (d == 64 && p.seq_kv % 64 != 0);
#else
  (void)p;
  return false;
#endif
}

void attention_forward(const AttentionParams& p, void* stream) { detail::attention_forward_variant(p, stream, -1); }

}  // namespace attnsel::cuda
