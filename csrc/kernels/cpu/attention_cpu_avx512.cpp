// AVX-512 (F/BW/VL/DQ) path. Compile-tested here (the dev machine has no AVX-512).
#include "attention_cpu_avx512_isa.h"
#include "attention_cpu_isa.h"
#include "attention_cpu_kernel.h"

namespace attnsel::cpu::detail {
void forward_avx512(const kernels::AttentionParams& p) { run_forward<Isa>(p); }
}  // namespace attnsel::cpu::detail
