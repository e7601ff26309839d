// Hopper warp-specialised kernels for head sizes padded to 96 (flash_fwd_wg_sm90a.cuh).
#include "flash_fwd_wg_sm90a.cuh"

namespace attnsel::cuda::detail {

cudaError_t run_wg_sm90_d96(const FwdArgs& a, int batch, int heads, bool bf16, bool causal, int mask_mode,
                            int variant, cudaStream_t s) {
  return run_wg_d<96>(a, batch, heads, bf16, causal, mask_mode, variant, s);
}

}  // namespace attnsel::cuda::detail
