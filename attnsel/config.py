"""Attention configuration: the global backend and per-component backends, from code, CLI, environment or a file.

Forms
-----
* ``--attention-backend NAME``: the global backend (any name or alias, e.g. ``fa3`` -> ``fa``).
* ``--component-attention-backends VALUE``: ``text-encoder=fa3,vae=torch_sdpa`` or a JSON object
  ``{"text-encoder": "fa3"}``.
* ``--component-attention-backends.text-encoder fa3`` / ``--component-attention-backends.vae=torch_sdpa``:
  one component per flag.
* ``--config FILE``: JSON or TOML with the keys ``attention_backend`` and ``component_attention_backends``
  (``-`` spellings accepted too; the components may be a string, an object or a TOML table).
* Environment: ``ATTNSEL_ATTENTION_BACKEND`` and ``ATTNSEL_COMPONENT_ATTENTION_BACKENDS`` (same formats as the flags).

Component keys are stripped and ``-`` becomes ``_`` (case is kept); backend names are normalised with
:func:`attnsel.backends.normalize_backend_name`. Repeated component flags merge, the later one winning per
component; the same component twice within ONE value is an error.

Precedence: command line > environment > config file. The component maps merge per key in that order
(file, then environment, then command line).

:func:`set_config` makes a config the process-wide one and pushes its global backend into the native core.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from . import _C
from .backends import Backend, normalize_backend_name, to_backend

__all__ = [
    "AttentionConfig",
    "ENV_ATTENTION_BACKEND",
    "ENV_COMPONENT_ATTENTION_BACKENDS",
    "get_config",
    "parse_component_backends",
    "set_config",
]

ENV_ATTENTION_BACKEND = "ATTNSEL_ATTENTION_BACKEND"
ENV_COMPONENT_ATTENTION_BACKENDS = "ATTNSEL_COMPONENT_ATTENTION_BACKENDS"

_FLAG_BACKEND = "--attention-backend"
_FLAG_COMPONENTS = "--component-attention-backends"
_FLAG_CONFIG = "--config"
_OUR_FLAGS = (_FLAG_BACKEND, _FLAG_COMPONENTS, _FLAG_CONFIG)
_DOTTED_PREFIX = _FLAG_COMPONENTS + "."

# Accepted config-file keys -> canonical key.
_FILE_KEYS = {
    "attention_backend": "attention_backend",
    "attention-backend": "attention_backend",
    "component_attention_backends": "component_attention_backends",
    "component-attention-backends": "component_attention_backends",
}


# --------------------------------------------------------------------------------------------------------------
# Value parsing
# --------------------------------------------------------------------------------------------------------------


def _normalize_key(key: object) -> str:
    if not isinstance(key, str):
        raise ValueError(f"component key must be a string, got {type(key).__name__}: {key!r}")
    normalized = key.strip().replace("-", "_")
    if not normalized:
        raise ValueError(f"component key must not be empty (got {key!r})")
    return normalized


def _normalize_entries(pairs: Iterable[tuple[object, object]]) -> dict[str, str]:
    """Normalise (key, backend) pairs; a key given twice (also after normalisation) is an error."""
    result: dict[str, str] = {}
    spelled: dict[str, object] = {}
    for key, value in pairs:
        normalized = _normalize_key(key)
        if normalized in result:
            raise ValueError(
                f"component {normalized!r} is given twice: as {spelled[normalized]!r} and as {key!r}"
            )
        try:
            result[normalized] = normalize_backend_name(value)
        except ValueError as err:
            raise ValueError(f"component {key!r}: {err}") from None
        spelled[normalized] = key
    return result


def _unique_keys_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # json.loads would silently keep only the last of duplicate keys.
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise ValueError(f"key {key!r} is given twice in a JSON object")
        seen[key] = value
    return seen


def _parse_json_object(text: str) -> dict[str, str]:
    try:
        data = json.loads(text, object_pairs_hook=_unique_keys_object)
    except json.JSONDecodeError as err:
        raise ValueError(f"invalid JSON for component attention backends: {err}") from None
    if not isinstance(data, dict):
        raise ValueError(
            f"component attention backends in JSON must be an object like {{\"vae\": \"fa\"}}, got {text!r}"
        )
    return _normalize_entries(data.items())


def parse_component_backends(value: object) -> dict[str, str]:
    """Parse per-component backends into ``{component_key: canonical_backend_name}``.

    ``value`` is None (-> ``{}``), a mapping, a ``component=backend[,component=backend...]`` string or a JSON
    object string. Raises ValueError on anything malformed.
    """
    if value is None:
        return {}
    if isinstance(value, Mapping):
        return _normalize_entries(value.items())
    if not isinstance(value, str):
        raise ValueError(
            "component attention backends must be a dict, a 'component=backend,...' string or a JSON object, "
            f"got {type(value).__name__}: {value!r}"
        )
    text = value.strip()
    if not text:
        return {}
    if text[0] in "{[\"":
        return _parse_json_object(text)
    pairs = []
    for entry in text.split(","):
        entry = entry.strip()
        if not entry:
            continue  # tolerate "a=fa,,b=fa2" and a trailing comma
        if "=" not in entry:
            raise ValueError(f"component attention backend entries must be 'component=backend', got {entry!r}")
        key, backend = entry.split("=", 1)
        pairs.append((key, backend.strip()))
    return _normalize_entries(pairs)


def _normalize_global(value: object) -> str | None:
    if value is None:
        return None
    return normalize_backend_name(value)


# --------------------------------------------------------------------------------------------------------------
# Config files and environment
# --------------------------------------------------------------------------------------------------------------


def _load_toml(text: str) -> dict:
    try:
        import tomllib  # Python 3.11+
    except ImportError:  # pragma: no cover - Python 3.10
        try:
            import tomli as tomllib  # type: ignore[no-redef]
        except ImportError:
            raise ValueError("reading a TOML config needs Python 3.11+ or the 'tomli' package") from None
    return tomllib.loads(text)


def _read_config_file(path: str) -> tuple[str | None, dict[str, str]]:
    """(attention_backend, component backends) from a JSON or TOML file; errors name the file."""
    source = f"config file {path!r}"
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as err:
        raise ValueError(f"{source}: cannot read: {err.strerror or err}") from None

    lower = path.lower()
    try:
        if lower.endswith(".toml"):
            data = _load_toml(text)
        elif lower.endswith(".json"):
            data = json.loads(text, object_pairs_hook=_unique_keys_object)
        else:  # no telling suffix: JSON first, then TOML
            try:
                data = json.loads(text, object_pairs_hook=_unique_keys_object)
            except json.JSONDecodeError:
                data = _load_toml(text)
    except ValueError as err:  # JSONDecodeError and TOMLDecodeError are ValueErrors
        raise ValueError(f"{source}: not valid JSON or TOML: {err}") from None

    if not isinstance(data, dict):
        raise ValueError(f"{source}: must hold an object/table, got {type(data).__name__}")
    found: dict[str, tuple[str, Any]] = {}
    for key, value in data.items():
        canonical = _FILE_KEYS.get(key)
        if canonical is None:
            raise ValueError(f"{source}: unknown key {key!r}; expected attention_backend and/or component_attention_backends")
        if canonical in found:
            raise ValueError(f"{source}: {canonical} is given twice: as {found[canonical][0]!r} and as {key!r}")
        found[canonical] = (key, value)

    try:
        backend = _normalize_global(found.get("attention_backend", (None, None))[1])
        components = parse_component_backends(found.get("component_attention_backends", (None, None))[1])
    except ValueError as err:
        raise ValueError(f"{source}: {err}") from None
    return backend, components


def _read_env() -> tuple[str | None, dict[str, str]]:
    backend: str | None = None
    raw = os.environ.get(ENV_ATTENTION_BACKEND)
    if raw is not None and raw.strip():  # set-but-empty counts as unset
        try:
            backend = normalize_backend_name(raw)
        except ValueError as err:
            raise ValueError(f"{ENV_ATTENTION_BACKEND}: {err}") from None
    try:
        components = parse_component_backends(os.environ.get(ENV_COMPONENT_ATTENTION_BACKENDS))
    except ValueError as err:
        raise ValueError(f"{ENV_COMPONENT_ATTENTION_BACKENDS}: {err}") from None
    return backend, components


# --------------------------------------------------------------------------------------------------------------
# argparse plumbing
# --------------------------------------------------------------------------------------------------------------


def _backend_type(value: str) -> str:
    try:
        return normalize_backend_name(value)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _components_type(value: str) -> dict[str, str]:
    try:
        return parse_component_backends(value)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _config_file_type(value: str) -> str:
    # Validate at parse time so a bad file is an argparse error; from_cli_args reads it again.
    try:
        _read_config_file(value)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return value


class _MergeComponentsAction(argparse.Action):
    """Each occurrence merges into the dict collected so far; the later occurrence wins per component."""

    def __call__(self, parser, namespace, values, option_string=None):
        merged = dict(getattr(namespace, self.dest, None) or {})  # copy: never mutate a default
        merged.update(values)
        setattr(namespace, self.dest, merged)


class _RaisingArgumentParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors raise ValueError (one line) instead of printing usage and exiting."""

    def error(self, message):  # noqa: D401 - argparse API
        raise ValueError(message)


def _fail(parser: argparse.ArgumentParser, message: str):
    # Match how the parser reports its own errors: exit_on_error=False parsers raise ArgumentError.
    if getattr(parser, "exit_on_error", True) or isinstance(parser, _RaisingArgumentParser):
        parser.error(message)
    raise argparse.ArgumentError(None, message)


def _rewrite_args(parser: argparse.ArgumentParser, args: list[str]) -> list[str]:
    """Turn dotted component flags into the merging flag; reject abbreviations of our flags."""
    check_abbrev = getattr(parser, "allow_abbrev", True) or isinstance(parser, _RaisingArgumentParser)
    known = parser._option_string_actions  # exact option strings of this parser
    out: list[str] = []
    i = 0
    while i < len(args):
        token = args[i]
        i += 1
        if not isinstance(token, str) or token == "--":
            out.append(token)
            if token == "--":
                out.extend(args[i:])  # everything after "--" is positional: leave it alone
                break
            continue
        if token.startswith(_DOTTED_PREFIX):
            flag, eq, value = token.partition("=")
            if not eq:
                if i >= len(args) or not isinstance(args[i], str) or args[i].startswith("-"):
                    _fail(parser, f"argument {flag}: expected one argument (a backend name)")
                value = args[i]
                i += 1
            key = flag[len(_DOTTED_PREFIX):]
            # JSON keeps the key/value exact (no splitting on ',' or '='); the key's spelling is kept for errors.
            out.append(f"{_FLAG_COMPONENTS}={json.dumps({key: value})}")
            continue
        if check_abbrev and token.startswith("--"):
            name = token.split("=", 1)[0]
            if name not in known and len(name) > 2:
                meant = [flag for flag in _OUR_FLAGS if flag.startswith(name)]
                if meant:
                    _fail(parser, f"abbreviated option {name} is not accepted; write it in full: {' or '.join(meant)}")
        out.append(token)
    return out


def _install_rewriter(parser: argparse.ArgumentParser) -> None:
    # Dotted flags are dynamic, so argparse cannot declare them: wrap the instance's public entry points
    # (parse_args and the subparser action both go through parse_known_args) to rewrite argv first.
    if getattr(parser, "_attnsel_rewriter_installed", False):
        return
    for method_name in ("parse_known_args", "parse_known_intermixed_args"):
        original = getattr(parser, method_name, None)
        if original is None:
            continue

        def wrapped(args=None, namespace=None, _original=original):
            if args is None:
                args = sys.argv[1:]
            return _original(_rewrite_args(parser, list(args)), namespace)

        setattr(parser, method_name, wrapped)
    parser._attnsel_rewriter_installed = True


# --------------------------------------------------------------------------------------------------------------
# The config
# --------------------------------------------------------------------------------------------------------------


@dataclass
class AttentionConfig:
    """The global attention backend (canonical name or None) and per-component backends (key -> canonical name)."""

    attention_backend: str | None = None
    component_attention_backends: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.attention_backend = _normalize_global(self.attention_backend)
        self.component_attention_backends = parse_component_backends(self.component_attention_backends)

    # ---- command line ----------------------------------------------------------------------------------------

    @staticmethod
    def add_cli_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        """Add the attention flags to ``parser`` (an ArgumentParser or a subparser) and return it.

        Also hooks ``parser.parse_known_args`` (on this instance) so that the dotted
        ``--component-attention-backends.<component> NAME`` flags work and abbreviations of these flags are refused.
        """
        group = parser.add_argument_group("attention backends")
        group.add_argument(
            _FLAG_BACKEND, dest="attention_backend", metavar="NAME", type=_backend_type, default=None,
            help="global attention backend (e.g. fa, fa3, torch_sdpa); overrides $" + ENV_ATTENTION_BACKEND,
        )
        group.add_argument(
            _FLAG_COMPONENTS, dest="component_attention_backends", metavar="VALUE", type=_components_type,
            action=_MergeComponentsAction, default=None,
            help="per-component backends: 'text-encoder=fa3,vae=torch_sdpa' or a JSON object; also "
            f"{_DOTTED_PREFIX}<component> NAME; repeatable, the later flag wins per component",
        )
        group.add_argument(
            _FLAG_CONFIG, dest="config", metavar="FILE", type=_config_file_type, default=None,
            help="JSON or TOML file with attention_backend / component_attention_backends "
            "(command line > environment > file)",
        )
        _install_rewriter(parser)
        return parser

    @classmethod
    def from_cli_args(cls, namespace: argparse.Namespace) -> "AttentionConfig":
        """The config from parsed flags, the environment and the config file (command line > env > file)."""
        file_backend: str | None = None
        file_components: dict[str, str] = {}
        config_path = getattr(namespace, "config", None)
        if config_path is not None:
            file_backend, file_components = _read_config_file(os.fspath(config_path))

        env_backend, env_components = _read_env()

        # Namespaces built by hand may hold raw values: normalise them too.
        try:
            cli_backend = _normalize_global(getattr(namespace, "attention_backend", None))
        except ValueError as err:
            raise ValueError(f"{_FLAG_BACKEND}: {err}") from None
        try:
            cli_components = parse_component_backends(getattr(namespace, "component_attention_backends", None))
        except ValueError as err:
            raise ValueError(f"{_FLAG_COMPONENTS}: {err}") from None

        backend = next((b for b in (cli_backend, env_backend, file_backend) if b is not None), None)
        components = {**file_components, **env_components, **cli_components}
        return cls(attention_backend=backend, component_attention_backends=components)

    @classmethod
    def from_cli(cls, argv: list[str] | None = None) -> "AttentionConfig":
        """Parse ``argv`` (default ``sys.argv[1:]``); every argument must be one of ours. Errors raise ValueError."""
        parser = _RaisingArgumentParser(
            prog="attnsel", description="attention backend configuration", allow_abbrev=False
        )
        cls.add_cli_args(parser)
        return cls.from_cli_args(parser.parse_args(argv))

    # ---- lookup ---------------------------------------------------------------------------------------------

    def resolve_component_backend(self, *names: str | None) -> tuple[Backend | None, str | None]:
        """(backend, matched key) for the first name with a configured backend, else (None, None).

        Names are stripped and ``-`` becomes ``_`` (case-sensitive); None names are skipped. A name ending in
        ``_2`` (e.g. ``text_encoder_2``) falls back to the name without it.
        """
        table = self.component_attention_backends
        for name in names:
            if name is None:
                continue
            if not isinstance(name, str):
                raise ValueError(f"component name must be a string or None, got {type(name).__name__}: {name!r}")
            key = name.strip().replace("-", "_")
            if not key:
                continue
            candidates = [key]
            if key.endswith("_2") and len(key) > 2:
                candidates.append(key[:-2])
            for candidate in candidates:
                if candidate in table:
                    return to_backend(table[candidate]), candidate
        return None, None


# --------------------------------------------------------------------------------------------------------------
# Process-wide current config
# --------------------------------------------------------------------------------------------------------------

_lock = threading.Lock()
_current = AttentionConfig()


def set_config(config: AttentionConfig | None) -> None:
    """Make ``config`` the process-wide config (None: the default) and push its global backend to the native core."""
    global _current
    if config is None:
        config = AttentionConfig()
    elif not isinstance(config, AttentionConfig):
        raise ValueError(f"set_config expects an AttentionConfig or None, got {type(config).__name__}")
    native_id = None if config.attention_backend is None else int(to_backend(config.attention_backend))
    with _lock:
        _C.set_global_backend(native_id)  # native first: if it refuses, the Python side stays unchanged
        _current = config


def get_config() -> AttentionConfig:
    """The process-wide config (an ``AttentionConfig()`` until :func:`set_config` is called)."""
    with _lock:
        return _current
