// CPU attention backward: the baseline-flags copy of the kernel and the entry point choosing the ISA copy.
#include "attention_cpu_backward_kernel.h"

#include "attention_cpu.h"

namespace attnsel::cpu {
namespace detail {
void backward_avx2(const AttentionBackwardParams& p);  // attention_cpu_backward_avx2.cpp
}  // namespace detail

void attention_backward(const AttentionBackwardParams& params) {
  // Follows the forward's choice (and ATTNSEL_CPU_ISA): every AVX-512 CPU also runs the AVX2 copy.
  if (active_isa() == "scalar") detail::run_backward(params);
  else detail::backward_avx2(params);
}

}  // namespace attnsel::cpu
