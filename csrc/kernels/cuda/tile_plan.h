// Host-side tile choices of the Hopper kernels that depend only on the call's sizes and the SM count: plain C++ (no
// CUDA), so the core C++ tests check them on machines without a GPU (tests/cpp/test_tile_plan.cpp).
#pragma once

#include <cstdint>

namespace attnsel::cuda::detail {

// D <= 64 without a mask: three consumers (192 query rows per CTA) do ~15% more work per SM than two (H200, launches
// of whole waves: 510 vs 444 TFLOP/s bf16, cuDNN 477), but a work item takes ~1.31x as long, and a launch takes as
// many rounds as its items need to fill the SMs. So three unless their rounds x 1.31 exceed two's: SD3.5 1x38x4429
// runs 7 rounds instead of 11 (490 vs 418), SD-UNet 2x10x4096 would run 4 instead of 5 (420 vs 449) and keeps two.
// Causal items are unequal and the block scheduler balances them: with at least two rounds of items three ran
// 10-18% faster (docs/cuda-kernels.md). heads_x_batch: query heads times batch; sms: the GPU's multiprocessors.
inline bool three_consumers_pay(std::int64_t seq_q, std::int64_t heads_x_batch, bool causal, std::int64_t sms) {
  if (seq_q <= 0 || heads_x_batch <= 0 || sms <= 0) return false;
  const auto items = [&](std::int64_t rows) { return (seq_q + rows - 1) / rows * heads_x_batch; };
  if (causal) return items(192) >= 2 * sms;
  const auto rounds = [&](std::int64_t rows) { return (items(rows) + sms - 1) / sms; };
  return rounds(192) * 131 < rounds(128) * 100;
}

}  // namespace attnsel::cuda::detail
