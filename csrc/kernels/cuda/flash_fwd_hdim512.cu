// head_dim 512 launchers (column-split kernel B in flash_fwd_sm80.cuh; needs ~202 KB shared memory).
#include "flash_fwd_launch.h"
#include "flash_fwd_sm80.cuh"

namespace attnsel::cuda::detail {

cudaError_t run_hdim512(const FwdArgs& a, int batch, int heads, bool bf16, bool causal, int /*variant*/,
                        cudaStream_t s) {
  if (bf16) return causal ? launch_d512<__nv_bfloat16, true>(a, batch, heads, s)
                          : launch_d512<__nv_bfloat16, false>(a, batch, heads, s);
  return causal ? launch_d512<__half, true>(a, batch, heads, s) : launch_d512<__half, false>(a, batch, heads, s);
}

}  // namespace attnsel::cuda::detail
