// The backward kernel compiled with AVX2 + FMA (CMake gives *_avx2.cpp these flags); chosen when the forward's
// ISA is avx2 or better.
#include "attention_cpu_backward_kernel.h"

namespace attnsel::cpu::detail {
void backward_avx2(const AttentionBackwardParams& p) { run_backward(p); }
}  // namespace attnsel::cpu::detail
