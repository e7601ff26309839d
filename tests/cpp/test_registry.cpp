// Registry: names, normalisation, aliases, capability refusals.
#include <algorithm>
#include <cctype>
#include <set>

#include "test_util.h"

using namespace attnsel;
using attnsel_test::any_reason_contains;
using attnsel_test::cpu_request;
using attnsel_test::cuda_request;

TEST(every_backend_has_a_unique_canonical_name) {
  const std::vector<BackendId> all = all_backends();
  CHECK_EQ(static_cast<int>(all.size()), kNumBackends);
  std::set<std::string> seen;
  for (int i = 0; i < kNumBackends; ++i) {
    CHECK_EQ(static_cast<int>(all[i]), i);  // ids are the op schema's stable numbers
    const std::string name(backend_name(all[i]));
    CHECK(!name.empty());
    CHECK(seen.insert(name).second);
    for (char ch : name) CHECK(!std::isspace(static_cast<unsigned char>(ch)) && !std::isupper(static_cast<unsigned char>(ch)));
    CHECK_EQ(find_backend(name), std::optional<BackendId>(all[i]));  // round trip
  }
  CHECK_EQ(backend_name(BackendId::FA), std::string_view("fa"));
  CHECK_EQ(backend_name(BackendId::TORCH_SDPA), std::string_view("torch_sdpa"));
  CHECK_EQ(backend_name(static_cast<BackendId>(200)), std::string_view("<invalid>"));
}

TEST(lookup_ignores_case_and_whitespace) {
  CHECK_EQ(find_backend("FA"), std::optional<BackendId>(BackendId::FA));
  CHECK_EQ(find_backend("Torch_SDPA"), std::optional<BackendId>(BackendId::TORCH_SDPA));
  CHECK_EQ(find_backend("  native  "), std::optional<BackendId>(BackendId::NATIVE));
  CHECK_EQ(find_backend("\tSAGE_attn\n"), std::optional<BackendId>(BackendId::SAGE_ATTN));
  CHECK_EQ(find_backend("torch _ sdpa"), std::optional<BackendId>(BackendId::TORCH_SDPA));  // inner spaces too
  CHECK_EQ(find_backend("Sdpa_Math"), std::optional<BackendId>(BackendId::SDPA_MATH));
}

TEST(aliases_fa3_fa4_mean_fa_and_fa2_is_its_own_backend) {
  for (const char* name : {"fa3", "FA3", " fa4 ", "Fa 4"}) CHECK_EQ(find_backend(name), std::optional<BackendId>(BackendId::FA));
  CHECK_EQ(find_backend("fa2"), std::optional<BackendId>(BackendId::FA2));
  CHECK(BackendId::FA2 != BackendId::FA);
  const auto aliases = backend_aliases();
  CHECK_EQ(aliases.size(), std::size_t{2});
  for (const auto& a : aliases) {
    CHECK_EQ(a.target, BackendId::FA);
    CHECK(a.alias == "fa3" || a.alias == "fa4");
    CHECK(backend_name(a.target) != a.alias);  // an alias is never reported as a canonical name
  }
}

TEST(unknown_names_are_not_found) {
  for (const char* name : {"", "   ", "fa5", "flash", "torch_sdpa2", "nat ive x", "sdpa"})
    CHECK_EQ(find_backend(name), std::optional<BackendId>());
}

TEST(enum_names) {
  CHECK_EQ(source_name(Source::Explicit), std::string_view("explicit"));
  CHECK_EQ(source_name(Source::Forced), std::string_view("forced"));
  CHECK_EQ(source_name(Source::Component), std::string_view("component"));
  CHECK_EQ(source_name(Source::Global), std::string_view("global"));
  CHECK_EQ(source_name(Source::Auto), std::string_view("auto"));
  CHECK_EQ(dtype_name(DType::BF16), std::string_view("bfloat16"));
  CHECK_EQ(device_name(DeviceType::CUDA), std::string_view("cuda"));
}

TEST(refusal_reasons_name_every_problem) {
  attnsel_test::reset_state();
  CHECK(refusal_reasons(BackendId::NATIVE, cpu_request()).empty());
  CHECK(refusal_reasons(BackendId::TORCH_SDPA, cpu_request()).empty());

  // Device, dtype and head size problems are all listed, not just the first.
  auto r = refusal_reasons(BackendId::FA, cpu_request(1000));
  CHECK(any_reason_contains(r, "runs only on cuda"));
  CHECK(any_reason_contains(r, "dtype float32"));
  CHECK(any_reason_contains(r, "head_size 1000"));

  // A missing library says why (the reason the runtime layer reported).
  r = refusal_reasons(BackendId::FA, cuda_request());
  CHECK_EQ(r.size(), std::size_t{1});
  CHECK(any_reason_contains(r, "flash_attn_interface is not installed"));

  CHECK(any_reason_contains(refusal_reasons(BackendId::NO_ATTENTION, cpu_request()), "no_attention"));
  CHECK(any_reason_contains(refusal_reasons(BackendId::VMOBA_ATTN, cuda_request()), "no kernel or bridge"));
}

TEST(availability_is_per_device) {
  attnsel_test::reset_state();
  set_backend_availability(BackendId::NATIVE, DeviceType::CUDA, false, "no CUDA GPU is visible");
  CHECK(refusal_reasons(BackendId::NATIVE, cpu_request()).empty());
  CHECK(any_reason_contains(refusal_reasons(BackendId::NATIVE, cuda_request()), "no CUDA GPU is visible"));
}

TEST(compute_capability_limits) {
  attnsel_test::reset_state();
  set_backend_availability(BackendId::FA, DeviceType::CUDA, true, "");
  CHECK(refusal_reasons(BackendId::FA, cuda_request()).empty());
  set_cuda_compute_capability(7, 5);
  CHECK(any_reason_contains(refusal_reasons(BackendId::FA, cuda_request()), "needs compute capability 8.0+"));
  set_cuda_compute_capability(9, 0);
}

ATTNSEL_TEST_MAIN()
