// Selection in two steps: the policy (explicit > forced > component.role > component > global > auto, when a layer
// is built) and the plan (per call: the named backend must accept the call; auto takes the fastest that does, from
// the tuning table or the static rank). Plans are cached on everything they depend on.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <map>
#include <limits>
#include <mutex>
#include <sstream>
#include <stdexcept>
#include <unordered_map>

#include "attnsel/attnsel.h"
#include "internal.h"

namespace attnsel {
namespace {

static_assert(kNumBackends <= 32, "the supported-set bitmask holds 32 backends");

std::uint32_t supported_mask(const std::optional<std::vector<BackendId>>& supported) {
  if (!supported) return ~0u;
  std::uint32_t m = 0;
  for (BackendId id : *supported) m |= 1u << static_cast<int>(id);
  return m;
}

// Everything a plan depends on: the whole signature, the policy's backend (-1 = auto), the layer's supported set
// and the registry/tuning generation.
struct CacheKey {
  std::int64_t batch, heads_q, heads_kv, seq_q, seq_kv;
  int head_dim, head_dim_v;
  std::uint32_t flags;  // dtype, device, mask kind, key padding, causal, needs_grad, needs_lse
  int policy;
  std::uint32_t supported;
  std::uint64_t generation;
  bool operator==(const CacheKey& o) const {
    return batch == o.batch && heads_q == o.heads_q && heads_kv == o.heads_kv && seq_q == o.seq_q &&
           seq_kv == o.seq_kv && head_dim == o.head_dim && head_dim_v == o.head_dim_v && flags == o.flags &&
           policy == o.policy && supported == o.supported && generation == o.generation;
  }
};

struct CacheKeyHash {
  std::size_t operator()(const CacheKey& k) const {
    std::uint64_t h = 0xcbf29ce484222325ull;
    auto mix = [&h](std::uint64_t v) { h = (h ^ v) * 0x100000001b3ull; h ^= h >> 29; };
    mix(static_cast<std::uint64_t>(k.batch));
    mix(static_cast<std::uint64_t>(k.heads_q) << 20 ^ static_cast<std::uint64_t>(k.heads_kv));
    mix(static_cast<std::uint64_t>(k.seq_q));
    mix(static_cast<std::uint64_t>(k.seq_kv));
    mix(static_cast<std::uint64_t>(k.head_dim) << 32 ^ static_cast<std::uint32_t>(k.head_dim_v));
    mix(static_cast<std::uint64_t>(k.flags) << 32 ^ static_cast<std::uint32_t>(k.policy + 1));
    mix(k.supported);
    mix(k.generation);
    return static_cast<std::size_t>(h);
  }
};

constexpr std::size_t kMaxCacheEntries = 4096;
// Measured times this close to the fastest count as a tie in the tuning table (see compute_plan).
constexpr double kMeasuredTie = 0.02;

struct Cache {
  std::mutex mutex;
  std::unordered_map<CacheKey, Selection, CacheKeyHash> entries;
  std::atomic<std::uint64_t> hits{0};
};

Cache& cache() {
  static Cache c;
  return c;
}

struct TuningTable {
  std::mutex mutex;
  std::map<std::string, std::vector<std::pair<BackendId, double>>> entries;
};

TuningTable& tuning() {
  static TuningTable t;
  return t;
}

std::string join(const std::vector<std::string>& parts) {
  std::string out;
  for (const auto& p : parts) {
    if (!out.empty()) out += "; ";
    out += p;
  }
  return out;
}

std::vector<std::string> reasons_with_supported(BackendId id, const CallSignature& call, std::uint32_t supported,
                                                const std::optional<std::vector<BackendId>>& supported_list) {
  std::vector<std::string> reasons = refusal_reasons(id, call);
  if (!(supported & (1u << static_cast<int>(id)))) {
    std::string list;
    if (supported_list)
      for (BackendId s : *supported_list) list += (list.empty() ? "" : ", ") + std::string(backend_name(s));
    reasons.push_back(std::string(backend_name(id)) + ": not in this layer's supported set [" + list + "]");
  }
  return reasons;
}

std::string ms_text(double ms) {
  std::ostringstream os;
  os.precision(3);
  os << ms << " ms";
  return os.str();
}

// The plan for a call under a policy (nothing = auto). Throws std::invalid_argument on refusal.
Selection compute_plan(const CallSignature& call, std::optional<BackendId> policy, std::uint32_t supported,
                       const std::optional<std::vector<BackendId>>& supported_list) {
  Selection sel;
  if (policy) {
    std::vector<std::string> reasons = reasons_with_supported(*policy, call, supported, supported_list);
    if (!reasons.empty()) throw std::invalid_argument(join(reasons));
    sel.backend = *policy;
    return sel;
  }
  sel.source = Source::Auto;
  std::vector<std::string> refused;
  std::vector<BackendId> tried;
  if (auto entry = tuning_entry(tuning_bucket(call))) {
    // Measured backends that accept the call; among those within kMeasuredTie of the fastest (timing noise on one
    // shape of the bucket), the static rank decides, since it also holds for the bucket's other shapes.
    std::vector<std::pair<BackendId, double>> accepted;
    for (const auto& [id, ms] : *entry) {
      std::vector<std::string> reasons = reasons_with_supported(id, call, supported, supported_list);
      tried.push_back(id);
      if (reasons.empty()) accepted.emplace_back(id, ms);
      refused.insert(refused.end(), reasons.begin(), reasons.end());
    }
    if (!accepted.empty()) {
      const auto fastest = std::min_element(accepted.begin(), accepted.end(),
                                            [](const auto& a, const auto& b) { return a.second < b.second; });
      const auto rank_key = [&call](BackendId id) {
        const int rank = detail::auto_rank(id, call);
        return rank < 0 ? std::numeric_limits<int>::max() : rank;  // unranked backends lose ties
      };
      auto chosen = fastest;
      for (auto it = accepted.begin(); it != accepted.end(); ++it)
        if (it->second <= fastest->second * (1.0 + kMeasuredTie) && rank_key(it->first) < rank_key(chosen->first))
          chosen = it;
      sel.backend = chosen->first;
      sel.measured = true;
      sel.reasons = refused;
      sel.reasons.push_back(
          std::string(backend_name(chosen->first)) + ": automatic choice, " +
          (chosen == fastest ? "fastest measured for this call's bucket that accepts it (" + ms_text(chosen->second)
                             : "measured within 2% of the fastest (" + ms_text(chosen->second) + " vs " +
                                   std::string(backend_name(fastest->first)) + " " + ms_text(fastest->second) +
                                   ") and first of those in the static rank") +
          ", tuning table)");
      return sel;
    }
  }
  std::vector<std::pair<int, BackendId>> ranked;
  for (BackendId id : all_backends()) {
    if (std::find(tried.begin(), tried.end(), id) != tried.end()) continue;
    const int rank = detail::auto_rank(id, call);
    if (rank >= 0) ranked.emplace_back(rank, id);
  }
  std::stable_sort(ranked.begin(), ranked.end(), [](const auto& a, const auto& b) { return a.first < b.first; });
  for (const auto& [rank, id] : ranked) {
    std::vector<std::string> reasons = reasons_with_supported(id, call, supported, supported_list);
    if (reasons.empty()) {
      sel.backend = id;
      sel.reasons = refused;
      sel.reasons.push_back(std::string(backend_name(id)) + ": automatic choice, first that accepts the call in the "
                            "static rank (no tuning entry)");
      return sel;
    }
    refused.insert(refused.end(), reasons.begin(), reasons.end());
  }
  throw std::invalid_argument("no backend can run " + describe(call) +
                              (refused.empty() ? std::string(": no backend is registered on this device")
                                               : ": " + join(refused)));
}

std::uint32_t signature_flags(const CallSignature& c) {
  return static_cast<std::uint32_t>(c.dtype) | static_cast<std::uint32_t>(c.device) << 4 |
         static_cast<std::uint32_t>(c.mask) << 8 | std::uint32_t(c.mask_key_padding) << 12 |
         std::uint32_t(c.causal) << 13 | std::uint32_t(c.needs_grad) << 14 | std::uint32_t(c.needs_lse) << 15;
}

CacheKey cache_key(const CallSignature& call, std::optional<BackendId> policy, std::uint32_t supported) {
  return CacheKey{call.batch,
                  call.heads_q,
                  call.heads_kv,
                  call.seq_q,
                  call.seq_kv,
                  call.head_dim,
                  call.value_head_dim(),
                  signature_flags(call),
                  policy ? static_cast<int>(*policy) : -1,
                  supported,
                  detail::generation()};
}

// The cached plan's backend alone, if the plan is cached (the per-call path: no Selection copied).
std::optional<BackendId> cached_backend(const CallSignature& call, std::optional<BackendId> policy) {
  const CacheKey key = cache_key(call, policy, supported_mask(std::nullopt));
  Cache& c = cache();
  std::lock_guard<std::mutex> lock(c.mutex);
  auto it = c.entries.find(key);
  if (it == c.entries.end()) return std::nullopt;
  c.hits.fetch_add(1, std::memory_order_relaxed);
  return it->second.backend;
}

// Cached plan (the policy's decoration is added by the callers).
Selection cached_plan(const CallSignature& call, std::optional<BackendId> policy,
                      const std::optional<std::vector<BackendId>>& supported_list) {
  const std::uint32_t supported = supported_mask(supported_list);
  const CacheKey key = cache_key(call, policy, supported);
  Cache& c = cache();
  {
    std::lock_guard<std::mutex> lock(c.mutex);
    auto it = c.entries.find(key);
    if (it != c.entries.end()) {
      c.hits.fetch_add(1, std::memory_order_relaxed);
      return it->second;
    }
  }
  Selection sel = compute_plan(call, policy, supported, supported_list);  // refusals throw and are not cached
  std::lock_guard<std::mutex> lock(c.mutex);
  if (c.entries.size() >= kMaxCacheEntries) c.entries.clear();
  c.entries.emplace(key, sel);
  return sel;
}

std::string level_detail(Source source, const ComponentContext* ctx, Role role) {
  switch (source) {
    case Source::Explicit: return "chosen explicitly by the caller";
    case Source::Forced: return "forced globally (force_attention_backend)";
    case Source::Component:
      if (role != Role::None && ctx && ctx->role_backends[static_cast<int>(role) - 1])
        return "set for component '" + ctx->component + "." + std::string(role_name(role)) + "'";
      return "set for component '" + (ctx ? ctx->component : std::string()) + "'";
    case Source::Global: return "set by --attention-backend";
    case Source::Auto: return "automatic";
  }
  return "";
}

void check_call(const CallSignature& call) {
  if (call.head_dim <= 0)
    throw std::invalid_argument("attnsel: head_size must be positive, got " + std::to_string(call.head_dim));
  if (call.batch < 0 || call.heads_q <= 0 || call.heads_kv <= 0 || call.seq_q < 0 || call.seq_kv < 0 ||
      call.head_dim_v < 0)
    throw std::invalid_argument("attnsel: a call signature needs heads > 0 and non-negative sizes, got " +
                                describe(call));
}

// Policy + plan, with the decoration that says which level chose the backend.
Selection select(const CallSignature& call, std::optional<BackendId> selected, Role role,
                 const ComponentContext* ctx, const std::optional<std::vector<BackendId>>& supported,
                 const std::string& what) {
  check_call(call);
  const auto [policy, source] = resolve_policy(selected, role, ctx);
  Selection sel;
  try {
    sel = cached_plan(call, policy, supported);
  } catch (const std::invalid_argument& e) {
    if (!policy) throw std::invalid_argument(std::string("attnsel: ") + e.what());
    throw std::invalid_argument("attnsel: backend '" + std::string(backend_name(*policy)) + "' (" +
                                level_detail(source, ctx, role) + ") cannot run " + what + ": " + e.what());
  }
  sel.source = source;
  if (ctx) sel.component = ctx->component;
  if (policy) sel.reasons = {std::string(backend_name(*policy)) + ": " + level_detail(source, ctx, role)};
  return sel;
}

std::string describe_request(const SelectionRequest& r) {
  std::ostringstream os;
  os << "head_size=" << r.head_size << ", dtype=" << dtype_name(r.dtype) << ", device=" << device_name(r.device);
  return os.str();
}

// Half-octave bucket of a positive size: the smallest 2^(k/2), rounded, that is >= n.
std::int64_t half_octave(std::int64_t n) {
  if (n <= 1) return n < 0 ? 0 : n;
  const int k = static_cast<int>(std::ceil(2.0 * std::log2(static_cast<double>(n)) - 1e-9));
  return static_cast<std::int64_t>(std::llround(std::pow(2.0, k / 2.0)));
}

}  // namespace

std::pair<std::optional<BackendId>, Source> resolve_policy(std::optional<BackendId> selected, Role role,
                                                           const ComponentContext* ctx) {
  if (selected) return {selected, Source::Explicit};
  if (auto f = forced_backend()) return {f, Source::Forced};
  if (ctx) {
    if (role != Role::None) {
      if (auto r = ctx->role_backends[static_cast<int>(role) - 1]) return {r, Source::Component};
    }
    if (ctx->backend) return {ctx->backend, Source::Component};
  }
  if (auto g = global_backend()) return {g, Source::Global};
  return {std::nullopt, Source::Auto};
}

Selection select_backend_in(const SelectionRequest& request, const ComponentContext* context) {
  return select(detail::signature_of(request), request.selected, request.role, context, request.supported,
                describe_request(request));
}

Selection select_backend(const SelectionRequest& request) {
  const std::optional<ComponentContext> ctx = current_component();
  return select_backend_in(request, ctx ? &*ctx : nullptr);
}

Selection plan_call(const CallSignature& call, std::optional<BackendId> backend) {
  check_call(call);
  try {
    Selection sel = cached_plan(call, backend, std::nullopt);
    if (backend) {
      sel.source = Source::Explicit;
      sel.reasons = {std::string(backend_name(*backend)) + ": accepts the call"};
    }
    return sel;
  } catch (const std::invalid_argument& e) {
    if (!backend) throw std::invalid_argument(std::string("attnsel: ") + e.what());
    throw std::invalid_argument("attnsel: backend '" + std::string(backend_name(*backend)) + "' cannot run " +
                                describe(call) + ": " + e.what());
  }
}

BackendId plan_call_backend(const CallSignature& call, std::optional<BackendId> backend) {
  if (auto hit = cached_backend(call, backend)) return *hit;
  return plan_call(call, backend).backend;  // computes, caches, or throws with the full message
}

BackendId select_for_call_backend(const CallSignature& call, const ComponentContext* context) {
  const std::optional<BackendId> policy = resolve_policy(std::nullopt, Role::None, context).first;
  if (auto hit = cached_backend(call, policy)) return *hit;
  return select_for_call(call, context).backend;
}

Selection select_for_call(const CallSignature& call, const ComponentContext* context) {
  return select(call, std::nullopt, Role::None, context, std::nullopt, describe(call));
}

std::string tuning_bucket(const CallSignature& c) {
  std::ostringstream os;
  os << device_name(c.device) << "|" << dtype_name(c.dtype) << "|d" << c.head_dim << "/" << c.value_head_dim()
     << "|bh" << half_octave(c.batch * c.heads_q) << "|g" << (c.heads_kv > 0 ? c.heads_q / c.heads_kv : 0) << "|q"
     << half_octave(c.seq_q) << "|k" << half_octave(c.seq_kv)
     // CUDA: SDPA's kernels run key lengths off a multiple of 64 markedly slower (cuDNN 17-27% at head_dim 64 on an
     // H200) while ours loses ~5%, so a winner measured at an aligned length does not carry over to unaligned ones.
     << (c.device == DeviceType::CUDA && c.seq_kv % 64 != 0 ? "|kv-unaligned" : "") << "|" << mask_kind_name(c.mask)
     << (c.mask_key_padding ? "-kp" : "") << (c.causal ? "|causal" : "") << (c.needs_grad ? "|grad" : "");
  return os.str();
}

void set_tuning_entry(const std::string& bucket, std::vector<std::pair<BackendId, double>> milliseconds) {
  {
    std::lock_guard<std::mutex> lock(tuning().mutex);
    if (milliseconds.empty()) tuning().entries.erase(bucket);
    else tuning().entries[bucket] = std::move(milliseconds);
  }
  detail::bump_generation();
}

std::optional<std::vector<std::pair<BackendId, double>>> tuning_entry(const std::string& bucket) {
  std::lock_guard<std::mutex> lock(tuning().mutex);
  auto it = tuning().entries.find(bucket);
  if (it == tuning().entries.end()) return std::nullopt;
  return it->second;
}

void clear_tuning_table() {
  {
    std::lock_guard<std::mutex> lock(tuning().mutex);
    tuning().entries.clear();
  }
  detail::bump_generation();
}

std::size_t tuning_table_size() {
  std::lock_guard<std::mutex> lock(tuning().mutex);
  return tuning().entries.size();
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
