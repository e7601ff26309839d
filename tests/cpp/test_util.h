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

// No torch glue is loaded in these tests, so nothing registers backends: the tests do it, like the runtime layers,
// with descriptors that mirror the real ones. CPU: native and torch_sdpa run; CUDA: a compute capability 9.0 GPU
// with torch_sdpa and native, no flash-attn.
inline attnsel::BackendDescriptor test_descriptor(attnsel::BackendId id, attnsel::DeviceType device) {
  using namespace attnsel;
  BackendDescriptor d;
  d.backend = id;
  d.device = device;
  Features& f = d.features;
  switch (id) {
    case BackendId::NATIVE:
      d.f32 = d.f16 = d.bf16 = true;  // (the real CUDA glue's kernel check refuses f32)
      d.max_head = 512;
      f.causal = f.causal_any_lengths = f.grouped_query = f.different_lengths = true;
      f.bool_mask = f.additive_mask = f.lse = device == DeviceType::CPU;
      d.auto_rank = device == DeviceType::CPU ? 10 : 40;
      d.preferred_rank = 20;  // head sizes above 256: PyTorch's fast kernels refuse them
      d.prefers = [](const CallSignature& c) { return c.head_dim > 256; };
      break;
    case BackendId::TORCH_SDPA:
      d.f32 = d.f16 = d.bf16 = true;
      f.bool_mask = f.additive_mask = f.causal = f.causal_any_lengths = f.grouped_query = true;
      f.different_lengths = f.different_value_head = true;
      d.auto_rank = device == DeviceType::CPU ? 20 : 30;
      break;
    case BackendId::SDPA_MATH:
      d.f32 = d.f16 = d.bf16 = true;
      f.bool_mask = f.additive_mask = f.causal = f.grouped_query = f.different_lengths = true;
      break;
    case BackendId::FA:
    case BackendId::FA2:
      d.f16 = d.bf16 = true;
      d.min_head = 8;
      d.max_head = 256;
      d.head_multiple = 8;
      d.min_sm = 80;
      f.causal = f.grouped_query = f.different_lengths = true;
      d.auto_rank = id == BackendId::FA ? 10 : -1;
      break;
    case BackendId::SAGE_ATTN:
      d.f16 = d.bf16 = true;
      d.min_head = 64;
      d.max_head = 128;
      d.head_multiple = 64;
      d.min_sm = 80;
      f.causal = f.different_lengths = true;
      break;
    default:
      break;
  }
  return d;
}

inline void reset_state() {
  using namespace attnsel;
  set_global_backend(std::nullopt);
  clear_backends();
  for (BackendId id : {BackendId::NATIVE, BackendId::TORCH_SDPA})
    for (DeviceType dev : {DeviceType::CPU, DeviceType::CUDA}) register_backend(test_descriptor(id, dev));
  for (BackendId id : {BackendId::FA, BackendId::FA2, BackendId::SAGE_ATTN, BackendId::SDPA_MATH})
    register_backend(test_descriptor(id, DeviceType::CUDA));
  set_backend_availability(BackendId::FA, DeviceType::CUDA, false, "flash_attn_interface is not installed");
  set_backend_availability(BackendId::FA2, DeviceType::CUDA, false, "flash-attn 2 is not installed");
  set_backend_availability(BackendId::SAGE_ATTN, DeviceType::CUDA, false, "sageattention is not installed");
  set_cuda_compute_capability(9, 0);
  clear_tuning_table();
  clear_selection_cache();
}

// Changes a registered descriptor, as its layer would by registering it again.
template <class Edit>
void edit_descriptor(attnsel::BackendId id, attnsel::DeviceType device, Edit edit) {
  attnsel::BackendDescriptor d = *attnsel::backend_descriptor(id, device);
  edit(d);
  attnsel::register_backend(d);
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
