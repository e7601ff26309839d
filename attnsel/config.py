"""Attention configuration: the global backend and per-component backends, from code, CLI, environment or a file.

Forms
-----
* ``--attention-backend NAME``: the global backend (any name or alias, e.g. ``fa3`` -> ``fa``).
* ``--component-attention-backends VALUE``: ``text-encoder=fa3,transformer.cross=torch_sdpa`` or a JSON object
  ``{"text-encoder": "fa3", "transformer.cross": "torch_sdpa"}``.
* ``--component-attention-backends.text-encoder fa3`` / ``--component-attention-backends.transformer.cross=fa``:
  one key per flag.
* Underscore spellings are accepted too: ``--attention_backend``, ``--component_attention_backends`` and
  ``--component_attention_backends.<key>``.
* ``--config FILE``: JSON or TOML with the keys ``attention_backend`` and ``component_attention_backends``
  (``-`` spellings accepted too; the components may be a string, an object or a TOML table, and a component's
  value may be a table of roles: ``[component_attention_backends.transformer]`` ``cross = "fa"``).
* Environment: ``ATTNSEL_ATTENTION_BACKEND`` and ``ATTNSEL_COMPONENT_ATTENTION_BACKENDS`` (same formats as the flags).

Keys are ``component`` or ``component.role``. The component part is stripped and ``-`` becomes ``_`` (case is
kept: component names are the pipeline's own identifiers); the role part is stripped and lower-cased (a fixed
vocabulary, like backend names) and must be one of :data:`ROLES` (``cross``, ``self``). Backend names are
normalised with :func:`attnsel.backends.normalize_backend_name`. Repeated component flags merge, the later one
winning per key; the same key twice within ONE value is an error.

Precedence: command line > environment > config file. The component maps merge per key in that order
(file, then environment, then command line). A layer of component C with role R resolves to the first of
``C.R``, ``C``, and for a numbered component (``text_encoder_2``) ``text_encoder.R``, ``text_encoder``
(:meth:`AttentionConfig.resolve`).

Every bad input is a ValueError with one line (never a TypeError, RecursionError or an interpreter exit):
``AttentionConfig.from_cli`` raises :class:`HelpRequested` (a ValueError carrying the help text) for ``-h``.

:func:`set_config` makes a config the process-wide one and pushes its global backend into the native core.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import reprlib
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
    "HelpRequested",
    "ROLES",
    "get_config",
    "numbered_component_base",
    "parse_component_backends",
    "set_config",
    "split_component_key",
]

ENV_ATTENTION_BACKEND = "ATTNSEL_ATTENTION_BACKEND"
ENV_COMPONENT_ATTENTION_BACKENDS = "ATTNSEL_COMPONENT_ATTENTION_BACKENDS"

# The roles an attention layer can have; a component key may name one (``transformer.cross``).
ROLES = ("cross", "self")

_FLAG_BACKEND = "--attention-backend"
_FLAG_COMPONENTS = "--component-attention-backends"
_FLAG_CONFIG = "--config"
_OUR_FLAGS = (_FLAG_BACKEND, _FLAG_COMPONENTS, _FLAG_CONFIG)
_DOTTED_PREFIX = _FLAG_COMPONENTS + "."
# sglang also accepts the underscore spellings: --attention_backend, --component_attention_backends(.<key>).
_UNDERSCORE_FLAGS = {"--attention_backend": _FLAG_BACKEND, "--component_attention_backends": _FLAG_COMPONENTS}
_UNDERSCORE_DOTTED_PREFIX = "--component_attention_backends."

_NUMBERED = re.compile(r"(.+)_[0-9]+")  # text_encoder_2 -> text_encoder
_MAX_CONFIG_BYTES = 1 << 20  # a config file is a few lines; refuse e.g. /dev/zero instead of reading forever

_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 120

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


def _short(value: object) -> str:
    """A bounded one-line repr for error messages (safe on huge or deeply nested values)."""
    return _REPR.repr(value)


def _component_part(text: str, key: object) -> str:
    component = text.strip().replace("-", "_")
    if not component:
        raise ValueError(f"component key must not be empty (got {_short(key)})")
    return component


def _role_part(text: object, key: object) -> str:
    if not isinstance(text, str):
        raise ValueError(f"component key {_short(key)}: role must be a string, got {type(text).__name__}")
    role = text.strip().lower()
    if role not in ROLES:
        raise ValueError(f"component key {_short(key)}: role {text.strip()!r} not in {list(ROLES)}")
    return role


def split_component_key(key: object) -> tuple[str, str | None]:
    """``(component, role or None)`` of a key such as ``text-encoder`` or ``transformer.cross``.

    The component part is stripped and ``-`` becomes ``_`` (case kept); the role part is stripped and lower-cased
    and must be one of :data:`ROLES`. Raises ValueError otherwise.
    """
    if not isinstance(key, str):
        raise ValueError(f"component key must be a string, got {type(key).__name__}: {_short(key)}")
    component, dot, role = key.partition(".")
    return _component_part(component, key), (_role_part(role, key) if dot else None)


def _join_key(component: str, role: str | None) -> str:
    return component if role is None else f"{component}.{role}"


def numbered_component_base(name: str) -> str | None:
    """The component a numbered copy falls back to (``text_encoder_2`` -> ``text_encoder``), else None."""
    match = _NUMBERED.fullmatch(name)
    return match.group(1) if match else None


def _flatten(pairs: Iterable[tuple[object, object]]) -> Iterable[tuple[str, object, object]]:
    """(canonical key, key as spelled, backend); a mapping value is a role table: ``{"transformer": {"cross": ..}}``."""
    for key, value in pairs:
        component, role = split_component_key(key)
        if not isinstance(value, Mapping):
            yield _join_key(component, role), key, value
            continue
        if role is not None:
            raise ValueError(f"component key {_short(key)} already names a role; its value must be a backend name, "
                             f"got a table")
        for role_key, backend in value.items():
            spelled = f"{key}.{role_key}" if isinstance(role_key, str) else key
            yield _join_key(component, _role_part(role_key, spelled)), spelled, backend


def _normalize_entries(pairs: Iterable[tuple[object, object]]) -> dict[str, str]:
    """Normalise (key, backend) pairs; a key given twice (also after normalisation) is an error."""
    result: dict[str, str] = {}
    spelled: dict[str, object] = {}
    for normalized, key, value in _flatten(pairs):
        if normalized in result:
            raise ValueError(
                f"component {normalized!r} is given twice: as {_short(spelled[normalized])} and as {_short(key)}"
            )
        try:
            result[normalized] = _backend_name(value)
        except ValueError as err:
            raise ValueError(f"component {_short(key)}: {err}") from None
        spelled[normalized] = key
    return result


def _unique_keys_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # json.loads would silently keep only the last of duplicate keys.
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise ValueError(f"key {_short(key)} is given twice in a JSON object")
        seen[key] = value
    return seen


def _load_json(text: str) -> Any:
    """json.loads refusing duplicate keys; too deep nesting is a ValueError (json raises RecursionError)."""
    try:
        return json.loads(text, object_pairs_hook=_unique_keys_object)
    except RecursionError:
        raise ValueError("JSON is nested too deeply") from None


def _parse_json_object(text: str) -> dict[str, str]:
    try:
        data = _load_json(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"invalid JSON for component attention backends: {err}") from None
    if not isinstance(data, dict):
        raise ValueError(
            f"component attention backends in JSON must be an object like {{\"vae\": \"fa\"}}, got {_short(text)}"
        )
    return _normalize_entries(data.items())


def parse_component_backends(value: object) -> dict[str, str]:
    """Parse per-component backends into ``{component_key: canonical_backend_name}``.

    ``value`` is None (-> ``{}``), a mapping, a ``component=backend[,component=backend...]`` string or a JSON
    object string. A key may name a role (``transformer.cross``); in a mapping, a component's value may also be a
    table of roles (``{"transformer": {"cross": "fa"}}``). Raises ValueError on anything malformed.
    """
    if value is None:
        return {}
    if isinstance(value, Mapping):
        return _normalize_entries(value.items())
    if not isinstance(value, str):
        raise ValueError(
            "component attention backends must be a dict, a 'component=backend,...' string or a JSON object, "
            f"got {type(value).__name__}: {_short(value)}"
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
            raise ValueError(f"component attention backend entries must be 'component=backend', got {_short(entry)}")
        key, backend = entry.split("=", 1)
        pairs.append((key, backend.strip()))
    return _normalize_entries(pairs)


def _backend_name(value: object) -> str:
    if not isinstance(value, (str, Backend)):  # checked here so that the error quotes a bounded repr
        raise ValueError(f"attention backend name must be a string, got {type(value).__name__}: {_short(value)}")
    return normalize_backend_name(value)


def _normalize_global(value: object) -> str | None:
    return None if value is None else _backend_name(value)


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
    try:
        return tomllib.loads(text)
    except RecursionError:  # tomllib recurses per nesting level
        raise ValueError("TOML is nested too deeply") from None


def _config_path(value: object) -> str:
    """A config path as str: str, bytes or os.PathLike; anything else (e.g. 0) is a ValueError."""
    try:
        if isinstance(value, (str, bytes, os.PathLike)):
            return os.fsdecode(value)
    except (TypeError, UnicodeError):  # a PathLike returning neither str nor bytes; undecodable bytes
        pass
    raise ValueError(f"{_FLAG_CONFIG}: expected a file path, got {type(value).__name__}: {_short(value)}")


def _read_config_file(path: object) -> tuple[str | None, dict[str, str]]:
    """(attention_backend, component backends) from a JSON or TOML file; errors name the file."""
    path = _config_path(path)
    source = f"config file {_short(path)}"
    try:
        with open(path, "rb") as f:
            raw = f.read(_MAX_CONFIG_BYTES + 1)
    except OSError as err:
        raise ValueError(f"{source}: cannot read: {err.strerror or err}") from None
    except ValueError as err:  # e.g. an embedded NUL in the path
        raise ValueError(f"{source}: cannot read: {err}") from None
    if len(raw) > _MAX_CONFIG_BYTES:
        raise ValueError(f"{source}: larger than {_MAX_CONFIG_BYTES} bytes; a config file is a few lines")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{source}: not UTF-8 text: {err.reason} at byte {err.start}") from None

    lower = path.lower()
    try:
        if lower.endswith(".toml"):
            data = _load_toml(text)
        elif lower.endswith(".json"):
            data = _load_json(text)
        else:  # no telling suffix: JSON first, then TOML
            try:
                data = _load_json(text)
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
            raise ValueError(f"{source}: unknown key {_short(key)}; expected attention_backend and/or "
                             "component_attention_backends")
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


class HelpRequested(ValueError):
    """Raised by :meth:`AttentionConfig.from_cli` for ``-h``/``--help``: a library call neither prints nor exits.

    ``.help`` holds the help text; print it yourself, or run ``attnsel explain -h`` on the command line.
    """

    def __init__(self, help_text: str):
        super().__init__("-h/--help: AttentionConfig.from_cli does not print help or exit; the text is in this "
                         "exception's .help (or run `attnsel explain -h`)")
        self.help = help_text


class _HelpAction(argparse.Action):
    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        raise HelpRequested(parser.format_help())


class _RaisingArgumentParser(argparse.ArgumentParser):
    """An ArgumentParser that raises ValueError (one line) instead of printing usage and exiting."""

    def __init__(self, **kwargs):
        super().__init__(add_help=False, **kwargs)
        self.add_argument("-h", "--help", action=_HelpAction, help="show this help (raised as HelpRequested)")

    def error(self, message):  # noqa: D401 - argparse API
        raise ValueError(message)

    def exit(self, status=0, message=None):  # never leave the interpreter from a library call
        raise ValueError(" ".join((message or f"argument parsing ended with status {status}").split()))


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
        if token.startswith(_UNDERSCORE_DOTTED_PREFIX):
            token = _DOTTED_PREFIX + token[len(_UNDERSCORE_DOTTED_PREFIX):]
        name, eq, rest = token.partition("=")
        if name in _UNDERSCORE_FLAGS and name not in known:
            token = _UNDERSCORE_FLAGS[name] + eq + rest
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
                meant = [flag for flag in _OUR_FLAGS if flag.startswith(name.replace("_", "-"))]
                if meant:
                    _fail(parser, f"abbreviated option {name} is not accepted; write it in full: {' or '.join(meant)}")
        out.append(token)
    return out


def check_argv(argv: object) -> list[str]:
    """``argv`` as a list of strings; a bare string or non-string items are a ValueError (not a TypeError)."""
    if isinstance(argv, (str, bytes)):
        raise ValueError(f"argv must be a list of strings, not one {type(argv).__name__}: {_short(argv)}")
    try:
        items = list(argv)  # type: ignore[call-overload]
    except TypeError:
        raise ValueError(f"argv must be a list of strings, got {type(argv).__name__}: {_short(argv)}") from None
    for i, item in enumerate(items):
        if not isinstance(item, str):
            raise ValueError(f"argv[{i}] must be a string, got {type(item).__name__}: {_short(item)}")
    return items


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
            help="global attention backend (e.g. fa, fa3, torch_sdpa); overrides $" + ENV_ATTENTION_BACKEND
            + "; also spelled --attention_backend",
        )
        group.add_argument(
            _FLAG_COMPONENTS, dest="component_attention_backends", metavar="VALUE", type=_components_type,
            action=_MergeComponentsAction, default=None,
            help="per-component backends: 'text-encoder=fa3,transformer.cross=torch_sdpa' or a JSON object; a key "
            f"may name a role ({' or '.join(ROLES)}); also {_DOTTED_PREFIX}<key> NAME; repeatable, the later flag wins "
            "per key; also spelled with underscores (--component_attention_backends)",
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
            file_backend, file_components = _read_config_file(config_path)

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
        """Parse ``argv`` (default ``sys.argv[1:]``); every argument must be one of ours.

        Never prints or exits: errors raise ValueError (one line), ``-h``/``--help`` raises :class:`HelpRequested`
        (a ValueError carrying the help text in ``.help``).
        """
        parser = _RaisingArgumentParser(
            prog="attnsel", description="attention backend configuration", allow_abbrev=False
        )
        cls.add_cli_args(parser)
        return cls.from_cli_args(parser.parse_args(check_argv(sys.argv[1:] if argv is None else argv)))

    # ---- lookup ---------------------------------------------------------------------------------------------

    def resolve(self, component: str, role: str | None = None) -> tuple[Backend | None, str | None]:
        """(backend, matched key) for a layer of ``component`` with ``role`` (None, "self" or "cross").

        Tried in order: ``component.role``, ``component``, then for a numbered component (``text_encoder_2``) its
        base's ``text_encoder.role`` and ``text_encoder``. (None, None) when no key matches. The component name is
        normalised like keys (stripped, ``-`` -> ``_``, case kept); the role is stripped and lower-cased.
        """
        if not isinstance(component, str) or "." in component:
            raise ValueError(f"component name must be a string without '.' (give the role as role=...), "
                             f"got {_short(component)}")
        name = _component_part(component, component)
        if role is not None:
            role = _role_part(role, f"{name}.{role}" if isinstance(role, str) else role)
        base = numbered_component_base(name)
        for candidate in (name, base):
            if candidate is None:
                continue
            for key in (_join_key(candidate, role), candidate):
                if key in self.component_attention_backends:
                    return to_backend(self.component_attention_backends[key]), key
        return None, None

    def component_keys(self) -> list[tuple[str, str | None]]:
        """The configured keys as (component, role or None) pairs, in order (for strict "does it match" checks)."""
        return [split_component_key(key) for key in self.component_attention_backends]

    def resolve_component_backend(self, *names: str | None) -> tuple[Backend | None, str | None]:
        """(backend, matched key) for the first name that :meth:`resolve` matches (no role), else (None, None).

        None and blank names are skipped.
        """
        for name in names:
            if name is None or (isinstance(name, str) and not name.strip()):
                continue
            found = self.resolve(name)
            if found[1] is not None:
                return found
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
