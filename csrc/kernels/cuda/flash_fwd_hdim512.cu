// head_dim 512 launchers (column-split kernel B in flash_fwd_sm80.cuh; needs ~202 KB shared memory).
#include "flash_fwd_launch.h"
#include "flash_fwd_sm80.cuh"

namespace attnsel::cuda::detail {

template <typename T, bool C>
static cudaError_t run_t(const FwdArgs& a, int batch, int heads, int mask_mode, cudaStream_t s) {
  if (mask_mode == kBoolMask) return launch_d512<T, C, kBoolMask>(a, batch, heads, s);
  if (mask_mode == kAddMask) return launch_d512<T, C, kAddMask>(a, batch, heads, s);
  return launch_d512<T, C, kNoMask>(a, batch, heads, s);
}

// variant: -1/0 = best for the device (wgmma on sm_90 when built with sm_90a), 1 = the mma.sync kernel.
cudaError_t run_hdim512(const FwdArgs& a, int batch, int heads, bool bf16, bool causal, int mask_mode, int variant,
                        cudaStream_t s) {
#ifdef ATTNSEL_HAVE_SM90A
  if (variant != 1 && device_is_sm90()) return run_hdim512_sm90(a, batch, heads, bf16, causal, mask_mode, variant, s);
#endif
  if (bf16) return causal ? run_t<__nv_bfloat16, true>(a, batch, heads, mask_mode, s)
                          : run_t<__nv_bfloat16, false>(a, batch, heads, mask_mode, s);
  return causal ? run_t<__half, true>(a, batch, heads, mask_mode, s) : run_t<__half, false>(a, batch, heads, mask_mode, s);
}

}  // namespace attnsel::cuda::detail
