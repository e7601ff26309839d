// head_dim 256 launchers (see flash_fwd_sm80.cuh): head sizes 136..256 run here, zero-padded to 256.
#include "flash_fwd_launch.h"
#include "flash_fwd_sm80.cuh"

namespace attnsel::cuda::detail {

template <typename T, bool C>
static cudaError_t run_t(const FwdArgs& a, int batch, int heads, int mask_mode, int variant, cudaStream_t s) {
  if (mask_mode == kBoolMask) return launch_a<T, 256, 64, 64, 4, C, kBoolMask>(a, batch, heads, s);
  if (mask_mode == kAddMask) return launch_a<T, 256, 64, 64, 4, C, kAddMask>(a, batch, heads, s);
  switch (variant) {
    default:
    case 0: return launch_a<T, 256, 64, 64, 4, C>(a, batch, heads, s);
    case 1: return launch_a<T, 256, 128, 64, 8, C>(a, batch, heads, s);
    case 2: return launch_a<T, 256, 64, 32, 4, C>(a, batch, heads, s);
  }
}

cudaError_t run_hdim256(const FwdArgs& a, int batch, int heads, bool bf16, bool causal, int mask_mode, int variant,
                        cudaStream_t s) {
  if (bf16) return causal ? run_t<__nv_bfloat16, true>(a, batch, heads, mask_mode, variant, s)
                          : run_t<__nv_bfloat16, false>(a, batch, heads, mask_mode, variant, s);
  return causal ? run_t<__half, true>(a, batch, heads, mask_mode, variant, s)
                : run_t<__half, false>(a, batch, heads, mask_mode, variant, s);
}

}  // namespace attnsel::cuda::detail
