// Plans on a call signature: features refused by name, auto over the static rank and the tuning table, roles in the
// policy, the cache keyed on the whole signature.
#include <stdexcept>

#include "test_util.h"

using namespace attnsel;
using attnsel_test::any_reason_contains;

namespace {

CallSignature call(DeviceType device = DeviceType::CUDA, int head = 128, std::int64_t sq = 1024,
                   std::int64_t sk = 1024) {
  CallSignature c;
  c.batch = 2;
  c.heads_q = c.heads_kv = 8;
  c.seq_q = sq;
  c.seq_kv = sk;
  c.head_dim = head;
  c.dtype = device == DeviceType::CPU ? DType::F32 : DType::BF16;
  c.device = device;
  return c;
}

}  // namespace

TEST(features_are_refused_by_name) {
  attnsel_test::reset_state();
  set_backend_availability(BackendId::FA, DeviceType::CUDA, true, "");
  CallSignature c = call();
  CHECK(refusal_reasons(BackendId::FA, c).empty());
  c.mask = MaskKind::Bool;
  CHECK(any_reason_contains(refusal_reasons(BackendId::FA, c), "fa: cannot take a boolean mask"));
  c.mask = MaskKind::Additive;
  CHECK(any_reason_contains(refusal_reasons(BackendId::FA, c), "fa: cannot take an additive mask"));
  c = call(DeviceType::CUDA, 128, 100, 300);
  c.causal = true;
  CHECK(any_reason_contains(refusal_reasons(BackendId::FA, c), "lengths differing (100 vs 300)"));
  c = call();
  c.needs_lse = true;
  CHECK(any_reason_contains(refusal_reasons(BackendId::FA, c), "fa: cannot take returning the log-sum-exp"));
  c = call();
  c.needs_grad = true;
  CHECK(any_reason_contains(refusal_reasons(BackendId::FA, c), "backward pass"));
  c = call(DeviceType::CUDA, 64);
  c.heads_kv = 2;
  CHECK(any_reason_contains(refusal_reasons(BackendId::SAGE_ATTN, c), "grouped-query"));
}

TEST(a_named_backend_that_refuses_the_call_throws_naming_the_feature) {
  attnsel_test::reset_state();
  CallSignature c = call();
  c.mask = MaskKind::Additive;
  CHECK_EQ(plan_call(c, BackendId::TORCH_SDPA).backend, BackendId::TORCH_SDPA);
  CHECK_THROWS_WITH(plan_call(c, BackendId::NATIVE), std::invalid_argument, "native: cannot take an additive mask");
  ComponentScope scope("transformer", BackendId::NATIVE);  // the same under a component policy: no silent switch
  const std::optional<ComponentContext> ctx = current_component();
  CHECK_THROWS_WITH(select_for_call(c, &*ctx), std::invalid_argument, "component 'transformer'");
  CHECK_THROWS_WITH(select_for_call(c, &*ctx), std::invalid_argument, "additive mask");
}

TEST(auto_takes_the_first_backend_in_rank_that_accepts_the_call) {
  attnsel_test::reset_state();
  CallSignature c = call();
  CHECK_EQ(plan_call(c, std::nullopt).backend, BackendId::TORCH_SDPA);  // fa missing; native ranks behind SDPA
  set_backend_availability(BackendId::FA, DeviceType::CUDA, true, "");
  CHECK_EQ(plan_call(c, std::nullopt).backend, BackendId::FA);
  c.mask = MaskKind::Bool;  // fa and the test's native CUDA refuse masks: SDPA takes it
  Selection s = plan_call(c, std::nullopt);
  CHECK_EQ(s.backend, BackendId::TORCH_SDPA);
  CHECK(any_reason_contains(s.reasons, "fa: cannot take a boolean mask"));
  c = call(DeviceType::CUDA, 512);
  CHECK_EQ(plan_call(c, std::nullopt).backend, BackendId::NATIVE);  // preferred above 256
}

TEST(the_tuning_table_steers_auto_within_a_bucket) {
  attnsel_test::reset_state();
  const CallSignature c = call();
  CallSignature near = call(DeviceType::CUDA, 128, 960, 960);
  CHECK_EQ(tuning_bucket(c), tuning_bucket(near));  // (724, 1024]: one half-octave
  CHECK(tuning_bucket(c) != tuning_bucket(call(DeviceType::CUDA, 128, 1100, 1100)));
  // On CUDA, key lengths off a multiple of 64 have buckets of their own (SDPA's kernels slow down there).
  CHECK(tuning_bucket(c) != tuning_bucket(call(DeviceType::CUDA, 128, 1000, 1000)));
  CHECK_EQ(tuning_bucket(call(DeviceType::CPU, 128, 1000, 1000)), tuning_bucket(call(DeviceType::CPU)));
  CHECK(tuning_bucket(c) != tuning_bucket(call(DeviceType::CUDA, 64)));
  set_tuning_entry(tuning_bucket(c), {{BackendId::TORCH_SDPA, 2.0}, {BackendId::NATIVE, 1.0}});
  Selection s = plan_call(near, std::nullopt);
  CHECK_EQ(s.backend, BackendId::NATIVE);
  CHECK(s.measured);
  CHECK(any_reason_contains(s.reasons, "fastest measured"));
  CHECK_EQ(tuning_table_size(), std::size_t{1});
  clear_tuning_table();
  CHECK_EQ(plan_call(near, std::nullopt).backend, BackendId::TORCH_SDPA);  // the cache saw the table change
}

TEST(measured_times_within_two_percent_are_a_tie_the_static_rank_breaks) {
  attnsel_test::reset_state();
  const CallSignature c = call();
  CHECK_EQ(plan_call(c, std::nullopt).backend, BackendId::TORCH_SDPA);  // the static rank's first here
  set_tuning_entry(tuning_bucket(c), {{BackendId::NATIVE, 1.0}, {BackendId::TORCH_SDPA, 1.015}});
  Selection s = plan_call(c, std::nullopt);
  CHECK_EQ(s.backend, BackendId::TORCH_SDPA);
  CHECK(s.measured);
  CHECK(any_reason_contains(s.reasons, "within 2% of the fastest"));
  set_tuning_entry(tuning_bucket(c), {{BackendId::NATIVE, 1.0}, {BackendId::TORCH_SDPA, 1.03}});
  s = plan_call(c, std::nullopt);
  CHECK_EQ(s.backend, BackendId::NATIVE);
  CHECK(any_reason_contains(s.reasons, "fastest measured"));
}

TEST(roles_outrank_the_component_for_layers_of_that_role) {
  attnsel_test::reset_state();
  ComponentScope scope("transformer", BackendId::NATIVE, {std::nullopt, BackendId::TORCH_SDPA});
  SelectionRequest r = attnsel_test::cpu_request();
  r.role = Role::Cross;
  Selection s = select_backend(r);
  CHECK_EQ(s.backend, BackendId::TORCH_SDPA);
  CHECK_EQ(s.source, Source::Component);
  CHECK(any_reason_contains(s.reasons, "transformer.cross"));
  r.role = Role::Self;
  CHECK_EQ(select_backend(r).backend, BackendId::NATIVE);
  r.role = Role::None;
  CHECK_EQ(select_backend(r).backend, BackendId::NATIVE);
  CHECK(find_role(" Cross ") == Role::Cross);
  CHECK(!find_role("joint"));
}

TEST(plans_are_cached_on_the_whole_signature) {
  attnsel_test::reset_state();
  CallSignature c = call(DeviceType::CPU, 64);
  plan_call(c, std::nullopt);
  plan_call(c, std::nullopt);
  CHECK_EQ(selection_cache_hits(), std::uint64_t{1});
  c.seq_kv = 7;  // any field is part of the key
  plan_call(c, std::nullopt);
  CHECK_EQ(selection_cache_size(), std::size_t{2});
  c.causal = true;
  plan_call(c, std::nullopt);
  CHECK_EQ(selection_cache_size(), std::size_t{3});
}

TEST(the_backend_only_plans_match_the_full_plans_and_their_errors) {
  attnsel_test::reset_state();
  CallSignature c = call();
  CHECK_EQ(plan_call_backend(c, std::nullopt), plan_call(c, std::nullopt).backend);  // computed, then cached
  CHECK_EQ(plan_call_backend(c, std::nullopt), BackendId::TORCH_SDPA);
  CHECK_EQ(plan_call_backend(c, BackendId::NATIVE), BackendId::NATIVE);
  c.mask = MaskKind::Additive;
  CHECK_THROWS_WITH(plan_call_backend(c, BackendId::NATIVE), std::invalid_argument,
                    "native: cannot take an additive mask");
  CHECK_EQ(select_for_call_backend(c, nullptr), BackendId::TORCH_SDPA);
  {
    ComponentScope scope("transformer", BackendId::NATIVE);
    const std::optional<ComponentContext> ctx = current_component();
    CHECK_THROWS_WITH(select_for_call_backend(c, &*ctx), std::invalid_argument, "component 'transformer'");
    c.mask = MaskKind::None;
    CHECK_EQ(select_for_call_backend(c, &*ctx), BackendId::NATIVE);
    CHECK_EQ(select_for_call_backend(c, &*ctx), select_for_call(c, &*ctx).backend);
  }
  const std::uint64_t hits = selection_cache_hits();
  CHECK_EQ(plan_call_backend(c, std::nullopt), BackendId::TORCH_SDPA);
  CHECK_EQ(selection_cache_hits(), hits + 1);  // a cached plan: the backend comes straight from the cache
  set_tuning_entry(tuning_bucket(c), {{BackendId::NATIVE, 1.0}, {BackendId::TORCH_SDPA, 2.0}});
  CHECK_EQ(plan_call_backend(c, std::nullopt), BackendId::NATIVE);  // a table change is seen, not a stale hit
}

ATTNSEL_TEST_MAIN()
