// CPU attention backward: the baseline-flags copy of the kernel and the entry point choosing the ISA copy.
#include "attention_cpu_backward_kernel.h"

#include "attention_cpu.h"

namespace attnsel::cpu {
namespace detail {
void backward_avx2(const AttentionBackwardParams& p);    // attention_cpu_backward_avx2.cpp
void backward_avx512(const AttentionBackwardParams& p);  // attention_cpu_backward_avx512.cpp
}  // namespace detail

void attention_backward(const AttentionBackwardParams& params) {
  // Follows the forward's choice (and ATTNSEL_CPU_ISA).
  const std::string_view isa = active_isa();
  if (isa == "scalar") detail::run_backward(params);
  else if (isa == "avx2") detail::backward_avx2(params);
  else detail::backward_avx512(params);  // avx512, avx512_bf16
}

}  // namespace attnsel::cpu
