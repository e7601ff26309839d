// Core internals shared by the core's translation units and the Python bindings (not installed).
#pragma once

#include <cstdint>
#include <optional>

#include "attnsel/attnsel.h"

namespace attnsel::detail {

// Replaces this thread's component context (no nesting bookkeeping) and returns the previous one.
// Python scopes use this to mirror a task's context into the native thread-local value.
std::optional<ComponentContext> set_current_component(std::optional<ComponentContext> context);

// Replaces the forced backend and returns the previous one (Python scopes; C++ uses ForcedBackendScope).
std::optional<BackendId> set_forced_backend(std::optional<BackendId> backend);

// The static rank of `id` for `call` under `auto` (lower first; < 0 = not ranked).
int auto_rank(BackendId id, const CallSignature& call);

// What a policy-time request knows, as a signature (a one-token call without mask).
CallSignature signature_of(const SelectionRequest& request);

// Registry or tuning facts changed: cached plans made before are stale.
void bump_generation();
std::uint64_t generation();

}  // namespace attnsel::detail
