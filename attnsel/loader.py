"""Component loading: build each pipeline component inside its attention-backend scope.

`attnsel.nn.Attention` picks its backend when it is constructed, so the per-component override only has to be
active while the component is built: the loader resolves the component's backend from the config
(`AttentionConfig.resolve_component_backend`, whose lookup rules -- `-` == `_`, case-sensitive, first match wins,
`text_encoder_2` falls back to `text_encoder` -- live in `attnsel.config`) and wraps construction in
`attnsel.component_attention_backend(component, backend)`.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

from torch import nn

from . import _C
from .backends import Backend
from .context import ROLES, component_attention_backend
from .nn import Attention


def _get_config():
    from .config import get_config  # late: config is optional at import time

    return get_config()


@contextlib.contextmanager
def using_config(config) -> Iterator[Any]:
    """Make `config` the active one while loading (its --attention-backend reaches the native core), then restore.

    With `config=None` (or the active config itself) nothing changes.
    """
    from .config import get_config, set_config

    previous = get_config()
    if config is None or config is previous:
        yield previous
        return
    previous_native = _C.global_backend()
    set_config(config)
    try:
        yield config
    finally:
        set_config(previous)
        _C.set_global_backend(previous_native)  # in case the previous config was never pushed natively


def attention_layers(module: Any) -> list[tuple[str, Attention]]:
    """Every `attnsel.nn.Attention` in `module`, with its qualified name (empty for a bare Attention)."""
    if not isinstance(module, nn.Module):
        return []
    return [(name, m) for name, m in module.named_modules() if isinstance(m, Attention)]


@dataclass
class LoadedComponent:
    """What loading one component did: which override applied, which backend each layer got, and why."""

    name: str
    module: Any
    kind: str  # "native" (embedded model) or "customized" (user factory)
    requested_backend: Backend | None  # the component override resolved from the config, if any
    matched_key: str | None  # the config key that supplied it (e.g. "text_encoder" for "text_encoder_2")
    load_seconds: float
    layers: list[tuple[str, Attention]] = field(default_factory=list)
    run_seconds: float = 0.0
    roles: dict[str, Backend] = field(default_factory=dict)  # role overrides resolved from the config (role keys)

    @property
    def backend_counts(self) -> Counter:
        """Backend -> number of layers that use it."""
        return Counter(layer.backend for _, layer in self.layers)

    @property
    def source_counts(self) -> Counter:
        """Priority level ("explicit"/"forced"/"component"/"global"/"auto") -> number of layers it chose."""
        return Counter(layer.selection.source for _, layer in self.layers)

    @property
    def override_applied(self) -> int:
        """How many layers took their backend from this component's override."""
        return sum(1 for _, layer in self.layers if layer.selection.source == "component")

    def describe_backends(self) -> str:
        if not self.layers:
            return "no attention layers"
        if self.roles:  # role keys applied: say which role got which backend
            by_role = _ordered(Counter((layer.backend, layer.role or "-") for _, layer in self.layers))
            return ", ".join(f"{b.name.lower()} ({n} {role} layer{'s' if n != 1 else ''})" for (b, role), n in by_role)
        counts = _ordered(self.backend_counts)
        return ", ".join(f"{b.name.lower()} ({n} layer{'s' if n != 1 else ''})" for b, n in counts)

    def describe_sources(self) -> str:
        """The level(s) that chose, e.g. "component 'vae' (override vae=torch_sdpa)" or "auto"."""
        if not self.layers:
            return "-"
        parts = []
        for source, n in _ordered(self.source_counts):
            text = source
            if source == "component":
                overrides = [f"{self.matched_key}={self.requested_backend.name.lower()}"] if self.matched_key else []
                overrides += [f"{self.name}.{role}={b.name.lower()}" for role, b in sorted(self.roles.items())]
                via = f" via '{self.matched_key}'" if self.matched_key and self.matched_key != self.name else ""
                text = f"component '{self.name}'{via} ({', '.join(overrides)})"
            elif source == "global":
                text = "global (--attention-backend)"
            elif source == "forced":
                text = "forced (force_attention_backend)"
            elif source == "explicit":
                text = "explicit (layer argument)"
            if len(self.source_counts) > 1:
                text += f" x{n}"
            parts.append(text)
        return ", ".join(parts)

    def reasons(self) -> list[str]:
        """The selection reasons of every layer, de-duplicated, in order."""
        seen: dict[str, None] = {}
        for _, layer in self.layers:
            for reason in layer.selection.reasons:
                seen.setdefault(reason, None)
        return list(seen)


def _ordered(counter: Counter) -> list[tuple[Any, int]]:
    return sorted(counter.items(), key=lambda kv: (-kv[1], str(kv[0])))


def _resolve_factory(factory: Any) -> Callable[..., Any]:
    """A callable from a class/function, or from a "package.module:attr" string."""
    if isinstance(factory, str):
        module_name, sep, attr = factory.partition(":")
        if not sep or not module_name or not attr:
            raise ValueError(f"customized component factory must look like 'package.module:Class', got {factory!r}")
        obj: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
        factory = obj
    if not callable(factory):
        raise TypeError(f"component factory must be callable (a class or function), got {type(factory).__name__}")
    return factory


def native_factory(component_name: str) -> Callable[..., Any]:
    """The embedded model for a component name; `text_encoder_2` builds another `text_encoder`."""
    from .config import numbered_component_base
    from .models import NATIVE_COMPONENTS

    name = component_name.replace("-", "_")
    base = numbered_component_base(name) or name
    if base not in NATIVE_COMPONENTS:
        raise ValueError(
            f"no embedded model for component {component_name!r}; embedded components: {', '.join(NATIVE_COMPONENTS)}"
        )
    # A numbered copy gets its own weights (seeded by its own name), not a clone of the first one.
    return NATIVE_COMPONENTS[base] if name == base else functools.partial(NATIVE_COMPONENTS[base], seed_name=name)


class ComponentLoader:
    """Builds components inside their attention-backend scope and records what each layer chose.

    `config` defaults to `attnsel.get_config()` at load time. `records` maps component name -> `LoadedComponent`.
    """

    def __init__(self, config=None):
        self._config = config
        self.records: dict[str, LoadedComponent] = {}

    @property
    def config(self):
        return self._config if self._config is not None else _get_config()

    def resolve(self, component_name: str, family: Iterable[str] = ()) -> tuple[Backend | None, str | None]:
        """(backend, matched config key) for a component; `family` lists further names to try, in order."""
        return self.config.resolve_component_backend(component_name, *family)

    def resolve_roles(self, component_name: str, family: Iterable[str] = (),
                      component_key: str | None = None) -> dict[str, Backend]:
        """Role-specific backends (`transformer.cross=...`) for a component: role -> backend, where a role key
        matched (layers of other roles get the component's backend)."""
        roles: dict[str, Backend] = {}
        for role in ROLES:
            for name in (component_name, *family):
                backend, key = self.config.resolve(name, role)
                if key is not None and key != component_key and "." in key:
                    roles[role] = backend
                    break
        return roles

    def load_native(self, component_name: str, factory: Callable[..., Any] | None = None, *args: Any,
                    family: Iterable[str] = (), **kwargs: Any) -> Any:
        """Build an embedded model (`factory` defaults to the one for `component_name`) in the component scope."""
        factory = native_factory(component_name) if factory is None else factory
        return self._load(component_name, factory, "native", family, args, kwargs)

    def load_customized(self, component_name: str, factory: Callable[..., Any] | str, *args: Any,
                        family: Iterable[str] = (), **kwargs: Any) -> Any:
        """Build a user-supplied component (a class, a function, or "package.module:Class") in the component scope."""
        return self._load(component_name, _resolve_factory(factory), "customized", family, args, kwargs)

    def _load(self, component_name: str, factory: Callable[..., Any], kind: str, family: Iterable[str],
              args: tuple, kwargs: dict) -> Any:
        if not isinstance(component_name, str) or not component_name.strip():
            raise ValueError(f"component name must be a non-empty string, got {component_name!r}")
        with using_config(self._config):
            backend, matched_key = self.resolve(component_name, tuple(family))
            roles = self.resolve_roles(component_name, tuple(family), matched_key)
            start = time.perf_counter()
            with component_attention_backend(component_name, backend, roles=roles):
                try:
                    module = factory(*args, **kwargs)
                except ValueError as exc:  # e.g. a backend that cannot run here: say which component asked
                    message = str(exc).removeprefix("attnsel: ")
                    raise ValueError(f"component {component_name!r}: {message}") from exc
            elapsed = time.perf_counter() - start
        self.records[component_name] = LoadedComponent(
            name=component_name,
            module=module,
            kind=kind,
            requested_backend=backend,
            matched_key=matched_key,
            load_seconds=elapsed,
            layers=attention_layers(module),
            roles=roles,
        )
        return module
