// head_dim 256 launchers (see flash_fwd_sm80.cuh).
#include "flash_fwd_launch.h"
#include "flash_fwd_sm80.cuh"

namespace attnsel::cuda::detail {

template <typename T, bool C>
static cudaError_t run_t(const FwdArgs& a, int batch, int heads, int variant, cudaStream_t s) {
  switch (variant) {
    default:
    case 0: return launch_a<T, 256, 64, 64, 4, C>(a, batch, heads, s);
    case 1: return launch_a<T, 256, 128, 64, 8, C>(a, batch, heads, s);
    case 2: return launch_a<T, 256, 64, 32, 4, C>(a, batch, heads, s);
  }
}

cudaError_t run_hdim256(const FwdArgs& a, int batch, int heads, bool bf16, bool causal, int variant, cudaStream_t s) {
  if (bf16) return causal ? run_t<__nv_bfloat16, true>(a, batch, heads, variant, s) : run_t<__nv_bfloat16, false>(a, batch, heads, variant, s);
  return causal ? run_t<__half, true>(a, batch, heads, variant, s) : run_t<__half, false>(a, batch, heads, variant, s);
}

}  // namespace attnsel::cuda::detail
