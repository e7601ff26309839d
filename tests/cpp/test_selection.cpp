// Selection: explicit > forced > component > global > auto, refusals with reasons, explicit contexts.
#include <stdexcept>
#include <thread>

#include "test_util.h"

using namespace attnsel;
using attnsel_test::any_reason_contains;
using attnsel_test::cpu_request;
using attnsel_test::cuda_request;

TEST(auto_prefers_native_on_cpu) {
  attnsel_test::reset_state();
  Selection s = select_backend(cpu_request());
  CHECK_EQ(s.backend, BackendId::NATIVE);
  CHECK_EQ(s.source, Source::Auto);
  CHECK_EQ(s.component, std::string());
  CHECK(any_reason_contains(s.reasons, "automatic choice"));
}

TEST(auto_falls_back_in_preference_order_and_says_why) {
  attnsel_test::reset_state();
  set_backend_availability(BackendId::NATIVE, DeviceType::CPU, false, "native kernel disabled (test)");
  Selection s = select_backend(cpu_request());
  CHECK_EQ(s.backend, BackendId::TORCH_SDPA);
  CHECK_EQ(s.source, Source::Auto);
  CHECK(any_reason_contains(s.reasons, "native kernel disabled (test)"));  // why native was passed over

  // CUDA: fa missing -> torch_sdpa; head sizes above 256 go to our kernel first.
  s = select_backend(cuda_request(128));
  CHECK_EQ(s.backend, BackendId::TORCH_SDPA);
  CHECK(any_reason_contains(s.reasons, "flash_attn_interface is not installed"));
  set_backend_availability(BackendId::FA, DeviceType::CUDA, true, "");
  CHECK_EQ(select_backend(cuda_request(128)).backend, BackendId::FA);
  CHECK_EQ(select_backend(cuda_request(512)).backend, BackendId::NATIVE);
}

TEST(native_preference_puts_native_ahead_of_sdpa_but_behind_fa) {
  attnsel_test::reset_state();
  using attnsel_test::edit_descriptor;
  edit_descriptor(BackendId::NATIVE, DeviceType::CUDA,
                  [](BackendDescriptor& d) { d.prefers = [](const CallSignature& r) { return r.head_dim == 128; }; });
  CHECK_EQ(select_backend(cuda_request(128)).backend, BackendId::NATIVE);
  CHECK_EQ(select_backend(cuda_request(64)).backend, BackendId::TORCH_SDPA);  // not preferred there
  edit_descriptor(BackendId::NATIVE, DeviceType::CUDA, [](BackendDescriptor& d) {
    d.check = [](const CallSignature&) { return std::string("kernel not built (test)"); };
  });
  Selection s = select_backend(cuda_request(128));  // preferred but cannot run: SDPA, and the reason is kept
  CHECK_EQ(s.backend, BackendId::TORCH_SDPA);
  CHECK(any_reason_contains(s.reasons, "kernel not built (test)"));
  edit_descriptor(BackendId::NATIVE, DeviceType::CUDA, [](BackendDescriptor& d) { d.check = nullptr; });
  set_backend_availability(BackendId::FA, DeviceType::CUDA, true, "");
  CHECK_EQ(select_backend(cuda_request(128)).backend, BackendId::FA);
  edit_descriptor(BackendId::NATIVE, DeviceType::CUDA, [](BackendDescriptor& d) { d.prefers = nullptr; });
  set_backend_availability(BackendId::FA, DeviceType::CUDA, false, "flash_attn_interface is not installed");
  CHECK_EQ(select_backend(cuda_request(128)).backend, BackendId::TORCH_SDPA);
}

TEST(priority_chain_explicit_forced_component_global_auto) {
  attnsel_test::reset_state();
  SelectionRequest r = cpu_request();
  set_global_backend(BackendId::TORCH_SDPA);
  ComponentScope scope("vae", BackendId::NATIVE);
  {
    ForcedBackendScope forced(BackendId::TORCH_SDPA);
    r.selected = BackendId::NATIVE;
    Selection s = select_backend(r);  // explicit beats everything
    CHECK_EQ(s.backend, BackendId::NATIVE);
    CHECK_EQ(s.source, Source::Explicit);
    CHECK(any_reason_contains(s.reasons, "explicitly"));

    r.selected.reset();
    s = select_backend(r);  // forced beats the component
    CHECK_EQ(s.backend, BackendId::TORCH_SDPA);
    CHECK_EQ(s.source, Source::Forced);
  }
  Selection s = select_backend(r);  // component beats global
  CHECK_EQ(s.backend, BackendId::NATIVE);
  CHECK_EQ(s.source, Source::Component);
  CHECK_EQ(s.component, std::string("vae"));
  CHECK(any_reason_contains(s.reasons, "component 'vae'"));
  {
    ComponentScope no_override("transformer", std::nullopt);
    s = select_backend(r);  // a component without override falls through to global
    CHECK_EQ(s.backend, BackendId::TORCH_SDPA);
    CHECK_EQ(s.source, Source::Global);
    CHECK_EQ(s.component, std::string("transformer"));
    set_global_backend(std::nullopt);
    s = select_backend(r);  // ... and to auto
    CHECK_EQ(s.backend, BackendId::NATIVE);
    CHECK_EQ(s.source, Source::Auto);
    CHECK_EQ(s.component, std::string("transformer"));
  }
}

TEST(refused_explicit_choice_throws_with_reasons) {
  attnsel_test::reset_state();
  SelectionRequest r = cpu_request();
  r.selected = BackendId::SDPA_MATH;  // CUDA-only
  CHECK_THROWS_WITH(select_backend(r), std::invalid_argument, "sdpa_math");
  CHECK_THROWS_WITH(select_backend(r), std::invalid_argument, "chosen explicitly");
  CHECK_THROWS_WITH(select_backend(r), std::invalid_argument, "runs only on cuda");
  SelectionRequest c = cuda_request();
  c.selected = BackendId::FA;  // its library is missing: the reported reason comes back
  CHECK_THROWS_WITH(select_backend(c), std::invalid_argument, "flash_attn_interface is not installed");
  c.head_size = 1024;  // every reason, not only the first
  CHECK_THROWS_WITH(select_backend(c), std::invalid_argument, "head_size 1024");
}

TEST(refusals_never_fall_back_silently) {
  attnsel_test::reset_state();
  {
    // A forced backend that cannot run is an error even though the component's choice could run.
    ComponentScope scope("vae", BackendId::NATIVE);
    ForcedBackendScope forced(BackendId::FA);
    CHECK_THROWS_WITH(select_backend(cuda_request()), std::invalid_argument, "forced");
    CHECK_THROWS_WITH(select_backend(cuda_request()), std::invalid_argument, "flash_attn_interface is not installed");
  }
  {
    ComponentScope scope("text_encoder", BackendId::SAGE_ATTN);
    CHECK_THROWS_WITH(select_backend(cuda_request(128)), std::invalid_argument, "component 'text_encoder'");
    CHECK_THROWS_WITH(select_backend(cuda_request(32)), std::invalid_argument, "head_size 32");
  }
  set_global_backend(BackendId::NO_ATTENTION);
  CHECK_THROWS_WITH(select_backend(cpu_request()), std::invalid_argument, "--attention-backend");
  set_global_backend(std::nullopt);
}

TEST(supported_set_is_respected) {
  attnsel_test::reset_state();
  SelectionRequest r = cpu_request();
  r.supported = std::vector<BackendId>{BackendId::TORCH_SDPA};
  Selection s = select_backend(r);  // auto skips native: not in the layer's set
  CHECK_EQ(s.backend, BackendId::TORCH_SDPA);
  CHECK(any_reason_contains(s.reasons, "not in this layer's supported set [torch_sdpa]"));
  ComponentScope scope("vae", BackendId::NATIVE);
  CHECK_THROWS_WITH(select_backend(r), std::invalid_argument, "not in this layer's supported set");
}

TEST(invalid_requests_throw) {
  attnsel_test::reset_state();
  CHECK_THROWS_WITH(select_backend(cpu_request(0)), std::invalid_argument, "head_size must be positive");
  CHECK_THROWS_WITH(select_backend(cpu_request(-8)), std::invalid_argument, "head_size must be positive");
  // Nothing can run: every refusal is listed.
  set_backend_availability(BackendId::NATIVE, DeviceType::CPU, false, "native off (test)");
  set_backend_availability(BackendId::TORCH_SDPA, DeviceType::CPU, false, "sdpa off (test)");
  CHECK_THROWS_WITH(select_backend(cpu_request()), std::invalid_argument, "no backend can run");
  CHECK_THROWS_WITH(select_backend(cpu_request()), std::invalid_argument, "native off (test)");
  CHECK_THROWS_WITH(select_backend(cpu_request()), std::invalid_argument, "sdpa off (test)");
}

TEST(select_in_uses_the_given_context_not_the_threads) {
  attnsel_test::reset_state();
  ComponentScope scope("vae", BackendId::TORCH_SDPA);
  ComponentContext other{BackendId::NATIVE, "transformer", true};
  Selection s = select_backend_in(cpu_request(), &other);
  CHECK_EQ(s.backend, BackendId::NATIVE);
  CHECK_EQ(s.component, std::string("transformer"));
  s = select_backend_in(cpu_request(), nullptr);
  CHECK_EQ(s.source, Source::Auto);
  CHECK_EQ(s.component, std::string());
  CHECK_EQ(select_backend(cpu_request()).backend, BackendId::TORCH_SDPA);
}

TEST(capability_check_hook_refuses_with_its_reason) {
  attnsel_test::reset_state();
  attnsel_test::edit_descriptor(BackendId::NATIVE, DeviceType::CUDA, [](BackendDescriptor& d) {
    d.check = [](const CallSignature& r) -> std::string {
      return r.dtype == DType::F32 ? "the CUDA kernel needs f16/bf16" : "";
    };
  });
  CHECK_EQ(select_backend(cuda_request(512, DType::BF16)).backend, BackendId::NATIVE);
  SelectionRequest r = cuda_request(512, DType::F32);
  Selection s = select_backend(r);  // auto passes over native for f32
  CHECK_EQ(s.backend, BackendId::TORCH_SDPA);
  CHECK(any_reason_contains(s.reasons, "the CUDA kernel needs f16/bf16"));
  attnsel_test::edit_descriptor(BackendId::NATIVE, DeviceType::CUDA, [](BackendDescriptor& d) { d.check = nullptr; });
  CHECK_EQ(select_backend(r).backend, BackendId::NATIVE);
}

TEST(selection_in_threads_follows_each_threads_scope) {
  attnsel_test::reset_state();
  ComponentScope main_scope("vae", BackendId::TORCH_SDPA);
  Selection in_thread, in_scoped_thread;
  std::thread a([&] { in_thread = select_backend(cpu_request()); });
  std::thread b([&] {
    ComponentScope scope("transformer", BackendId::NATIVE);
    in_scoped_thread = select_backend(cpu_request());
  });
  a.join();
  b.join();
  CHECK_EQ(in_thread.source, Source::Auto);  // a new thread has no component
  CHECK_EQ(in_thread.component, std::string());
  CHECK_EQ(in_scoped_thread.source, Source::Component);
  CHECK_EQ(in_scoped_thread.component, std::string("transformer"));
  Selection here = select_backend(cpu_request());
  CHECK_EQ(here.backend, BackendId::TORCH_SDPA);
  CHECK_EQ(here.component, std::string("vae"));
}

ATTNSEL_TEST_MAIN()
