// The Hopper kernels' size-only tile choices (csrc/kernels/cuda/tile_plan.h), checked without a GPU against the
// choices the H200 measurements made (docs/cuda-kernels.md, "D=64: two or three consumers").
#include <algorithm>
#include <functional>
#include <queue>
#include <vector>

#include "harness.h"
#include "kernels/cuda/tile_plan.h"

using attnsel::cuda::detail::mixed_height_rows;
using attnsel::cuda::detail::three_consumers_pay;

namespace {
constexpr std::int64_t kH200 = 132;
}

TEST(three_consumers_where_they_take_fewer_rounds) {
  // Measured faster with three consumers (bf16 TFLOP/s, two vs three): SD3.5 large 418 vs 490 (11 rounds vs 7),
  // SD3.5 medium 410 vs 430, D=40 2x8x16384 284 vs 301, D=40 2x8x4096 253 vs 261 (4 rounds vs 3 x 1.31).
  CHECK(three_consumers_pay(4429, 38, false, kH200));
  CHECK(three_consumers_pay(4429, 24, false, kH200));
  CHECK(three_consumers_pay(16384, 16, false, kH200));
  CHECK(three_consumers_pay(4096, 16, false, kH200));
  // Whole waves for both heights (1x12x4224): 2 rounds of 192 rows vs 3 of 128; 510 vs 444.
  CHECK(three_consumers_pay(4224, 12, false, kH200));
}

TEST(two_consumers_where_three_take_as_long) {
  // SD-UNet 2x10x4096 and D=48 2x10x4096: 4 rounds x 1.31 > 5 (449 vs 420, 338 vs 315 measured).
  CHECK(!three_consumers_pay(4096, 20, false, kH200));
  // One round either way: the shorter item wins (CLIP 77 tokens x 12 heads, 8 heads of 1024 rows).
  CHECK(!three_consumers_pay(77, 12, false, kH200));
  CHECK(!three_consumers_pay(1024, 8, false, kH200));
  // Equal rounds: 768 one-tile items at either height (77 tokens x 64 batch x 12 heads).
  CHECK(!three_consumers_pay(77, 768, false, kH200));
}

TEST(short_key_loops_on_the_persistent_schedule) {
  // Persistent kernel, two vs three consumers as CUDA-graph replays: 2x20x1024 316 vs 344 (3 rounds vs 2 x 1.31),
  // 2x10x1024 223 vs 302 (2 vs 1); T5 1x64x512 283 vs 226, 2x24x1024 374 vs 291, 1x24x1024 265 vs 210 keep two.
  CHECK(three_consumers_pay(1024, 40, false, kH200));
  CHECK(three_consumers_pay(1024, 20, false, kH200));
  CHECK(!three_consumers_pay(512, 64, false, kH200));
  CHECK(!three_consumers_pay(1024, 48, false, kH200));
  CHECK(!three_consumers_pay(1024, 24, false, kH200));
}

TEST(causal_takes_three_from_two_rounds_of_items) {
  // Measured: 1x16x8192 353 vs 415, 1x32x4096 318 vs 358, 2x10x4096 293 vs 325 (440 items of 192 rows).
  CHECK(three_consumers_pay(8192, 16, true, kH200));
  CHECK(three_consumers_pay(4096, 32, true, kH200));
  CHECK(three_consumers_pay(4096, 20, true, kH200));
  // Fewer: the longest item (the last query tile, every key) decides, and 192 rows make it longer.
  CHECK(!three_consumers_pay(2048, 12, true, kH200));  // 11 x 12 = 132 items
  CHECK(three_consumers_pay(2112, 24, true, kH200));   // 11 x 24 = 264: the GPU test's causal shape
}

TEST(the_sm_count_sets_the_rounds) {
  // 1x24x4429 on an H100 PCIe (114 SMs): 840 items of 128 rows = 8 rounds, 576 of 192 = 6 (6 x 1.31 < 8).
  CHECK(three_consumers_pay(4429, 24, false, 114));
  // SD-UNet there: 640 / 114 = 6 rounds, 440 / 114 = 4 (4 x 1.31 < 6).
  CHECK(three_consumers_pay(4096, 20, false, 114));
}

TEST(empty_or_unknown_sizes_keep_two) {
  CHECK(!three_consumers_pay(0, 20, false, kH200));
  CHECK(!three_consumers_pay(4096, 0, false, kH200));
  CHECK(!three_consumers_pay(4096, 20, false, 0));
}

TEST(two_heights_where_neither_fills_the_last_round) {
  // The model's picks (docs/cuda-kernels.md): SD-UNet 2x10x4096 2304 rows of 192-row tiles per head (4.62 rounds vs
  // 5), SD3.5 medium 3072 (5.93 vs 6.55), 1x24x1600 576 (the GPU test's shape).
  CHECK_EQ(mixed_height_rows(4096, 20, kH200), 2304);
  CHECK_EQ(mixed_height_rows(4429, 24, kH200), 3072);
  CHECK_EQ(mixed_height_rows(1600, 24, kH200), 576);
  // One height already fills its rounds: SD3.5 large (7 rounds of 192 rows), 1x12x4224 (2 of 192).
  CHECK_EQ(mixed_height_rows(4429, 38, kH200), 0);
  CHECK_EQ(mixed_height_rows(4224, 12, kH200), 0);
  // Too short to split, too few items, or many rounds (the last one's loss is small).
  CHECK_EQ(mixed_height_rows(192, 100, kH200), 0);
  CHECK_EQ(mixed_height_rows(4096, 0, kH200), 0);
  CHECK_EQ(mixed_height_rows(32768, 40, kH200), 0);
  // Every choice is whole 192-row tiles that leave rows for the second launch.
  for (std::int64_t sq = 193; sq <= 9000; sq += 97)
    for (std::int64_t bh : {1, 7, 20, 38, 64}) {
      const int rows = mixed_height_rows(sq, bh, kH200);
      CHECK(rows % 192 == 0 && rows >= 0 && rows < sq);
    }
}

namespace {
// An event-driven list schedule of the two launches, written apart from the model: the tall items (1.31 each) take
// the SM that frees first, in order; the short ones (1 each) the same, once every tall item has started.
double simulated_end(std::int64_t sq, std::int64_t bh, std::int64_t sms, std::int64_t tall_rows) {
  std::priority_queue<double, std::vector<double>, std::greater<double>> free_at;
  for (std::int64_t i = 0; i < sms; ++i) free_at.push(0.0);
  double last_start = 0, end = 0;
  const std::int64_t n_tall = tall_rows / 192 * bh, n_short = (sq - tall_rows + 127) / 128 * bh;
  for (std::int64_t i = 0; i < n_tall + n_short; ++i) {
    const bool tall = i < n_tall;
    double t = free_at.top();
    free_at.pop();
    if (tall) last_start = t;
    else t = std::max(t, last_start);
    const double done = t + (tall ? 1.31 : 1.0);
    free_at.push(done);
    end = std::max(end, done);
  }
  return end;
}
}  // namespace

TEST(the_split_model_agrees_with_a_simulated_schedule) {
  // Every split the model takes ends as early as it computed (within 1e-9) and is the best split the simulation finds.
  for (std::int64_t sq = 200; sq <= 6000; sq += 173)
    for (std::int64_t bh : {3, 10, 20, 24, 38, 64}) {
      const int rows = mixed_height_rows(sq, bh, kH200);
      if (rows == 0) continue;
      double best = simulated_end(sq, bh, kH200, 0);
      for (std::int64_t a = 1; a * 192 < sq; ++a) best = std::min(best, simulated_end(sq, bh, kH200, a * 192));
      CHECK(simulated_end(sq, bh, kH200, rows) <= best + 1e-9);
    }
}

ATTNSEL_TEST_MAIN()
