// Host-side tile choices of the Hopper kernels that depend only on the call's sizes and the SM count: plain C++ (no
// CUDA), so the core C++ tests check them on machines without a GPU (tests/cpp/test_tile_plan.cpp).
#pragma once

#include <algorithm>
#include <cstdint>

namespace attnsel::cuda::detail {

// A 192-row work item (three consumers) takes 1.31x as long as a 128-row one (two), in hundredths: measured on the
// H200 at whole waves (below), and the cost both choices here are made with.
constexpr int kTallItemCostPct = 131;

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
  return rounds(192) * kTallItemCostPct < rounds(128) * 100;
}

// D <= 64 without a mask, non-causal: 192-row tiles over each head's first rows and 128-row tiles after them, as two
// launches whose blocks share the SMs (the second starts as the first's last wave leaves SMs free). The makespan
// model counts a 128-row item as 1 and a 192-row one as 1.31 (three_consumers_pay) and gives each block the SM that
// frees first: SD-UNet 2x10x4096 then takes 4.62 instead of 5 (128 rows) or 5.24 (192), SD3.5 medium 1x24x4429
// 5.93 instead of 6.55. Returns the rows in 192-row tiles per head, or 0 where one height is as good (within 3%,
// the second launch's cost) or the launch takes more than 24 rounds (the last one's loss is small then).
inline int mixed_height_rows(std::int64_t seq_q, std::int64_t heads_x_batch, std::int64_t sms) {
  const std::int64_t bh = heads_x_batch;
  if (sms <= 0 || seq_q <= 192 || bh <= 0) return 0;
  constexpr double kTall = kTallItemCostPct / 100.0;
  const auto rounds = [&](std::int64_t items) { return static_cast<double>((items + sms - 1) / sms); };
  const double single = std::min(rounds((seq_q + 127) / 128 * bh), kTall * rounds((seq_q + 191) / 192 * bh));
  if (single > 24) return 0;
  double best = single * 0.97;
  std::int64_t best_rows = 0;
  for (std::int64_t tall = 1; tall * 192 < seq_q; ++tall) {
    const std::int64_t n_tall = tall * bh, n_short = (seq_q - tall * 192 + 127) / 128 * bh;
    const std::int64_t full = n_tall / sms, rest = n_tall % sms;
    // SMs free for short items: sms - rest of them from full * kTall, rest of them from (full + 1) * kTall.
    const double t1 = static_cast<double>(full) * kTall, t2 = static_cast<double>(full + 1) * kTall;
    const std::int64_t n1 = rest != 0 ? sms - rest : sms, n2 = rest;
    std::int64_t done = 0, k1 = 0, k2 = 0;
    double end = rest != 0 ? t2 : t1;
    while (done < n_short) {  // the next short item to finish, on the SM that frees first
      const double e1 = t1 + static_cast<double>(k1 + 1), e2 = n2 != 0 ? t2 + static_cast<double>(k2 + 1) : 1e30;
      if (e1 <= e2) {
        ++k1;
        done += n1;
        end = std::max(end, e1);
      } else {
        ++k2;
        done += n2;
        end = std::max(end, e2);
      }
    }
    if (end < best) {
      best = end;
      best_rows = tall * 192;
    }
  }
  return static_cast<int>(best_rows);
}

}  // namespace attnsel::cuda::detail
