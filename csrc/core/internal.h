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

// Whether the kernel layer prefers `native` for this request (set_native_preference).
bool native_preferred(const SelectionRequest& request);

// Capability facts changed: cached selections made before are stale.
void bump_generation();
std::uint64_t generation();

}  // namespace attnsel::detail
