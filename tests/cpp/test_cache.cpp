// The selection cache: hits, and invalidation by every input a selection depends on.
#include <atomic>
#include <thread>

#include "test_util.h"

using namespace attnsel;
using attnsel_test::cpu_request;
using attnsel_test::cuda_request;

TEST(repeated_requests_hit_the_cache) {
  attnsel_test::reset_state();
  CHECK_EQ(selection_cache_size(), std::size_t{0});
  CHECK_EQ(selection_cache_hits(), std::uint64_t{0});
  Selection first = select_backend(cpu_request());
  CHECK_EQ(selection_cache_size(), std::size_t{1});
  for (int i = 0; i < 5; ++i) {
    Selection again = select_backend(cpu_request());
    CHECK_EQ(again.backend, first.backend);
    CHECK_EQ(again.reasons, first.reasons);
  }
  CHECK_EQ(selection_cache_hits(), std::uint64_t{5});
  CHECK_EQ(selection_cache_size(), std::size_t{1});
  select_backend(cpu_request(128));  // another head size: another entry
  CHECK_EQ(selection_cache_size(), std::size_t{2});
  clear_selection_cache();
  CHECK_EQ(selection_cache_size(), std::size_t{0});
  CHECK_EQ(selection_cache_hits(), std::uint64_t{0});
}

TEST(availability_changes_invalidate) {
  attnsel_test::reset_state();
  CHECK_EQ(select_backend(cpu_request()).backend, BackendId::NATIVE);
  set_backend_availability(BackendId::NATIVE, DeviceType::CPU, false, "unloaded (test)");
  CHECK_EQ(select_backend(cpu_request()).backend, BackendId::TORCH_SDPA);  // not the stale native
  set_backend_availability(BackendId::NATIVE, DeviceType::CPU, true, "");
  CHECK_EQ(select_backend(cpu_request()).backend, BackendId::NATIVE);

  CHECK_EQ(select_backend(cuda_request()).backend, BackendId::TORCH_SDPA);
  set_backend_availability(BackendId::FA, DeviceType::CUDA, true, "");  // flash-attn appears
  CHECK_EQ(select_backend(cuda_request()).backend, BackendId::FA);
  set_cuda_compute_capability(7, 5);  // device facts are inputs too
  CHECK_EQ(select_backend(cuda_request()).backend, BackendId::TORCH_SDPA);
  set_cuda_compute_capability(9, 0);
  CHECK_EQ(select_backend(cuda_request()).backend, BackendId::FA);
}

TEST(a_cached_refusal_is_not_remembered) {
  attnsel_test::reset_state();
  SelectionRequest r = cuda_request();
  r.selected = BackendId::FA;
  bool threw = false;
  try {
    select_backend(r);
  } catch (const std::invalid_argument&) {
    threw = true;
  }
  CHECK(threw);
  set_backend_availability(BackendId::FA, DeviceType::CUDA, true, "");
  CHECK_EQ(select_backend(r).backend, BackendId::FA);
}

TEST(scope_changes_are_seen_despite_the_cache) {
  attnsel_test::reset_state();
  const SelectionRequest r = cpu_request();
  CHECK_EQ(select_backend(r).source, Source::Auto);
  {
    ComponentScope vae("vae", BackendId::TORCH_SDPA);
    Selection s = select_backend(r);
    CHECK_EQ(s.backend, BackendId::TORCH_SDPA);
    CHECK_EQ(s.component, std::string("vae"));
    {
      ComponentScope te("text_encoder", BackendId::TORCH_SDPA);  // same backend, other component
      CHECK_EQ(select_backend(r).component, std::string("text_encoder"));
    }
    {
      ComponentScope vae_native("vae", BackendId::NATIVE);  // same component, other backend
      CHECK_EQ(select_backend(r).backend, BackendId::NATIVE);
    }
    {
      ComponentScope vae_none("vae", std::nullopt);
      CHECK_EQ(select_backend(r).source, Source::Auto);
    }
    CHECK_EQ(select_backend(r).backend, BackendId::TORCH_SDPA);
    {
      ForcedBackendScope forced(BackendId::NATIVE);
      CHECK_EQ(select_backend(r).source, Source::Forced);
    }
    CHECK_EQ(select_backend(r).source, Source::Component);
  }
  Selection s = select_backend(r);
  CHECK_EQ(s.source, Source::Auto);
  CHECK_EQ(s.component, std::string());
  set_global_backend(BackendId::TORCH_SDPA);
  CHECK_EQ(select_backend(r).source, Source::Global);
  set_global_backend(std::nullopt);
  CHECK_EQ(select_backend(r).source, Source::Auto);
}

TEST(cache_stays_bounded) {
  attnsel_test::reset_state();
  for (int head = 1; head <= 5000; ++head) select_backend(cpu_request(head));
  CHECK(selection_cache_size() <= 4096);
  CHECK(selection_cache_size() > 0);
  clear_selection_cache();
}

// Many threads select concurrently, each in its own scope, while another thread keeps changing availability
// of a backend none of them uses (invalidating the cache). Every answer must follow the asking thread's scope.
TEST(concurrent_selection_with_invalidation) {
  attnsel_test::reset_state();
  constexpr int kThreads = 4;
  constexpr int kIterations = 2000;
  std::atomic<bool> stop{false};
  std::thread churn([&] {
    bool on = false;
    while (!stop.load()) {
      set_backend_availability(BackendId::SAGE_ATTN, DeviceType::CUDA, on = !on, "toggled (test)");
      std::this_thread::yield();
    }
  });
  std::vector<int> wrong(kThreads, 0);
  std::vector<std::thread> threads;
  for (int i = 0; i < kThreads; ++i) {
    threads.emplace_back([&, i] {
      const BackendId want = i % 2 ? BackendId::NATIVE : BackendId::TORCH_SDPA;
      const std::string name = "component_" + std::to_string(i);
      ComponentScope scope(name, want);
      for (int it = 0; it < kIterations; ++it) {
        Selection s = select_backend(cpu_request(64 + (it % 4) * 8));
        if (s.backend != want || s.component != name || s.source != Source::Component) ++wrong[i];
      }
    });
  }
  for (auto& t : threads) t.join();
  stop = true;
  churn.join();
  for (int i = 0; i < kThreads; ++i) CHECK_EQ(wrong[i], 0);
}

ATTNSEL_TEST_MAIN()
