"""Backend names: the `Backend` enum and name normalisation. The native registry is the source of truth."""

from __future__ import annotations

import enum

from . import _C

_NAMES: list[str] = list(_C.backend_names())
_ALIASES: dict[str, str] = dict(_C.backend_aliases())
# A pure-Python mirror of the native lookup, so normalisation also traces under torch.compile.
_LOOKUP: dict[str, str] = {**{n: n for n in _NAMES}, **_ALIASES}

# Upper-case members in native id order; `.value` is the native backend id, `.name.lower()` the canonical name.
Backend = enum.IntEnum("Backend", {name.upper(): i for i, name in enumerate(_NAMES)})
Backend.__doc__ = "Every attention backend attnsel knows (runnable here or not)."
Backend.__str__ = lambda self: self.name.lower()  # type: ignore[assignment]


def backend_names() -> list[str]:
    """Canonical names, in native id order."""
    return list(_NAMES)


def backend_aliases() -> dict[str, str]:
    """Alias -> canonical name (e.g. fa3 -> fa)."""
    return dict(_ALIASES)


def valid_options() -> str:
    aliases = ", ".join(f"{a} (= {t})" for a, t in sorted(_ALIASES.items()))
    return f"{', '.join(_NAMES)}; aliases: {aliases}"


def normalize_backend_name(name: object) -> str:
    """Canonical lower-case name of a backend: strips and ignores whitespace, ignores case, resolves aliases."""
    if isinstance(name, Backend):
        return name.name.lower()
    if not isinstance(name, str):
        raise ValueError(f"attention backend name must be a string, got {type(name).__name__}: {name!r}")
    found = _LOOKUP.get("".join(name.split()).lower())
    if found is None:
        raise ValueError(f"unknown attention backend {name!r}; valid options: {valid_options()}")
    return found


def to_backend(value: object) -> Backend:
    """A `Backend` from a member or a (possibly aliased) name."""
    if isinstance(value, Backend):
        return value
    return Backend[normalize_backend_name(value).upper()]
