// Component scopes (per thread) and the forced backend (process-wide): nesting, exceptions, threads.
#include <atomic>
#include <condition_variable>
#include <mutex>
#include <stdexcept>
#include <thread>

#include "test_util.h"

using namespace attnsel;

namespace {

std::string component_or_none() {
  auto c = current_component();
  return c ? c->component : std::string("<none>");
}

// All threads wait here until every one has arrived, so their scopes overlap in time.
class Barrier {
 public:
  explicit Barrier(int n) : remaining_(n) {}
  void arrive_and_wait() {
    std::unique_lock<std::mutex> lock(mutex_);
    if (--remaining_ == 0) {
      cv_.notify_all();
    } else {
      cv_.wait(lock, [this] { return remaining_ == 0; });
    }
  }

 private:
  std::mutex mutex_;
  std::condition_variable cv_;
  int remaining_;
};

}  // namespace

TEST(no_component_outside_scopes) {
  CHECK(!current_component().has_value());
}

TEST(scope_sets_and_restores) {
  {
    ComponentScope scope("vae", BackendId::NATIVE);
    auto c = current_component();
    CHECK(c.has_value());
    CHECK_EQ(c->component, std::string("vae"));
    CHECK_EQ(c->backend, std::optional<BackendId>(BackendId::NATIVE));
    CHECK(!c->set_by_python);  // a C++ scope, not a Python mirror
  }
  CHECK(!current_component().has_value());
  {
    ComponentScope scope("transformer", std::nullopt);  // a component without an override
    CHECK_EQ(component_or_none(), std::string("transformer"));
    CHECK(!current_component()->backend.has_value());
  }
  CHECK(!current_component().has_value());
}

TEST(scopes_nest) {
  ComponentScope outer("text_encoder", BackendId::TORCH_SDPA);
  {
    ComponentScope inner("vae", BackendId::NATIVE);
    CHECK_EQ(component_or_none(), std::string("vae"));
    {
      ComponentScope innermost("transformer", std::nullopt);
      CHECK_EQ(component_or_none(), std::string("transformer"));
    }
    CHECK_EQ(component_or_none(), std::string("vae"));
    CHECK_EQ(current_component()->backend, std::optional<BackendId>(BackendId::NATIVE));
  }
  CHECK_EQ(component_or_none(), std::string("text_encoder"));
  CHECK_EQ(current_component()->backend, std::optional<BackendId>(BackendId::TORCH_SDPA));
}

TEST(exceptions_restore_the_previous_scope) {
  ComponentScope outer("text_encoder", BackendId::TORCH_SDPA);
  try {
    ComponentScope inner("vae", BackendId::NATIVE);
    ComponentScope inner2("vae_decoder", std::nullopt);
    throw std::runtime_error("layer construction failed");
  } catch (const std::runtime_error&) {
  }
  CHECK_EQ(component_or_none(), std::string("text_encoder"));
  CHECK_EQ(current_component()->backend, std::optional<BackendId>(BackendId::TORCH_SDPA));
}

TEST(new_threads_start_empty) {
  ComponentScope scope("vae", BackendId::NATIVE);
  std::string seen_in_thread;
  std::thread t([&] { seen_in_thread = component_or_none(); });
  t.join();
  CHECK_EQ(seen_in_thread, std::string("<none>"));
  CHECK_EQ(component_or_none(), std::string("vae"));
}

TEST(each_thread_sees_only_its_own_component) {
  constexpr int kThreads = 6;
  constexpr int kRounds = 200;
  const char* names[kThreads] = {"text_encoder", "text_encoder_2", "transformer", "vae", "image_encoder", "unet"};
  Barrier barrier(kThreads + 1);
  std::vector<std::string> errors(kThreads);
  std::vector<std::thread> threads;
  for (int i = 0; i < kThreads; ++i) {
    threads.emplace_back([&, i] {
      std::string& err = errors[i];
      if (current_component()) err = "started with a component";
      {
        ComponentScope scope(names[i], i % 2 ? BackendId::NATIVE : BackendId::TORCH_SDPA);
        barrier.arrive_and_wait();  // every thread (and main) is now inside its own scope
        for (int round = 0; round < kRounds && err.empty(); ++round) {
          if (component_or_none() != names[i]) err = "saw " + component_or_none();
          ComponentScope nested(std::string(names[i]) + ".inner", std::nullopt);
          if (component_or_none() != std::string(names[i]) + ".inner") err = "nested saw " + component_or_none();
        }
        if (err.empty() && component_or_none() != names[i]) err = "after nesting saw " + component_or_none();
      }
      if (err.empty() && current_component()) err = "scope leaked past its end";
    });
  }
  ComponentScope main_scope("main", std::nullopt);
  barrier.arrive_and_wait();
  for (auto& t : threads) t.join();
  for (int i = 0; i < kThreads; ++i) CHECK_EQ(errors[i], std::string());
  CHECK_EQ(component_or_none(), std::string("main"));
}

TEST(forced_backend_nests_and_restores) {
  CHECK(!forced_backend().has_value());
  {
    ForcedBackendScope forced(BackendId::TORCH_SDPA);
    CHECK_EQ(forced_backend(), std::optional<BackendId>(BackendId::TORCH_SDPA));
    {
      ForcedBackendScope lifted(std::nullopt);  // nothing = forcing lifted inside
      CHECK(!forced_backend().has_value());
      {
        ForcedBackendScope inner(BackendId::NATIVE);
        CHECK_EQ(forced_backend(), std::optional<BackendId>(BackendId::NATIVE));
      }
      CHECK(!forced_backend().has_value());
    }
    CHECK_EQ(forced_backend(), std::optional<BackendId>(BackendId::TORCH_SDPA));
  }
  CHECK(!forced_backend().has_value());
}

TEST(forced_backend_survives_exceptions_and_is_process_wide) {
  {
    ForcedBackendScope forced(BackendId::TORCH_SDPA);
    try {
      ForcedBackendScope inner(BackendId::NATIVE);
      throw std::runtime_error("boom");
    } catch (const std::runtime_error&) {
    }
    CHECK_EQ(forced_backend(), std::optional<BackendId>(BackendId::TORCH_SDPA));
    std::optional<BackendId> seen;
    std::thread t([&] { seen = forced_backend(); });  // unlike components, forcing is not per thread
    t.join();
    CHECK_EQ(seen, std::optional<BackendId>(BackendId::TORCH_SDPA));
  }
  CHECK(!forced_backend().has_value());
}

TEST(global_backend_set_and_clear) {
  set_global_backend(BackendId::TORCH_SDPA);
  CHECK_EQ(global_backend(), std::optional<BackendId>(BackendId::TORCH_SDPA));
  std::optional<BackendId> seen;
  std::thread t([&] { seen = global_backend(); });
  t.join();
  CHECK_EQ(seen, std::optional<BackendId>(BackendId::TORCH_SDPA));
  set_global_backend(std::nullopt);
  CHECK(!global_backend().has_value());
}

ATTNSEL_TEST_MAIN()
