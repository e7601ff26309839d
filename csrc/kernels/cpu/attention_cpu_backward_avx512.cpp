// The backward kernel compiled with AVX-512 (CMake gives *_avx512.cpp these flags), 16-wide vectors; chosen when
// the forward's ISA is avx512 or avx512_bf16.
#define ATTNSEL_BWD_VEC_WIDTH 16
#include "attention_cpu_backward_kernel.h"

namespace attnsel::cpu::detail {
void backward_avx512(const AttentionBackwardParams& p) { run_backward(p); }
}  // namespace attnsel::cpu::detail
