// Component context (per thread), forced backend and global flag (process-wide).
#include <atomic>
#include <utility>

#include "attnsel/attnsel.h"
#include "internal.h"

namespace attnsel {
namespace {

thread_local std::optional<ComponentContext> t_component;

// -1 = none; otherwise a BackendId value. Atomics: read on every selection, written rarely.
std::atomic<int> g_forced{-1};
std::atomic<int> g_global{-1};
std::atomic<std::uint64_t> g_generation{0};

int encode(std::optional<BackendId> id) { return id ? static_cast<int>(*id) : -1; }
std::optional<BackendId> decode(int v) {
  return v < 0 ? std::nullopt : std::optional<BackendId>(static_cast<BackendId>(v));
}

}  // namespace

namespace detail {
std::optional<ComponentContext> set_current_component(std::optional<ComponentContext> context) {
  return std::exchange(t_component, std::move(context));
}
std::optional<BackendId> set_forced_backend(std::optional<BackendId> backend) {
  return decode(g_forced.exchange(encode(backend), std::memory_order_acq_rel));
}
void bump_generation() { g_generation.fetch_add(1, std::memory_order_acq_rel); }
std::uint64_t generation() { return g_generation.load(std::memory_order_acquire); }
}  // namespace detail

std::optional<ComponentContext> current_component() { return t_component; }

ComponentScope::ComponentScope(std::string component, std::optional<BackendId> backend,
                               std::array<std::optional<BackendId>, kNumRoles> role_backends)
    : previous_(detail::set_current_component(ComponentContext{backend, std::move(component), false, role_backends})) {}

ComponentScope::~ComponentScope() { detail::set_current_component(std::move(previous_)); }

std::optional<BackendId> forced_backend() { return decode(g_forced.load(std::memory_order_acquire)); }

ForcedBackendScope::ForcedBackendScope(std::optional<BackendId> backend)
    : previous_(detail::set_forced_backend(backend)) {}

ForcedBackendScope::~ForcedBackendScope() { detail::set_forced_backend(previous_); }

void set_global_backend(std::optional<BackendId> backend) {
  g_global.store(encode(backend), std::memory_order_release);
}

std::optional<BackendId> global_backend() { return decode(g_global.load(std::memory_order_acquire)); }

}  // namespace attnsel
