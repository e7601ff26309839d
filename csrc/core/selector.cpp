// Backend selection: explicit > forced > component > global > automatic, cached, with reasons.
#include <algorithm>
#include <atomic>
#include <mutex>
#include <sstream>
#include <stdexcept>
#include <unordered_map>

#include "attnsel/attnsel.h"
#include "internal.h"

namespace attnsel {
namespace {

static_assert(kNumBackends <= 32, "the supported-set bitmask holds 32 backends");

std::uint32_t supported_mask(const SelectionRequest& r) {
  if (!r.supported) return ~0u;
  std::uint32_t m = 0;
  for (BackendId id : *r.supported) m |= 1u << static_cast<int>(id);
  return m;
}

// Everything a selection depends on. The component name is part of the answer (Selection::component).
struct CacheKey {
  int head_size;
  int dtype;
  int device;
  std::uint32_t supported;
  int selected, forced, component_backend, global;
  std::string component;
  bool has_component;
  std::uint64_t generation;
  bool operator==(const CacheKey& o) const {
    return head_size == o.head_size && dtype == o.dtype && device == o.device && supported == o.supported &&
           selected == o.selected && forced == o.forced && component_backend == o.component_backend &&
           global == o.global && component == o.component && has_component == o.has_component &&
           generation == o.generation;
  }
};

struct CacheKeyHash {
  std::size_t operator()(const CacheKey& k) const {
    std::size_t h = std::hash<std::string>()(k.component);
    auto mix = [&h](std::uint64_t v) { h ^= v + 0x9e3779b97f4a7c15ull + (h << 6) + (h >> 2); };
    mix(static_cast<std::uint64_t>(k.head_size));
    mix(static_cast<std::uint64_t>(k.dtype) | (static_cast<std::uint64_t>(k.device) << 8) |
        (static_cast<std::uint64_t>(k.has_component) << 16));
    mix(k.supported);
    mix(static_cast<std::uint64_t>(k.selected + 1) | (static_cast<std::uint64_t>(k.forced + 1) << 8) |
        (static_cast<std::uint64_t>(k.component_backend + 1) << 16) |
        (static_cast<std::uint64_t>(k.global + 1) << 24));
    mix(k.generation);
    return h;
  }
};

constexpr std::size_t kMaxCacheEntries = 4096;

struct Cache {
  std::mutex mutex;
  std::unordered_map<CacheKey, Selection, CacheKeyHash> entries;
  std::atomic<std::uint64_t> hits{0};
};

Cache& cache() {
  static Cache c;
  return c;
}

int encode(std::optional<BackendId> id) { return id ? static_cast<int>(*id) : -1; }

std::string describe(const SelectionRequest& r) {
  std::ostringstream os;
  os << "head_size=" << r.head_size << ", dtype=" << dtype_name(r.dtype) << ", device=" << device_name(r.device);
  return os.str();
}

std::string join(const std::vector<std::string>& parts) {
  std::string out;
  for (const auto& p : parts) {
    if (!out.empty()) out += "; ";
    out += p;
  }
  return out;
}

std::vector<std::string> reasons_with_supported(BackendId id, const SelectionRequest& r) {
  std::vector<std::string> reasons = refusal_reasons(id, r);
  if (r.supported && std::find(r.supported->begin(), r.supported->end(), id) == r.supported->end()) {
    std::string list;
    for (BackendId s : *r.supported) list += (list.empty() ? "" : ", ") + std::string(backend_name(s));
    reasons.push_back(std::string(backend_name(id)) + ": not in this layer's supported set [" + list + "]");
  }
  return reasons;
}

// The automatic preference order; the first backend that can run wins.
std::vector<BackendId> auto_order(const SelectionRequest& r) {
  if (r.device == DeviceType::CPU) return {BackendId::NATIVE, BackendId::TORCH_SDPA};
  // CUDA: flash-attn 3/4 where installed; our own kernel for head sizes PyTorch's fast paths refuse or
  // where the kernel layer measured it faster (set_native_preference); else PyTorch SDPA (which picks
  // cuDNN / flash itself), our kernel as the last resort.
  if (r.head_size > 256) return {BackendId::NATIVE, BackendId::TORCH_SDPA};
  if (detail::native_preferred(r)) return {BackendId::FA, BackendId::NATIVE, BackendId::TORCH_SDPA};
  return {BackendId::FA, BackendId::TORCH_SDPA, BackendId::NATIVE};
}

Selection compute(const SelectionRequest& r, const ComponentContext* ctx) {
  Selection sel;
  if (ctx) sel.component = ctx->component;
  std::optional<BackendId> choice;
  std::string level_detail;
  if (r.selected) {
    choice = r.selected;
    sel.source = Source::Explicit;
    level_detail = "chosen explicitly by the caller";
  } else if (auto f = forced_backend()) {
    choice = f;
    sel.source = Source::Forced;
    level_detail = "forced globally (force_attention_backend)";
  } else if (ctx && ctx->backend) {
    choice = ctx->backend;
    sel.source = Source::Component;
    level_detail = "set for component '" + ctx->component + "'";
  } else if (auto g = global_backend()) {
    choice = g;
    sel.source = Source::Global;
    level_detail = "set by --attention-backend";
  }
  if (choice) {
    std::vector<std::string> reasons = reasons_with_supported(*choice, r);
    if (!reasons.empty()) {
      throw std::invalid_argument("attnsel: backend '" + std::string(backend_name(*choice)) + "' (" + level_detail +
                                  ") cannot run " + describe(r) + ": " + join(reasons));
    }
    sel.backend = *choice;
    sel.reasons.push_back(std::string(backend_name(*choice)) + ": " + level_detail);
    return sel;
  }
  sel.source = Source::Auto;
  std::vector<std::string> refused;
  for (BackendId id : auto_order(r)) {
    std::vector<std::string> reasons = reasons_with_supported(id, r);
    if (reasons.empty()) {
      sel.backend = id;
      sel.reasons = refused;
      sel.reasons.push_back(std::string(backend_name(id)) + ": automatic choice, first runnable in preference order");
      return sel;
    }
    refused.insert(refused.end(), reasons.begin(), reasons.end());
  }
  throw std::invalid_argument("attnsel: no backend can run " + describe(r) + ": " + join(refused));
}

}  // namespace

Selection select_backend_in(const SelectionRequest& request, const ComponentContext* context) {
  if (request.head_size <= 0) {
    throw std::invalid_argument("attnsel: head_size must be positive, got " + std::to_string(request.head_size));
  }
  CacheKey key{request.head_size,
               static_cast<int>(request.dtype),
               static_cast<int>(request.device),
               supported_mask(request),
               encode(request.selected),
               encode(forced_backend()),
               context ? encode(context->backend) : -1,
               encode(global_backend()),
               context ? context->component : std::string(),
               context != nullptr,
               detail::generation()};
  Cache& c = cache();
  {
    std::lock_guard<std::mutex> lock(c.mutex);
    auto it = c.entries.find(key);
    if (it != c.entries.end()) {
      c.hits.fetch_add(1, std::memory_order_relaxed);
      return it->second;
    }
  }
  Selection sel = compute(request, context);  // throws on refusal; failures are not cached
  std::lock_guard<std::mutex> lock(c.mutex);
  if (c.entries.size() >= kMaxCacheEntries) c.entries.clear();
  c.entries.emplace(std::move(key), sel);
  return sel;
}

Selection select_backend(const SelectionRequest& request) {
  const std::optional<ComponentContext> ctx = current_component();
  return select_backend_in(request, ctx ? &*ctx : nullptr);
}

std::size_t selection_cache_size() {
  std::lock_guard<std::mutex> lock(cache().mutex);
  return cache().entries.size();
}

std::uint64_t selection_cache_hits() { return cache().hits.load(std::memory_order_relaxed); }

void clear_selection_cache() {
  std::lock_guard<std::mutex> lock(cache().mutex);
  cache().entries.clear();
  cache().hits.store(0, std::memory_order_relaxed);
}

}  // namespace attnsel
