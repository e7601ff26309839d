// Fused CPU attention forward (tiled online softmax). Torch-free.
#pragma once

#include <string_view>

#include "../attention_params.h"

namespace attnsel::cpu {

using kernels::AttentionParams;
using kernels::MaskKind;
using kernels::ScalarType;

// Largest head_dim (and head_dim_v) the CPU kernels accept.
inline constexpr std::int64_t kMaxHeadDim = 512;

// Runs the forward pass on the ISA chosen at load time (or forced by ATTNSEL_CPU_ISA).
// Fully masked rows produce zeros. The caller validates shapes; this trusts them.
void attention_forward(const AttentionParams& params);

// The ISA path in use ("scalar", "avx2", "avx512", "avx512_bf16") and whether a path can run here.
std::string_view active_isa();
bool isa_supported(std::string_view isa);
// Forces a path for this process (tests); returns false if the name is unknown or unsupported here.
bool set_isa(std::string_view isa);

}  // namespace attnsel::cpu
