// The backend registry: names and aliases (stable ids), and the descriptors that implementing layers register per
// (backend, device), with the refusal reasons derived from them.
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

// Why a known name has no implementation on any device (the rest say so when nothing registered them).
std::string_view unimplemented_note(BackendId id) {
  switch (id) {
    case BackendId::NO_ATTENTION:
      return "no_attention marks components without attention layers; it cannot run attention";
    case BackendId::SAGE_ATTN_3:
    case BackendId::SLIDING_TILE_ATTN:
    case BackendId::VIDEO_SPARSE_ATTN:
    case BackendId::SPARSE_VIDEO_GEN_2_ATTN:
    case BackendId::VMOBA_ATTN:
    case BackendId::AITER:
    case BackendId::AITER_SAGE:
    case BackendId::SLA_ATTN:
    case BackendId::SAGE_SLA_ATTN:
      return "attnsel has no kernel or bridge for this backend yet";
    default:
      return {};
  }
}

struct Override {
  bool reported = false;
  bool available = false;
  std::string reason;
};

struct RegistryState {
  std::mutex mutex;
  std::array<std::array<std::optional<BackendDescriptor>, kNumDeviceTypes>, kNumBackends> descriptors;
  std::array<std::array<Override, kNumDeviceTypes>, kNumBackends> availability;
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

bool dtype_ok(const BackendDescriptor& d, DType t) {
  return t == DType::F32 ? d.f32 : (t == DType::F16 ? d.f16 : d.bf16);
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

std::string_view role_name(Role role) {
  switch (role) {
    case Role::None: return "";
    case Role::Self: return "self";
    case Role::Cross: return "cross";
  }
  return "<invalid>";
}

std::optional<Role> find_role(std::string_view name) {
  const std::string key = normalize(name);
  if (key == "self") return Role::Self;
  if (key == "cross") return Role::Cross;
  return std::nullopt;
}

std::string_view mask_kind_name(MaskKind kind) {
  switch (kind) {
    case MaskKind::None: return "none";
    case MaskKind::Bool: return "bool";
    case MaskKind::Additive: return "additive";
  }
  return "<invalid>";
}

std::string describe(const CallSignature& c) {
  std::ostringstream os;
  os << "q [" << c.batch << ", " << c.heads_q << ", " << c.seq_q << ", " << c.head_dim << "], k/v [" << c.batch
     << ", " << c.heads_kv << ", " << c.seq_kv << ", " << c.head_dim << "/" << c.value_head_dim() << "], "
     << dtype_name(c.dtype) << " on " << device_name(c.device);
  if (c.mask != MaskKind::None)
    os << ", " << mask_kind_name(c.mask) << (c.mask_key_padding ? " key-padding" : "") << " mask";
  if (c.causal) os << ", causal";
  if (c.needs_grad) os << ", needs grad";
  if (c.needs_lse) os << ", needs lse";
  return os.str();
}

void register_backend(BackendDescriptor descriptor) {
  {
    std::lock_guard<std::mutex> lock(state().mutex);
    state().descriptors[static_cast<int>(descriptor.backend)][static_cast<int>(descriptor.device)] =
        std::move(descriptor);
  }
  detail::bump_generation();
}

std::optional<BackendDescriptor> backend_descriptor(BackendId id, DeviceType device) {
  std::lock_guard<std::mutex> lock(state().mutex);
  return state().descriptors[static_cast<int>(id)][static_cast<int>(device)];
}

void clear_backends() {
  {
    std::lock_guard<std::mutex> lock(state().mutex);
    for (auto& per_device : state().descriptors) per_device.fill(std::nullopt);
    for (auto& per_device : state().availability) per_device.fill(Override{});
  }
  detail::bump_generation();
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

void set_cuda_compute_capability(int major, int minor) {
  {
    std::lock_guard<std::mutex> lock(state().mutex);
    state().sm = major * 10 + minor;
  }
  detail::bump_generation();
}

int detail::auto_rank(BackendId id, const CallSignature& call) {
  std::optional<BackendDescriptor> d;
  {
    std::lock_guard<std::mutex> lock(state().mutex);
    d = state().descriptors[static_cast<int>(id)][static_cast<int>(call.device)];
  }
  if (!d) return -1;
  if (d->prefers && d->preferred_rank >= 0 && d->prefers(call)) return d->preferred_rank;
  return d->auto_rank;
}

std::vector<std::string> refusal_reasons(BackendId id, const CallSignature& call) {
  std::vector<std::string> reasons;
  const std::string name(backend_name(id));
  const std::string_view note = unimplemented_note(id);
  if (!note.empty()) {
    reasons.push_back(name + ": " + std::string(note));
    return reasons;
  }
  std::optional<BackendDescriptor> found;
  Override avail;
  int sm = 0;
  std::optional<BackendDescriptor> elsewhere;  // registered on the other device only
  {
    std::lock_guard<std::mutex> lock(state().mutex);
    const auto i = static_cast<int>(id), dev = static_cast<int>(call.device);
    found = state().descriptors[i][dev];
    avail = state().availability[i][dev];
    sm = state().sm;
    for (int other = 0; other < kNumDeviceTypes; ++other)
      if (other != dev && state().descriptors[i][other]) elsewhere = state().descriptors[i][other];
  }
  const bool wrong_device = !found;
  if (wrong_device) {
    if (!elsewhere) {
      reasons.push_back(name + ": not available on " + std::string(device_name(call.device)) +
                        " (no implementation is registered: the library that provides it is not loaded)");
      return reasons;
    }
    reasons.push_back(name + ": runs only on " + std::string(device_name(elsewhere->device)) + ", not on " +
                      std::string(device_name(call.device)));
    found = elsewhere;  // still list its other limits
  }
  const BackendDescriptor& d = *found;
  const bool available = wrong_device || (avail.reported ? avail.available : d.available);
  if (!available) {
    const std::string& why = avail.reported ? avail.reason : d.unavailable_reason;
    reasons.push_back(name + ": " + (why.empty() ? std::string("not available here") : why));
  }
  if (!dtype_ok(d, call.dtype)) {
    std::string ok;
    for (DType t : {DType::F32, DType::F16, DType::BF16})
      if (dtype_ok(d, t)) ok += (ok.empty() ? "" : ", ") + std::string(dtype_name(t));
    reasons.push_back(name + ": dtype " + std::string(dtype_name(call.dtype)) + " not supported (takes " + ok + ")");
  }
  for (int size : {call.head_dim, call.value_head_dim()}) {
    if (size < d.min_head || size > d.max_head || size % d.head_multiple != 0) {
      std::ostringstream os;
      os << name << ": head_size " << size << " not supported (needs " << d.min_head << ".." << d.max_head;
      if (d.head_multiple > 1) os << ", a multiple of " << d.head_multiple;
      os << ")";
      reasons.push_back(os.str());
      break;
    }
  }
  if (!wrong_device && call.device == DeviceType::CUDA && d.min_sm > 0 && sm > 0 && sm < d.min_sm) {
    std::ostringstream os;
    os << name << ": needs compute capability " << d.min_sm / 10 << "." << d.min_sm % 10 << "+, this GPU is "
       << sm / 10 << "." << sm % 10;
    reasons.push_back(os.str());
  }
  const Features& f = d.features;
  const auto refuse = [&](const std::string& what) { reasons.push_back(name + ": cannot take " + what); };
  if (call.mask == MaskKind::Bool && !f.bool_mask) refuse("a boolean mask");
  if (call.mask == MaskKind::Additive && !f.additive_mask) refuse("an additive mask");
  if (call.mask != MaskKind::None && f.key_padding_mask_only && !call.mask_key_padding &&
      (f.bool_mask || f.additive_mask))
    refuse("a mask that varies over heads or queries (only key-padding masks)");
  if (call.causal && !f.causal) refuse("causal masking");
  if (call.causal && !f.causal_any_lengths && call.seq_q != call.seq_kv)
    refuse("causal masking with query and key lengths differing (" + std::to_string(call.seq_q) + " vs " +
           std::to_string(call.seq_kv) + "): it aligns the causal mask differently from PyTorch");
  if (call.heads_q != call.heads_kv && !f.grouped_query) refuse("grouped-query attention (Hq != Hkv)");
  if (call.seq_q != call.seq_kv && !f.different_lengths) refuse("query and key lengths that differ");
  if (call.value_head_dim() != call.head_dim && !f.different_value_head)
    refuse("a value head size different from the query's");
  if (call.needs_lse && !f.lse) refuse("returning the log-sum-exp");
  if (call.needs_grad && !f.backward) refuse("a backward pass (inputs require grad)");
  if (reasons.empty() && !wrong_device) {  // kernel-specific limits, once the generic ones pass
    if (d.check) {
      std::string why = d.check(call);
      if (!why.empty()) reasons.push_back(name + ": " + why);
    }
  }
  return reasons;
}

CallSignature detail::signature_of(const SelectionRequest& r) {
  CallSignature c;
  c.head_dim = r.head_size;
  c.dtype = r.dtype;
  c.device = r.device;
  return c;
}

std::vector<std::string> refusal_reasons(BackendId id, const SelectionRequest& request) {
  return refusal_reasons(id, detail::signature_of(request));
}

}  // namespace attnsel
