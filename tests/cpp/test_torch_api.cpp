// <attnsel/torch.h>: attnsel::attention against a naive computation and against the registered op
// torch.ops.attnsel.attention (the same selection path and kernel table).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>

#include <attnsel/torch.h>

#include <cmath>
#include <limits>

#include "test_util.h"

using namespace attnsel;

namespace {

at::Tensor naive(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool causal, double scale) {
  at::Tensor scores = at::matmul(q, k.transpose(-2, -1)) * scale;
  if (causal) {
    // Top-left aligned, like SDPA's is_causal: query i sees keys 0..i.
    at::Tensor keep = at::ones({q.size(2), k.size(2)}, q.options().dtype(at::kBool)).tril();
    scores = scores.masked_fill(keep.logical_not(), -std::numeric_limits<float>::infinity());
  }
  return at::matmul(at::softmax(scores, -1), v);
}

at::Tensor op(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool causal, std::int64_t backend) {
  static auto handle = c10::Dispatcher::singleton()
                           .findSchemaOrThrow("attnsel::attention", "")
                           .typed<std::tuple<at::Tensor, at::Tensor>(
                              const at::Tensor&, const at::Tensor&, const at::Tensor&,
                              const std::optional<at::Tensor>&, bool, std::optional<double>, std::int64_t, bool)>();
  return std::get<0>(handle.call(q, k, v, std::nullopt, causal, std::nullopt, backend, false));
}

double max_diff(const at::Tensor& a, const at::Tensor& b) { return (a - b).abs().max().item<double>(); }

}  // namespace

TEST(matches_naive_attention) {
  at::manual_seed(0);
  at::Tensor q = at::randn({2, 4, 33, 64}), k = at::randn({2, 4, 47, 64}), v = at::randn({2, 4, 47, 64});
  const double scale = 1.0 / std::sqrt(64.0);
  CHECK(max_diff(attnsel::attention(q, k, v), naive(q, k, v, false, scale)) < 1e-4);
  AttentionOptions causal;
  causal.is_causal = true;
  CHECK(max_diff(attnsel::attention(q, k, v, causal), naive(q, k, v, true, scale)) < 1e-4);
  AttentionOptions scaled;
  scaled.scale = 0.5;
  scaled.backend = BackendId::TORCH_SDPA;
  CHECK(max_diff(attnsel::attention(q, k, v, scaled), naive(q, k, v, false, 0.5)) < 1e-4);
}

TEST(bool_mask) {
  at::manual_seed(1);
  at::Tensor q = at::randn({1, 2, 8, 32}), k = at::randn({1, 2, 8, 32}), v = at::randn({1, 2, 8, 32});
  AttentionOptions opts;
  opts.attn_mask = at::ones({8, 8}, at::kBool).tril();
  CHECK(max_diff(attnsel::attention(q, k, v, opts), naive(q, k, v, true, 1.0 / std::sqrt(32.0))) < 1e-4);
}

TEST(same_answer_as_the_registered_op) {
  at::manual_seed(2);
  at::Tensor q = at::randn({1, 2, 16, 64}), k = at::randn({1, 2, 16, 64}), v = at::randn({1, 2, 16, 64});
  for (BackendId b : {BackendId::NATIVE, BackendId::TORCH_SDPA}) {
    AttentionOptions opts;
    opts.backend = b;
    CHECK(at::equal(attnsel::attention(q, k, v, opts), op(q, k, v, false, static_cast<std::int64_t>(b))));
  }
  ComponentScope scope("vae", BackendId::TORCH_SDPA);  // both follow this thread's scope
  CHECK(at::equal(attnsel::attention(q, k, v), op(q, k, v, false, -1)));
}

TEST(refusal_is_a_value_error_with_reasons) {
  at::Tensor q = at::randn({1, 1, 4, 16});
  AttentionOptions opts;
  opts.backend = BackendId::SDPA_MATH;  // CUDA-only (registered by the torch glue)
  CHECK_THROWS_WITH(attnsel::attention(q, q, q, opts), c10::ValueError, "runs only on cuda");
  ComponentScope scope("vae", BackendId::NO_ATTENTION);
  CHECK_THROWS_WITH(attnsel::attention(q, q, q), c10::ValueError, "component 'vae'");
  CHECK_THROWS_WITH(attnsel::attention(q, q, at::randn({1, 1, 5, 16})), c10::Error, "must share heads and sequence length");
}

ATTNSEL_TEST_MAIN()
