// The backend registry: names, aliases and the capability table keyed by (backend, device).
#include <algorithm>
#include <array>
#include <cctype>
#include <mutex>
#include <sstream>

#include "attnsel/attnsel.h"
#include "internal.h"

namespace attnsel {
namespace {

constexpr std::array<std::string_view, kNumBackends> kNames = {
    "fa2",
    "fa",
    "torch_sdpa",
    "sage_attn",
    "sage_attn_3",
    "sliding_tile_attn",
    "video_sparse_attn",
    "sparse_video_gen_2_attn",
    "vmoba_attn",
    "aiter",
    "aiter_sage",
    "sla_attn",
    "sage_sla_attn",
    "no_attention",
    "native",
    "sdpa_cudnn",
    "sdpa_flash",
    "sdpa_efficient",
    "sdpa_math",
};

constexpr std::array<BackendAlias, 2> kAliases = {{
    {"fa3", BackendId::FA},
    {"fa4", BackendId::FA},
}};

// Static capability facts per backend. Head sizes: [min, max], and `multiple` must divide the size.
struct Capability {
  bool cpu = false;
  bool cuda = false;
  bool f32 = false;
  bool half = false;  // f16 and bf16
  int min_head = 1;
  int max_head = 1 << 20;
  int multiple = 1;
  int min_sm = 0;  // CUDA compute capability major*10+minor
  const char* unimplemented = nullptr;  // non-null: attnsel has no kernel or bridge for this backend
  bool needs_library = true;            // availability must be reported by a runtime layer
};

Capability capability_of(BackendId id) {
  Capability c;
  switch (id) {
    case BackendId::NATIVE:
      c.cpu = c.cuda = c.f32 = c.half = true;  // f32 on CUDA is refused by the CUDA kernel's own check
      c.max_head = 512;
      return c;
    case BackendId::TORCH_SDPA:
    case BackendId::SDPA_MATH:
      c.cpu = id == BackendId::TORCH_SDPA;
      c.cuda = c.f32 = c.half = true;
      return c;
    case BackendId::SDPA_CUDNN:
      c.cuda = c.half = true;
      c.max_head = 128;
      c.multiple = 8;
      c.min_sm = 80;
      return c;
    case BackendId::SDPA_EFFICIENT:
      c.cuda = c.f32 = c.half = true;
      c.multiple = 8;
      c.min_sm = 50;
      return c;
    case BackendId::FA:
    case BackendId::FA2:
    case BackendId::SDPA_FLASH:
      c.cuda = c.half = true;
      c.max_head = 256;
      c.multiple = 8;
      c.min_sm = 80;
      return c;
    case BackendId::SAGE_ATTN:
      c.cuda = c.half = true;
      c.min_head = 64;
      c.max_head = 128;
      c.multiple = 64;
      c.min_sm = 80;
      return c;
    case BackendId::NO_ATTENTION:
      c.unimplemented = "no_attention marks components without attention layers; it cannot run attention";
      return c;
    default:
      c.cuda = true;
      c.unimplemented = "attnsel has no kernel or bridge for this backend yet";
      return c;
  }
}

struct AvailabilityEntry {
  bool reported = false;
  bool available = false;
  std::string reason;
};

struct RegistryState {
  std::mutex mutex;
  std::array<std::array<AvailabilityEntry, kNumDeviceTypes>, kNumBackends> availability;
  std::array<std::array<CapabilityCheck, kNumDeviceTypes>, kNumBackends> checks{};
  std::array<PreferenceCheck, kNumDeviceTypes> native_preference{};
  int sm = 0;
};

RegistryState& state() {
  static RegistryState s;
  return s;
}

std::string normalize(std::string_view name) {
  std::string out;
  out.reserve(name.size());
  for (char ch : name) {
    if (std::isspace(static_cast<unsigned char>(ch))) continue;
    out.push_back(static_cast<char>(std::tolower(static_cast<unsigned char>(ch))));
  }
  return out;
}

}  // namespace

std::optional<BackendId> find_backend(std::string_view name) {
  const std::string key = normalize(name);
  for (int i = 0; i < kNumBackends; ++i)
    if (kNames[i] == key) return static_cast<BackendId>(i);
  for (const auto& a : kAliases)
    if (a.alias == key) return a.target;
  return std::nullopt;
}

std::string_view backend_name(BackendId id) {
  const auto i = static_cast<int>(id);
  return i >= 0 && i < kNumBackends ? kNames[i] : std::string_view("<invalid>");
}

std::vector<BackendId> all_backends() {
  std::vector<BackendId> out;
  for (int i = 0; i < kNumBackends; ++i) out.push_back(static_cast<BackendId>(i));
  return out;
}

std::vector<BackendAlias> backend_aliases() { return {kAliases.begin(), kAliases.end()}; }

std::string_view dtype_name(DType dtype) {
  switch (dtype) {
    case DType::F32: return "float32";
    case DType::F16: return "float16";
    case DType::BF16: return "bfloat16";
  }
  return "<invalid>";
}

std::string_view device_name(DeviceType device) { return device == DeviceType::CPU ? "cpu" : "cuda"; }

std::string_view source_name(Source source) {
  switch (source) {
    case Source::Explicit: return "explicit";
    case Source::Forced: return "forced";
    case Source::Component: return "component";
    case Source::Global: return "global";
    case Source::Auto: return "auto";
  }
  return "<invalid>";
}

void set_backend_availability(BackendId id, DeviceType device, bool available, std::string reason) {
  {
    std::lock_guard<std::mutex> lock(state().mutex);
    auto& e = state().availability[static_cast<int>(id)][static_cast<int>(device)];
    e.reported = true;
    e.available = available;
    e.reason = std::move(reason);
  }
  detail::bump_generation();
}

void set_capability_check(BackendId id, DeviceType device, CapabilityCheck check) {
  {
    std::lock_guard<std::mutex> lock(state().mutex);
    state().checks[static_cast<int>(id)][static_cast<int>(device)] = check;
  }
  detail::bump_generation();
}

void set_native_preference(DeviceType device, PreferenceCheck prefers) {
  {
    std::lock_guard<std::mutex> lock(state().mutex);
    state().native_preference[static_cast<int>(device)] = prefers;
  }
  detail::bump_generation();
}

bool detail::native_preferred(const SelectionRequest& request) {
  PreferenceCheck prefers = nullptr;
  {
    std::lock_guard<std::mutex> lock(state().mutex);
    prefers = state().native_preference[static_cast<int>(request.device)];
  }
  return prefers != nullptr && prefers(request);
}

void set_cuda_compute_capability(int major, int minor) {
  {
    std::lock_guard<std::mutex> lock(state().mutex);
    state().sm = major * 10 + minor;
  }
  detail::bump_generation();
}

std::vector<std::string> refusal_reasons(BackendId id, const SelectionRequest& request) {
  std::vector<std::string> reasons;
  const Capability c = capability_of(id);
  const std::string name(backend_name(id));
  if (c.unimplemented) {
    reasons.push_back(name + ": " + c.unimplemented);
    return reasons;
  }
  const bool on_cuda = request.device == DeviceType::CUDA;
  const bool device_ok = on_cuda ? c.cuda : c.cpu;
  if (!device_ok) {
    reasons.push_back(name + ": runs only on " + std::string(on_cuda ? "cpu" : "cuda") + ", not on " +
                      std::string(device_name(request.device)));
  }
  AvailabilityEntry avail;
  CapabilityCheck check = nullptr;
  int sm = 0;
  {
    std::lock_guard<std::mutex> lock(state().mutex);
    avail = state().availability[static_cast<int>(id)][static_cast<int>(request.device)];
    check = state().checks[static_cast<int>(id)][static_cast<int>(request.device)];
    sm = state().sm;
  }
  if (device_ok && c.needs_library && !avail.available) {
    reasons.push_back(name + ": " +
                      (avail.reported ? avail.reason : std::string("availability not reported on this device")));
  }
  const bool half = request.dtype != DType::F32;
  if ((half && !c.half) || (!half && !c.f32)) {
    reasons.push_back(name + ": dtype " + std::string(dtype_name(request.dtype)) + " not supported");
  }
  if (request.head_size < c.min_head || request.head_size > c.max_head || request.head_size % c.multiple != 0) {
    std::ostringstream os;
    os << name << ": head_size " << request.head_size << " not supported (needs " << c.min_head << ".."
       << c.max_head;
    if (c.multiple > 1) os << ", a multiple of " << c.multiple;
    os << ")";
    reasons.push_back(os.str());
  }
  if (on_cuda && c.min_sm > 0 && sm > 0 && sm < c.min_sm) {
    std::ostringstream os;
    os << name << ": needs compute capability " << c.min_sm / 10 << "." << c.min_sm % 10 << "+, this GPU is "
       << sm / 10 << "." << sm % 10;
    reasons.push_back(os.str());
  }
  if (reasons.empty() && check) {  // kernel-specific limits, once the generic ones pass
    std::string why = check(request);
    if (!why.empty()) reasons.push_back(name + ": " + why);
  }
  return reasons;
}

}  // namespace attnsel
