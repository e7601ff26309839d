// attnsel public C++ API: backend names, component scopes and backend selection.
// Torch-free: a native caller needs only the standard library to use this header.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace attnsel {

// Every backend attnsel knows, runnable here or not. Order is the stable numeric id used by the op schema.
enum class BackendId : std::uint8_t {
  FA2,
  FA,
  TORCH_SDPA,
  SAGE_ATTN,
  SAGE_ATTN_3,
  SLIDING_TILE_ATTN,
  VIDEO_SPARSE_ATTN,
  SPARSE_VIDEO_GEN_2_ATTN,
  VMOBA_ATTN,
  AITER,
  AITER_SAGE,
  SLA_ATTN,
  SAGE_SLA_ATTN,
  NO_ATTENTION,
  NATIVE,
  // PyTorch SDPA with one sub-kernel pinned (CUDA only).
  SDPA_CUDNN,
  SDPA_FLASH,
  SDPA_EFFICIENT,
  SDPA_MATH,
};
inline constexpr int kNumBackends = static_cast<int>(BackendId::SDPA_MATH) + 1;

enum class DType : std::uint8_t { F32, F16, BF16 };
enum class DeviceType : std::uint8_t { CPU, CUDA };
inline constexpr int kNumDeviceTypes = 2;

// Which priority level chose a backend.
enum class Source : std::uint8_t { Explicit, Forced, Component, Global, Auto };

// --- names -------------------------------------------------------------------------------------
// Normalised lookup: surrounding and inner whitespace ignored, case-insensitive, aliases (fa3/fa4 -> fa).
std::optional<BackendId> find_backend(std::string_view name);
std::string_view backend_name(BackendId id);
std::vector<BackendId> all_backends();
struct BackendAlias {
  std::string_view alias;
  BackendId target;
};
std::vector<BackendAlias> backend_aliases();
std::string_view dtype_name(DType dtype);
std::string_view device_name(DeviceType device);
std::string_view source_name(Source source);

// --- component context (per thread) --------------------------------------------------------------
struct ComponentContext {
  std::optional<BackendId> backend;  // nothing = the component has no override
  std::string component;
  bool set_by_python = false;  // a mirror of a Python scope (see DESIGN: context semantics)
};

// The active component of this thread, or nothing.
std::optional<ComponentContext> current_component();

// RAII: makes {component, backend} this thread's context; the previous one comes back on destruction.
class ComponentScope {
 public:
  ComponentScope(std::string component, std::optional<BackendId> backend);
  ~ComponentScope();
  ComponentScope(const ComponentScope&) = delete;
  ComponentScope& operator=(const ComponentScope&) = delete;

 private:
  std::optional<ComponentContext> previous_;
};

// --- global levels (process-wide) ----------------------------------------------------------------
// The forced backend outranks component contexts; set with the RAII scope below.
std::optional<BackendId> forced_backend();
class ForcedBackendScope {
 public:
  explicit ForcedBackendScope(std::optional<BackendId> backend);
  ~ForcedBackendScope();
  ForcedBackendScope(const ForcedBackendScope&) = delete;
  ForcedBackendScope& operator=(const ForcedBackendScope&) = delete;

 private:
  std::optional<BackendId> previous_;
};

// What --attention-backend sets: the level below component contexts.
void set_global_backend(std::optional<BackendId> backend);
std::optional<BackendId> global_backend();

// --- capabilities --------------------------------------------------------------------------------
// Whether a backend's library is present on a device type. Runtime layers (torch glue, Python package
// detection) report this; until reported, a backend with an external library counts as missing.
void set_backend_availability(BackendId id, DeviceType device, bool available, std::string reason);

// Facts about the device that capability checks need (CUDA compute capability; 0 = unknown / none).
void set_cuda_compute_capability(int major, int minor);

// An extra check a kernel layer installs for (backend, device), e.g. the CUDA kernel's head sizes.
// Returns an empty string when the request can run, else the reason.
struct SelectionRequest;
using CapabilityCheck = std::string (*)(const SelectionRequest& request);
void set_capability_check(BackendId id, DeviceType device, CapabilityCheck check);

// A kernel layer's word that `native` on `device` is faster than PyTorch SDPA for a request (measured; e.g.
// our Hopper kernel at head_dim 128). The automatic choice then tries `native` ahead of `torch_sdpa`.
using PreferenceCheck = bool (*)(const SelectionRequest& request);
void set_native_preference(DeviceType device, PreferenceCheck prefers);

// Why `id` cannot run this request (empty = it can).
std::vector<std::string> refusal_reasons(BackendId id, const SelectionRequest& request);

// --- selection -----------------------------------------------------------------------------------
struct SelectionRequest {
  int head_size = 0;
  DType dtype = DType::F32;
  DeviceType device = DeviceType::CPU;
  std::optional<std::vector<BackendId>> supported;  // the layer's supported set; nothing = all
  std::optional<BackendId> selected;                // explicit argument (highest priority)
};

struct Selection {
  BackendId backend = BackendId::NATIVE;
  Source source = Source::Auto;
  std::string component;             // the component whose context applied (may be empty)
  std::vector<std::string> reasons;  // why this backend, and why others were refused
};

// Priority: explicit > forced > component context > global > automatic. Uses this thread's context.
// Throws std::invalid_argument (with every reason) when the chosen level names a backend that cannot run.
Selection select_backend(const SelectionRequest& request);

// The same, with the component context given explicitly (nullptr = none) instead of this thread's.
Selection select_backend_in(const SelectionRequest& request, const ComponentContext* context);

// Selection results are cached on every input they depend on; these expose the cache for tests and tools.
std::size_t selection_cache_size();
std::uint64_t selection_cache_hits();
void clear_selection_cache();

}  // namespace attnsel
