"""Component context and the global forced backend (Python side).

A ContextVar holds the active component scope of the current thread *and* asyncio task, so tasks that share a
thread never see each other's component; selection from Python passes that view to the native selector. Entering or
leaving a scope also sets (not pushes) the native thread-local value to the task's view, so native code called from
synchronous Python sees the same scope. With interleaved asyncio tasks on one thread that native mirror is only as
exact as the last task to enter or leave; Python-side selection stays exact. New threads start with no component;
`ContextThreadPoolExecutor` / `run_with_context` carry the current scope into pool workers.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from . import _C
from .backends import Backend, to_backend


ROLES = ("cross", "self")


@dataclass(frozen=True)
class ComponentScope:
    """An active component scope: the component's name, its backend override (None = no override) and per-role
    overrides (`self` / `cross` -> backend), which outrank the component's for layers of that role."""

    component: str
    backend: Backend | None
    roles: tuple[tuple[str, Backend], ...] = ()
    # native_view(self), built once: what the native selector and thread-local value take.
    view: tuple = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        backend_id = None if self.backend is None else int(self.backend)
        by_role = dict(self.roles)
        role_ids = [None if by_role.get(r) is None else int(by_role[r]) for r in ("self", "cross")]
        object.__setattr__(self, "view", (backend_id, self.component, True, *role_ids))

    def role_backend(self, role: str | None) -> Backend | None:
        """The backend a layer of `role` gets from this scope (its role's override, else the component's)."""
        return dict(self.roles).get(role, self.backend) if role else self.backend


_SCOPE: contextvars.ContextVar[ComponentScope | None] = contextvars.ContextVar("attnsel_component_scope", default=None)


def native_view(scope: ComponentScope | None):
    """A Python scope as the native selector and thread-local value take it: (backend id, component, set_by_python)."""
    return None if scope is None else scope.view


def current_scope() -> ComponentScope | None:
    """The component scope this task sees: its own Python scope, else a scope a native caller entered on this thread."""
    scope = _SCOPE.get()
    if scope is not None:
        return scope
    native = _C.current_component()
    if native is not None and not native[2]:  # entered by C++ (attnsel::ComponentScope), not a Python mirror
        backend_id, component, _, self_id, cross_id = native
        roles = tuple((r, Backend(i)) for r, i in (("self", self_id), ("cross", cross_id)) if i is not None)
        return ComponentScope(component, None if backend_id is None else Backend(backend_id), roles)
    return None


def _sync_native(previous_native) -> None:
    """Mirror this task's view into the native thread-local value after leaving a scope."""
    scope = _SCOPE.get()
    if scope is not None:
        _C.set_current_component(native_view(scope))
    elif previous_native is not None and not previous_native[2]:
        _C.set_current_component(previous_native)  # a native caller's scope around us comes back
    else:
        _C.set_current_component(None)


@contextlib.contextmanager
def component_attention_backend(
    component: str, backend: str | Backend | None = None, roles: dict[str, str | Backend] | None = None
) -> Iterator[ComponentScope]:
    """Layers built inside get `backend` for `component` (unless an explicit or forced backend outranks it);
    `roles` ({"self": ..., "cross": ...}) gives layers of that role their own backend, ahead of `backend`."""
    if not isinstance(component, str) or not component.strip():
        raise ValueError(f"component name must be a non-empty string, got {component!r}")
    role_items = []
    for role, role_backend in (roles or {}).items():
        if role not in ROLES:
            raise ValueError(f"role {role!r} is not one of {list(ROLES)}")
        if role_backend is not None:
            role_items.append((role, to_backend(role_backend)))
    scope = ComponentScope(component, None if backend is None else to_backend(backend), tuple(sorted(role_items)))
    token = _SCOPE.set(scope)
    previous_native = _C.set_current_component(native_view(scope))
    try:
        yield scope
    finally:
        _SCOPE.reset(token)
        _sync_native(previous_native)


@contextlib.contextmanager
def force_attention_backend(backend: str | Backend | None) -> Iterator[Backend | None]:
    """Process-wide forced backend (outranks component contexts); None lifts forcing inside the block."""
    forced = None if backend is None else to_backend(backend)
    previous = _C.set_forced_backend(None if forced is None else int(forced))
    try:
        yield forced
    finally:
        _C.set_forced_backend(previous)


def get_forced_attn_backend() -> Backend | None:
    """The process-wide forced backend, if any."""
    value = _C.forced_backend()
    return None if value is None else Backend(value)


def get_component_forced_attn_backend() -> Backend | None:
    """The backend the active component scope sets (None outside a scope or for a scope without override)."""
    scope = current_scope()
    return None if scope is None else scope.backend


def get_component_attn_backend_name() -> str | None:
    """The name of the active component, or None."""
    scope = current_scope()
    return None if scope is None else scope.component


def run_with_context(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap `fn` so it runs, in any thread, with the component scope that is active now."""
    ctx = contextvars.copy_context()
    scope = current_scope()

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        def call() -> Any:
            token = _SCOPE.set(scope)
            previous_native = _C.set_current_component(native_view(scope))
            try:
                return fn(*args, **kwargs)
            finally:
                _SCOPE.reset(token)
                _C.set_current_component(previous_native)

        return ctx.copy().run(call)  # a fresh copy per call: one Context cannot be entered by two threads

    return wrapper


class ContextThreadPoolExecutor(ThreadPoolExecutor):
    """A ThreadPoolExecutor whose tasks see the component scope active at submit time."""

    def submit(self, fn, /, *args, **kwargs):  # type: ignore[override]
        return super().submit(run_with_context(fn), *args, **kwargs)
