// Shared set-up for the core tests: printable enums and a known process state.
#pragma once

#include <ostream>
#include <string>
#include <vector>

#include "attnsel/attnsel.h"
#include "harness.h"

namespace attnsel {
// For CHECK_EQ messages (found by ADL).
inline std::ostream& operator<<(std::ostream& os, BackendId id) { return os << backend_name(id); }
inline std::ostream& operator<<(std::ostream& os, Source s) { return os << source_name(s); }
inline std::ostream& operator<<(std::ostream& os, const std::optional<BackendId>& id) {
  return id ? os << backend_name(*id) : os << "<none>";
}
}  // namespace attnsel

namespace attnsel_test {

// No torch glue is loaded in these tests, so nothing reports availability: the tests do it, like a runtime layer.
// CPU: native and torch_sdpa run; CUDA: a compute capability 9.0 GPU with torch_sdpa and native, no flash-attn.
inline void reset_state() {
  using namespace attnsel;
  set_global_backend(std::nullopt);
  for (BackendId id : all_backends()) {
    set_backend_availability(id, DeviceType::CPU, false, "not installed (test)");
    set_backend_availability(id, DeviceType::CUDA, false, "not installed (test)");
    set_capability_check(id, DeviceType::CPU, nullptr);
    set_capability_check(id, DeviceType::CUDA, nullptr);
  }
  set_native_preference(DeviceType::CPU, nullptr);
  set_native_preference(DeviceType::CUDA, nullptr);
  set_backend_availability(BackendId::NATIVE, DeviceType::CPU, true, "");
  set_backend_availability(BackendId::TORCH_SDPA, DeviceType::CPU, true, "");
  set_backend_availability(BackendId::NATIVE, DeviceType::CUDA, true, "");
  set_backend_availability(BackendId::TORCH_SDPA, DeviceType::CUDA, true, "");
  set_backend_availability(BackendId::FA, DeviceType::CUDA, false, "flash_attn_interface is not installed");
  set_cuda_compute_capability(9, 0);
  clear_selection_cache();
}

inline attnsel::SelectionRequest cpu_request(int head_size = 64) {
  attnsel::SelectionRequest r;
  r.head_size = head_size;
  r.dtype = attnsel::DType::F32;
  r.device = attnsel::DeviceType::CPU;
  return r;
}

inline attnsel::SelectionRequest cuda_request(int head_size = 128, attnsel::DType dtype = attnsel::DType::BF16) {
  attnsel::SelectionRequest r;
  r.head_size = head_size;
  r.dtype = dtype;
  r.device = attnsel::DeviceType::CUDA;
  return r;
}

inline bool any_reason_contains(const std::vector<std::string>& reasons, const std::string& needle) {
  for (const auto& r : reasons)
    if (contains(r, needle)) return true;
  return false;
}

}  // namespace attnsel_test
