// Internal: the per-ISA entry points behind attnsel::cpu::attention_forward.
// Each is defined in its own translation unit, compiled with that ISA's flags.
#pragma once

#include "../attention_params.h"

namespace attnsel::cpu::detail {

void forward_scalar(const kernels::AttentionParams& p);
void forward_avx2(const kernels::AttentionParams& p);
void forward_avx512(const kernels::AttentionParams& p);
void forward_avx512_bf16(const kernels::AttentionParams& p);

}  // namespace attnsel::cpu::detail
