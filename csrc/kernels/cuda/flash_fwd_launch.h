// Internal: per-head-dim launchers (one .cu each, so they compile in parallel) and the tuning hook.
#pragma once

#include <cuda_runtime.h>

#include "../attention_params.h"

namespace attnsel::cuda::detail {

struct FwdArgs;

// variant < 0 = the default tile config for this head dim; others are alternatives for tuning (unmasked only).
// mask_mode: kNoMask / kBoolMask / kAddMask (flash_fwd_sm80.cuh). The sm_80 launchers take the padded size
// (64/128/256); the real one is FwdArgs::head_dim.
cudaError_t run_hdim64(const FwdArgs& a, int batch, int heads, bool bf16, bool causal, int mask_mode, int variant,
                       cudaStream_t s);
cudaError_t run_hdim128(const FwdArgs& a, int batch, int heads, bool bf16, bool causal, int mask_mode, int variant,
                        cudaStream_t s);
cudaError_t run_hdim256(const FwdArgs& a, int batch, int heads, bool bf16, bool causal, int mask_mode, int variant,
                        cudaStream_t s);
cudaError_t run_hdim512(const FwdArgs& a, int batch, int heads, bool bf16, bool causal, int mask_mode, int variant,
                        cudaStream_t s);
#ifdef ATTNSEL_HAVE_SM90A
// Hopper wgmma path for head_dim 512 (flash_fwd_d512_sm90a.cu, compiled for sm_90a only).
cudaError_t run_hdim512_sm90(const FwdArgs& a, int batch, int heads, bool bf16, bool causal, int mask_mode,
                             int variant, cudaStream_t s);
// Hopper path for head sizes up to 256 (flash_fwd_wg*_sm90a.cu): warp-specialised, TMA + wgmma, built for the
// padded size padded_dim (64/80/96/128/256); variants 16.. pick alternative tiles. Returns cudaErrorNotSupported when no
// TMA descriptor can be made.
cudaError_t run_wg_sm90(const FwdArgs& a, int padded_dim, int batch, int heads, bool bf16, bool causal, int mask_mode,
                        int variant, cudaStream_t s);
#endif

// Whether the current device is exactly sm_90 (where the sm_90a kernels run).
bool device_is_sm90();

// attention_forward with an explicit tile variant (the dev harness sweeps these); throws on launch errors.
void attention_forward_variant(const kernels::AttentionParams& p, void* stream, int variant);

}  // namespace attnsel::cuda::detail
