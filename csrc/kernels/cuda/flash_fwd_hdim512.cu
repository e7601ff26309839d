// head_dim 512 launchers (column-split kernel B in flash_fwd_sm80.cuh; needs ~202 KB shared memory).
#include "flash_fwd_launch.h"
#include "flash_fwd_sm80.cuh"

namespace attnsel::cuda::detail {

// variant: -1/0 = best for the device (wgmma on sm_90 when built with sm_90a), 1 = the mma.sync kernel.
cudaError_t run_hdim512(const FwdArgs& a, int batch, int heads, bool bf16, bool causal, int variant,
                        cudaStream_t s) {
#ifdef ATTNSEL_HAVE_SM90A
  if (variant != 1 && device_is_sm90()) return run_hdim512_sm90(a, batch, heads, bf16, causal, variant, s);
#endif
  if (bf16) return causal ? launch_d512<__nv_bfloat16, true>(a, batch, heads, s)
                          : launch_d512<__nv_bfloat16, false>(a, batch, heads, s);
  return causal ? launch_d512<__half, true>(a, batch, heads, s) : launch_d512<__half, false>(a, batch, heads, s);
}

}  // namespace attnsel::cuda::detail
