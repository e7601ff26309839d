// Fused CUDA attention forward (bf16/fp16). Torch-free: the glue passes raw pointers and the stream.
#pragma once

#include <string>

#include "../attention_params.h"

namespace attnsel::cuda {

using kernels::AttentionParams;

// Why this kernel cannot run `params` on a GPU of compute capability sm_major.sm_minor (empty = it can).
std::string refusal(const AttentionParams& params, int sm_major, int sm_minor);

// Whether this kernel was measured faster than PyTorch SDPA's best for `params` on the current GPU
// (feeds the automatic choice without a tuning entry: head size, key length, dtype and the GPU).
bool faster_than_sdpa(const AttentionParams& params);

// Launches on `stream` (a cudaStream_t); the caller has set the device.
void attention_forward(const AttentionParams& params, void* stream);

}  // namespace attnsel::cuda
