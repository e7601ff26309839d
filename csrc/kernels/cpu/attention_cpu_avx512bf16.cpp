// AVX-512 + BF16 path. For now the same fp32 micro-kernels as the avx512 path (bf16 is converted to fp32
// when tiles are packed), compiled with the bf16 flags; a vdpbf16ps Q·K^T kernel is the natural next step.
#include "attention_cpu_avx512_isa.h"
#include "attention_cpu_isa.h"
#include "attention_cpu_kernel.h"

namespace attnsel::cpu::detail {
void forward_avx512_bf16(const kernels::AttentionParams& p) { run_forward<Isa>(p); }
}  // namespace attnsel::cpu::detail
