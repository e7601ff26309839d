// attnsel public C++ API: backend names, component scopes and backend selection.
// Torch-free: a native caller needs only the standard library to use this header.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <utility>
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

// What an attention layer does in its component: self-attention or cross-attention (keys from another sequence).
// None: the layer declared no role (only component-wide settings apply to it).
enum class Role : std::uint8_t { None, Self, Cross };
inline constexpr int kNumRoles = 2;  // Self, Cross

// The mask a call carries.
enum class MaskKind : std::uint8_t { None, Bool, Additive };

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
std::string_view role_name(Role role);              // "", "self", "cross"
std::optional<Role> find_role(std::string_view name);  // "self" / "cross" (case and spaces ignored)
std::string_view mask_kind_name(MaskKind kind);      // "none", "bool", "additive"

// --- component context (per thread) --------------------------------------------------------------
struct ComponentContext {
  std::optional<BackendId> backend;  // nothing = the component has no override
  std::string component;
  bool set_by_python = false;  // a mirror of a Python scope (see DESIGN: context semantics)
  // Per-role overrides (index: Role::Self - 1, Role::Cross - 1); they outrank `backend` for layers of that role.
  std::array<std::optional<BackendId>, kNumRoles> role_backends{};
};

// The active component of this thread, or nothing.
std::optional<ComponentContext> current_component();

// RAII: makes {component, backend} this thread's context; the previous one comes back on destruction.
class ComponentScope {
 public:
  ComponentScope(std::string component, std::optional<BackendId> backend,
                 std::array<std::optional<BackendId>, kNumRoles> role_backends = {});
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

// --- the call signature ---------------------------------------------------------------------------
// Everything about one attention call that decides which backends can run it and which is fastest.
struct CallSignature {
  std::int64_t batch = 1, heads_q = 1, heads_kv = 1, seq_q = 1, seq_kv = 1;
  int head_dim = 0;    // of q and k
  int head_dim_v = 0;  // of v (0 = same as head_dim)
  DType dtype = DType::F32;
  DeviceType device = DeviceType::CPU;
  MaskKind mask = MaskKind::None;
  bool mask_key_padding = false;  // the mask broadcasts over heads and queries: (B, 1, 1, Sk), (1, Sk) or (Sk)
  bool causal = false;            // top-left aligned (PyTorch's convention)
  bool needs_grad = false;        // the output will be differentiated
  bool needs_lse = false;         // the caller wants the log-sum-exp
  int value_head_dim() const { return head_dim_v > 0 ? head_dim_v : head_dim; }
};
std::string describe(const CallSignature& call);  // one line, for messages

// --- backend descriptors -------------------------------------------------------------------------
// What a backend can take beyond dtype, head size and device.
struct Features {
  bool bool_mask = false;
  bool additive_mask = false;
  bool key_padding_mask_only = false;  // masks only when they broadcast over heads and queries
  bool causal = false;
  bool causal_any_lengths = false;     // causal also when Sq != Sk (top-left); else only Sq == Sk
  bool grouped_query = false;          // Hkv < Hq
  bool different_lengths = false;      // Sq != Sk
  bool different_value_head = false;   // head_dim_v != head_dim
  bool lse = false;                    // returns the log-sum-exp
  bool backward = false;               // has a backward pass
  bool deterministic = false;          // bitwise repeatable
};

// A layer's extra word on a call: why it cannot run it ("" = it can), or whether it is measured faster than
// PyTorch SDPA there (the static rank then moves it up).
using CallCheck = std::string (*)(const CallSignature& call);
using PreferenceCheck = bool (*)(const CallSignature& call);

// One backend on one device: registered by the layer that implements it (the torch glue for native and the
// PyTorch SDPA family; the Python bridges for flash-attn and sageattention). Everything selection knows about it.
struct BackendDescriptor {
  BackendId backend = BackendId::NATIVE;
  DeviceType device = DeviceType::CPU;
  bool f32 = false, f16 = false, bf16 = false;
  int min_head = 1, max_head = 1 << 20, head_multiple = 1;  // head_dim and head_dim_v
  int min_sm = 0;  // CUDA compute capability major*10+minor (0 = any)
  Features features;
  bool available = true;          // the probe's answer (library present, GPU visible)
  std::string unavailable_reason;  // why not, when !available
  std::string library;             // what implements it (e.g. "flash_attn_interface (FA3)"), for `attnsel backends`
  CallCheck check = nullptr;       // kernel-specific limits over the whole call
  // Static rank for `auto` where the tuning table has no entry: lower runs first; < 0 = never chosen by `auto`
  // without a measurement (pinned or lossy kernels). `prefers` (optional) moves it to `preferred_rank`.
  int auto_rank = -1;
  PreferenceCheck prefers = nullptr;
  int preferred_rank = -1;
};

// Registers (or replaces) the descriptor of (descriptor.backend, descriptor.device).
void register_backend(BackendDescriptor descriptor);
// The registered descriptor, or nothing.
std::optional<BackendDescriptor> backend_descriptor(BackendId id, DeviceType device);
// Drops every registered descriptor (tests).
void clear_backends();

// A probe's result, overriding the descriptor's availability (kept and applied if it registers later).
void set_backend_availability(BackendId id, DeviceType device, bool available, std::string reason);
// Facts about the device that capability checks need (CUDA compute capability; 0 = unknown / none).
void set_cuda_compute_capability(int major, int minor);

// Why `id` cannot run the call (empty = it can); every problem is listed, each prefixed with the backend's name.
std::vector<std::string> refusal_reasons(BackendId id, const CallSignature& call);

// --- selection -----------------------------------------------------------------------------------
// What a layer knows when it is built (policy time).
struct SelectionRequest {
  int head_size = 0;
  DType dtype = DType::F32;
  DeviceType device = DeviceType::CPU;
  std::optional<std::vector<BackendId>> supported;  // the layer's supported set; nothing = all
  std::optional<BackendId> selected;                // explicit argument (highest priority)
  Role role = Role::None;                           // the layer's role in its component
};
std::vector<std::string> refusal_reasons(BackendId id, const SelectionRequest& request);

struct Selection {
  BackendId backend = BackendId::NATIVE;
  Source source = Source::Auto;      // Auto: the policy is `auto` (a plan per call); else a named backend
  std::string component;             // the component whose context applied (may be empty)
  std::vector<std::string> reasons;  // why this backend, and why others were refused
  bool measured = false;             // auto's answer came from the tuning table
};

// Policy (when a layer is built): explicit > forced > component.role > component > global > auto, checked on what
// is known then (head size, dtype, device). Uses this thread's context. `backend` is the named backend, or for
// `auto` the static choice for a 1-token call. Throws std::invalid_argument (with every reason) when the chosen
// level names a backend that cannot run.
Selection select_backend(const SelectionRequest& request);
// The same, with the component context given explicitly (nullptr = none) instead of this thread's.
Selection select_backend_in(const SelectionRequest& request, const ComponentContext* context);

// Plan (per call): `backend` names the policy's backend (it must accept the call, else std::invalid_argument
// naming what it cannot take; never a silent switch); nothing = auto, the fastest backend that accepts the call:
// from the tuning table when it has the call's bucket, else by static rank. Cached on everything it depends on.
Selection plan_call(const CallSignature& call, std::optional<BackendId> backend);
// Policy and plan in one with this thread's context, for a call with no layer (role None).
Selection select_for_call(const CallSignature& call, const ComponentContext* context);
// The backends alone (no reasons copied or built): what the op runs per call. Same answers and errors.
BackendId plan_call_backend(const CallSignature& call, std::optional<BackendId> backend);
BackendId select_for_call_backend(const CallSignature& call, const ComponentContext* context);

// The policy only: the named backend the levels give (explicit > forced > role > component > global), or nothing
// for auto, with its source. No checks.
std::pair<std::optional<BackendId>, Source> resolve_policy(std::optional<BackendId> selected, Role role,
                                                           const ComponentContext* context);

// --- tuning table (what `auto` measured) ------------------------------------------------------------
// Bucket of a call: the key of the tuning table. Lengths and batch*heads round up to half-octaves
// (2^(k/2)), so nearby shapes share an entry; head sizes, dtype, device, GQA, mask kind and causal are exact.
std::string tuning_bucket(const CallSignature& call);
// Measured milliseconds per backend for a bucket (replaces that bucket's entry); `auto` takes the fastest that
// accepts the call.
void set_tuning_entry(const std::string& bucket, std::vector<std::pair<BackendId, double>> milliseconds);
std::optional<std::vector<std::pair<BackendId, double>>> tuning_entry(const std::string& bucket);
void clear_tuning_table();
std::size_t tuning_table_size();

// Plans are cached on every input they depend on; these expose the cache for tests and tools.
std::size_t selection_cache_size();
std::uint64_t selection_cache_hits();
void clear_selection_cache();

}  // namespace attnsel
