"""Property-based tests (hypothesis): the flag/config parser and the command line against a small reference model
written from README.md's "Command line" section, and `attnsel.attention` on CPU edge cases against float64.

Invariants: the API raises nothing but ValueError; `attnsel.cli.main` returns 0 or 2 with at most one line on stderr
and never a traceback. Examples are derandomized (the same in every CI run); ATTNSEL_FUZZ_SCALE=N runs N times as
many, randomized, for a deeper local search.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import tempfile
import tomllib
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import attnsel
from attnsel.cli import main
from attnsel.config import AttentionConfig

_SCALE = int(os.environ.get("ATTNSEL_FUZZ_SCALE", "1"))


def fuzz(examples: int):
    return settings(max_examples=examples * _SCALE, deadline=None, derandomize=_SCALE == 1, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# ---- the reference model, from README.md ---------------------------------------------------------------------

# "Backends: ..." and "`fa3` / `fa4` mean `fa`".
NAMES = ["fa2", "fa", "torch_sdpa", "sage_attn", "sage_attn_3", "sliding_tile_attn", "video_sparse_attn",
         "sparse_video_gen_2_attn", "vmoba_attn", "aiter", "aiter_sage", "sla_attn", "sage_sla_attn", "no_attention",
         "native", "sdpa_cudnn", "sdpa_flash", "sdpa_efficient", "sdpa_math"]
ALIASES = {"fa3": "fa", "fa4": "fa"}
ROLES = ("cross", "self")
FILE_KEYS = {"attention_backend": "backend", "attention-backend": "backend",
             "component_attention_backends": "components", "component-attention-backends": "components"}


class Bad(Exception):
    """The reference says: this input is an error."""


def ref_backend(name):
    """Names are lower-case; case and spaces are ignored; aliases map to their backend."""
    if not isinstance(name, str):
        raise Bad
    squeezed = "".join(ch for ch in name if not ch.isspace()).lower()
    if squeezed in NAMES:
        return squeezed
    if squeezed in ALIASES:
        return ALIASES[squeezed]
    raise Bad


def ref_key(key):
    """`component` or `component.role`: component stripped, `-` -> `_`, case kept; role stripped, case ignored."""
    if not isinstance(key, str):
        raise Bad
    component, dot, role = key.partition(".")
    component = component.strip().replace("-", "_")
    if not component:
        raise Bad
    if not dot:
        return component
    role = role.strip().lower()
    if role not in ROLES:
        raise Bad
    return f"{component}.{role}"


def ref_entries(pairs):
    out = {}
    for key, value in pairs:
        if isinstance(value, dict):  # a table of roles
            if "." in ref_key(key):
                raise Bad
            items = []
            for role, backend in value.items():
                if not isinstance(role, str):
                    raise Bad
                items.append((f"{key}.{role}", backend))
        else:
            items = [(key, value)]
        for k, v in items:
            k = ref_key(k)
            if k in out:  # the same key twice in one value
                raise Bad
            out[k] = ref_backend(v)
    return out


def ref_json(text):
    def pairs_hook(pairs):
        if len({k for k, _ in pairs}) != len(pairs):
            raise Bad
        return dict(pairs)

    try:
        return json.loads(text, object_pairs_hook=pairs_hook)
    except (ValueError, RecursionError):
        raise Bad from None


def ref_components(value):
    if value is None:
        return {}
    if isinstance(value, dict):
        return ref_entries(value.items())
    if not isinstance(value, str):
        raise Bad
    text = value.strip()
    if not text:
        return {}
    if text[0] in '{["':
        data = ref_json(text)
        if not isinstance(data, dict):
            raise Bad
        return ref_entries(data.items())
    pairs = []
    for entry in text.split(","):
        entry = entry.strip()
        if not entry:
            continue
        if "=" not in entry:
            raise Bad
        key, backend = entry.split("=", 1)
        pairs.append((key, backend))
    return ref_entries(pairs)


def ref_file(text, suffix):
    if suffix == ".json":
        data = ref_json(text)
    else:
        try:
            data = tomllib.loads(text)
        except (ValueError, RecursionError):
            raise Bad from None
    if not isinstance(data, dict):
        raise Bad
    found = {}
    for key, value in data.items():
        if key not in FILE_KEYS or FILE_KEYS[key] in found:
            raise Bad
        found[FILE_KEYS[key]] = value
    backend = found.get("backend")
    return (None if backend is None else ref_backend(backend)), ref_components(found.get("components"))


def outcome(fn):
    """("ok", value) or ("error",) for the implementation; anything but ValueError propagates and fails the test."""
    try:
        return ("ok", fn())
    except ValueError as err:
        assert "\n" not in str(err), f"multi-line error: {err!r}"
        return ("error",)


def ref_outcome(fn):
    try:
        return ("ok", fn())
    except Bad:
        return ("error",)


# ---- strategies ----------------------------------------------------------------------------------------------

TEXT = st.characters(blacklist_categories=("Cs",))  # no lone surrogates: files and env vars hold real text
SPACE = st.sampled_from([" ", "  ", "\t", "\n", "\u00a0", "\u2003"])


@st.composite
def near_miss(draw, base):
    """`base` with random case, inserted whitespace, or a one-character edit."""
    chars = list(base)
    for _ in range(draw(st.integers(0, 2))):
        op = draw(st.sampled_from(["case", "space", "delete", "insert", "replace", "dash", "none"]))
        i = draw(st.integers(0, len(chars)))
        if op == "case" and chars:
            chars = [c.upper() if draw(st.booleans()) else c for c in chars]
        elif op == "space":
            chars.insert(i, draw(SPACE))
        elif op == "delete" and i < len(chars):
            del chars[i]
        elif op == "insert":
            chars.insert(i, draw(TEXT))
        elif op == "replace" and i < len(chars):
            chars[i] = draw(TEXT)
        elif op == "dash":
            chars = ["-" if c == "_" else c for c in chars]
    return "".join(chars)


backend_names = st.one_of(
    st.sampled_from(NAMES + list(ALIASES)).flatmap(near_miss),
    st.sampled_from(NAMES + list(ALIASES)),
    st.text(TEXT, max_size=8),
)
components = st.sampled_from(["text_encoder", "text-encoder", "Text_Encoder", "text_encoder_2", "transformer", "vae",
                              " vae ", "unet", "", " "])
role_names = st.sampled_from(["self", "cross", "Self", " CROSS ", "selff", "cros", "", "x", "self.cross"])
keys = st.one_of(
    components,
    st.builds(lambda c, r: f"{c}.{r}", components, role_names),
    st.text(TEXT, max_size=8),
)
entries = st.lists(st.tuples(keys, backend_names), max_size=4)


def list_value(pairs, sep=","):
    return sep.join(f"{k}={v}" for k, v in pairs)


def json_value(pairs):
    # Rendered by hand so that duplicate keys reach the parser.
    return "{" + ", ".join(f"{json.dumps(k)}: {json.dumps(v)}" for k, v in pairs) + "}"


@st.composite
def component_values(draw):
    """A --component-attention-backends value in any README form, including role tables and odd JSON."""
    pairs = draw(entries)
    kind = draw(st.sampled_from(["list", "list", "json", "json_roles", "json_other", "text"]))
    if kind == "list":
        return list_value(pairs, draw(st.sampled_from([",", ", ", " , ", ",,"])))
    if kind == "json":
        return json_value(pairs)
    if kind == "json_roles":
        tables = draw(st.dictionaries(components, st.dictionaries(role_names, backend_names, max_size=2), max_size=2))
        return json.dumps(tables)
    if kind == "json_other":
        return json.dumps(draw(st.recursive(
            st.none() | st.booleans() | st.integers() | st.text(TEXT, max_size=5),
            lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(TEXT, max_size=5), inner, max_size=3),
            max_leaves=6)))
    return draw(st.text(TEXT, max_size=20))


def env(**values):
    clean = {k: v for k, v in os.environ.items() if not k.startswith("ATTNSEL_")}
    clean.update({k: v for k, v in values.items() if v is not None})
    return mock.patch.dict(os.environ, clean, clear=True)


# ---- parser properties -----------------------------------------------------------------------------------------


@fuzz(300)
@given(name=backend_names, equals=st.booleans(), underscore=st.booleans())
def test_global_backend_matches_reference(name, equals, underscore):
    flag = "--attention_backend" if underscore else "--attention-backend"
    argv = [f"{flag}={name}"] if equals else [flag, name]
    expected = ref_outcome(lambda: ref_backend(name))
    if not equals and name.startswith("-"):
        expected = ("error",)  # argparse reads it as a flag: the value is missing
    with env():
        got = outcome(lambda: AttentionConfig.from_cli(argv).attention_backend)
    assert got == expected, argv


@fuzz(300)
@given(value=component_values(), plain_flag=st.sampled_from(["--component-attention-backends",
                                                              "--component_attention_backends"]), equals=st.booleans())
def test_component_value_matches_reference(value, plain_flag, equals):
    expected = ref_outcome(lambda: ref_components(value))
    if not equals and value.startswith("-"):
        expected = ("error",)
    argv = [f"{plain_flag}={value}"] if equals else [plain_flag, value]
    with env():
        got = outcome(lambda: AttentionConfig.from_cli(argv).component_attention_backends)
        assert outcome(lambda: AttentionConfig(component_attention_backends=value).component_attention_backends) \
            == ref_outcome(lambda: ref_components(value))
    assert got == expected, argv


@fuzz(200)
@given(flags=st.lists(st.tuples(keys.filter(lambda k: "=" not in k), backend_names,
                                st.sampled_from(["--component-attention-backends.", "--component_attention_backends."]),
                                st.booleans()), min_size=1, max_size=4))
def test_dotted_flags_match_reference(flags):
    argv, merged, bad = [], {}, False
    for key, value, prefix, equals in flags:
        argv += [f"{prefix}{key}={value}"] if equals else [f"{prefix}{key}", value]
        try:
            if not equals and value.startswith("-"):
                raise Bad
            merged[ref_key(key)] = ref_backend(value)  # one key per flag; the later flag wins per key
        except Bad:
            bad = True
    with env():
        got = outcome(lambda: AttentionConfig.from_cli(argv).component_attention_backends)
    assert got == (("error",) if bad else ("ok", merged)), argv


def toml_string(text):
    return json.dumps(text)  # JSON's escapes are valid in TOML basic strings (no surrogates are generated)


@st.composite
def config_files(draw):
    """(suffix, text) of a JSON or TOML config file."""
    suffix = draw(st.sampled_from([".json", ".toml"]))
    backend = draw(st.none() | backend_names)
    backend_key = draw(st.sampled_from(["attention_backend", "attention-backend"]))
    comp_key = draw(st.sampled_from(["component_attention_backends", "component-attention-backends"]))
    pairs = draw(entries)
    as_string = draw(st.booleans())
    extra = draw(st.sampled_from([None, "steps", "attention_backend"]))
    if suffix == ".json":
        body = []
        if backend is not None:
            body.append(f"{json.dumps(backend_key)}: {json.dumps(backend)}")
        body.append(f"{json.dumps(comp_key)}: " + (json.dumps(list_value(pairs)) if as_string else json_value(pairs)))
        if extra:
            body.append(f'{json.dumps(extra)}: "fa"')
        return suffix, "{" + ", ".join(body) + "}"
    lines = []
    if backend is not None:
        lines.append(f"{backend_key} = {toml_string(backend)}")
    if extra:
        lines.append(f'{extra} = "fa"')
    if as_string:
        lines.append(f"{comp_key} = {toml_string(list_value(pairs))}")
    else:
        lines.append(f"[{comp_key}]")
        lines += [f"{toml_string(k)} = {toml_string(v)}" for k, v in pairs]
        table = draw(st.none() | st.tuples(components, st.dictionaries(role_names, backend_names, max_size=2)))
        if table is not None:
            lines.append(f"[{comp_key}.{toml_string(table[0])}]")
            lines += [f"{toml_string(r)} = {toml_string(b)}" for r, b in table[1].items()]
    return suffix, "\n".join(lines) + "\n"


@fuzz(150)
@given(file=st.none() | config_files(),
       env_backend=st.none() | backend_names.filter(lambda s: "\x00" not in s),
       env_components=st.none() | st.builds(list_value, entries).filter(lambda s: "\x00" not in s),
       cli_backend=st.none() | backend_names, cli_components=st.none() | st.builds(list_value, entries))
def test_precedence_matches_reference(file, env_backend, env_components, cli_backend, cli_components):
    """Command line > environment > config file; component maps merge per key (file, env, command line)."""
    with tempfile.TemporaryDirectory() as tmp:
        argv = []
        layers = []  # (backend, components) low to high
        try:
            if file is not None:
                suffix, text = file
                path = os.path.join(tmp, "attn" + suffix)
                with open(path, "w", encoding="utf-8") as f:
                    f.write(text)
                argv += ["--config", path]
                layers.append(ref_file(text, suffix))
            layers.append((None if env_backend is None or not env_backend.strip() else ref_backend(env_backend),
                           ref_components(env_components)))
            layers.append((None if cli_backend is None else ref_backend(cli_backend), ref_components(cli_components)))
            if cli_backend is not None:
                argv.append(f"--attention-backend={cli_backend}")
            if cli_components is not None:
                argv.append(f"--component-attention-backends={cli_components}")
            backend = next((b for b, _ in reversed(layers) if b is not None), None)
            merged = {}
            for _, comps in layers:
                merged.update(comps)
            expected = ("ok", (backend, merged))
        except Bad:
            expected = ("error",)
            argv += [f"--attention-backend={cli_backend}"] if cli_backend is not None else []
            argv += [f"--component-attention-backends={cli_components}"] if cli_components is not None else []
        with env(ATTNSEL_ATTENTION_BACKEND=env_backend, ATTNSEL_COMPONENT_ATTENTION_BACKENDS=env_components):
            got = outcome(lambda: (lambda c: (c.attention_backend, c.component_attention_backends))(
                AttentionConfig.from_cli(argv)))
        assert got == expected, (argv, env_backend, env_components)


@fuzz(120)
@given(config=st.dictionaries(keys, backend_names, max_size=4), component=components, role=st.none() | role_names)
def test_resolve_matches_reference(config, component, role):
    """component.role > component > base.role > base (text_encoder_2 -> text_encoder), else (None, None)."""
    ref_table = ref_outcome(lambda: ref_entries(config.items()))
    assume(ref_table[0] == "ok")
    cfg = AttentionConfig(component_attention_backends=config)
    table = ref_table[1]

    def expected():
        name = component.strip().replace("-", "_")
        if not name:
            raise Bad
        r = None if role is None else role.strip().lower()
        if r is not None and r not in ROLES:
            raise Bad
        stem, _, number = name.rpartition("_")
        base = stem if stem and number and all(c in "0123456789" for c in number) else None
        for c in (name, base):
            for k in ([f"{c}.{r}"] if r else []) + [c]:
                if c is not None and k in table:
                    return table[k], k
        return None, None

    got = outcome(lambda: cfg.resolve(component, role))
    want = ref_outcome(expected)
    if want[0] == "ok" and want[1][0] is not None:
        want = ("ok", (attnsel.Backend[want[1][0].upper()], want[1][1]))
    assert got == want


# ---- clean errors for non-string and odd inputs ------------------------------------------------------------------

odd_values = st.one_of(st.none(), st.integers(), st.floats(), st.binary(max_size=4),
                       st.lists(st.integers(), max_size=2), st.dictionaries(st.integers(), st.integers(), max_size=2),
                       st.just(object()))


@fuzz(100)
@given(argv=st.lists(st.one_of(st.sampled_from(["--attention-backend", "fa", "--config", "-h", "--"]), odd_values),
                     min_size=1, max_size=3),
       ns_value=odd_values, attr=st.sampled_from(["config", "attention_backend", "component_attention_backends"]))
def test_odd_types_are_value_errors(argv, ns_value, attr):
    with env():
        assume(not all(isinstance(a, str) for a in argv))
        with pytest.raises(ValueError):
            AttentionConfig.from_cli(argv)
        outcome(lambda: AttentionConfig.from_cli_args(argparse.Namespace(**{attr: ns_value})))


# ---- the command line ---------------------------------------------------------------------------------------------


def run_cli(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def check_cli_result(code, err):
    assert "Traceback" not in err
    assert code in (0, 2), (code, err)
    if code == 2:
        assert err.startswith("attnsel: error: ") and err.count("\n") == 1, err
    else:
        assert err == "", err


TOKENS = st.sampled_from([
    "explain", "backends", "run", "-h", "--help", "--version", "--reasons", "--", "-", "--device", "cpu", "cuda:0",
    "--dtype", "float32", "bfloat16", "--steps", "0", "1", "--seed", str(2 ** 70), "-1", "--output", "--prompt",
    "--attention-backend", "--attention_backend", "--attention-back", "--component-attention-backends",
    "--component_attention_backends", "--component-attention-backends.vae",
    "--component_attention_backends.transformer.cross",
    "--component-attention-backends.transformer.selfish", "--config", "/nonexistent.toml", "/dev/null", "native",
    "torch_sdpa", "FA3", "vae=native", "transformer.self=native", '{"vae": "native"}', "[" * 1200, '{"a":' * 1200,
    "=", "--=", "-x", "--cmake", "--include-dir", "\x00", "é",
])


@fuzz(60)
@given(argv=st.lists(st.one_of(TOKENS, st.text(TEXT, max_size=6)), max_size=6))
def test_cli_any_argv_exits_0_or_2_with_one_line(argv):
    # `run` would run the pipeline: send its output to a folder that does not exist (checked before running).
    if "run" in argv and "-h" not in argv and "--help" not in argv:
        argv = argv + ["--output", "/nonexistent-attnsel-dir/x.png"]
    with env():
        code, _, err = run_cli(argv)
    check_cli_result(code, err)


@fuzz(25)
@given(value=component_values(), backend=st.none() | backend_names)
def test_cli_explain_config_errors_exit_2(value, backend):
    argv = ["explain", f"--component-attention-backends={value}"]
    if backend is not None:
        argv.append(f"--attention-backend={backend}")
    with env():
        code, out, err = run_cli(argv)
    check_cli_result(code, err)
    try:
        ref_components(value)
        if backend is not None:
            ref_backend(backend)
    except Bad:
        assert code == 2, (argv, out)


@fuzz(25)
@given(file=config_files())
def test_cli_config_file_errors_exit_2(file):
    suffix, text = file
    with tempfile.TemporaryDirectory() as tmp, env():
        path = os.path.join(tmp, "attn" + suffix)
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        code, _, err = run_cli(["explain", "--config", path])
    check_cli_result(code, err)
    if ref_outcome(lambda: ref_file(text, suffix))[0] == "error":
        assert code == 2


# ---- attention on CPU: edge cases against float64 ------------------------------------------------------------


F32_MAX = torch.finfo(torch.float32).max


def reference_attention(q, k, v, mask, causal, scale):
    """float64 attention; a row that sees no key is zeros, and a hidden key contributes nothing (not even its NaN).

    Returns (out, dead, fits, finite_qk), each mask [B, H, Sq, 1]: rows that see no key; rows whose scores fit in
    float32 (elsewhere an fp32 kernel overflows, as PyTorch's does); rows whose q, and all of k, are finite.
    """
    qd, kd, vd = q.double(), k.double(), v.double()
    groups = q.shape[1] // k.shape[1]
    kd, vd = kd.repeat_interleave(groups, dim=1), vd.repeat_interleave(groups, dim=1)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    raw = qd @ kd.transpose(-1, -2)
    s = raw * scale
    sq, sk = q.shape[2], k.shape[2]
    visible = torch.ones(s.shape, dtype=torch.bool)
    if causal:  # top-left aligned: query i sees keys j <= i
        visible &= torch.ones(sq, sk, dtype=torch.bool).tril()
    if mask is not None and mask.dtype == torch.bool:
        visible &= mask
    skipped = ~visible  # hidden whatever the score (an additive -inf is added to the score instead)
    if mask is not None and mask.dtype != torch.bool:
        s = s + mask.double()
        visible &= mask.double() != -math.inf
    s = s.masked_fill(~visible, -math.inf)
    dead = (s == -math.inf).all(dim=-1, keepdim=True)  # also true when sk == 0
    m = s.amax(dim=-1, keepdim=True) if sk else torch.zeros(dead.shape, dtype=torch.float64)
    p = torch.exp(s - torch.where(dead, 0.0, m))
    terms = torch.where(visible.unsqueeze(-1), p.unsqueeze(-1) * vd.unsqueeze(-3), 0.0)  # [B, H, Sq, Sk, Dv]
    out = terms.sum(-2) / p.sum(-1, keepdim=True)
    # NaN scores count as fitting (comparisons with NaN are false); the kernels scale by scale * log2(e) < 1.5 scale.
    scaled = raw * scale
    fits = (~((raw.abs() > F32_MAX) | (scaled.abs() * 1.5 > F32_MAX)) | skipped).all(-1, keepdim=True)
    finite_qk = torch.isfinite(qd).all(-1, keepdim=True) & torch.isfinite(kd).all()
    return torch.where(dead, 0.0, out), dead, fits, finite_qk


def sdpa_attention(q, k, v, mask, causal, scale):
    if k.shape[2] == 0:
        return None
    if mask is not None and mask.dtype != torch.bool:
        mask = mask.to(q.dtype)
    if causal and mask is not None:  # SDPA refuses both: fold the triangle into the mask
        tri = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool).tril()
        mask = mask & tri if mask.dtype == torch.bool else mask.masked_fill(~tri, -math.inf)
        causal = False
    try:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale,
                                              enable_gqa=q.shape[1] != k.shape[1])
    except RuntimeError:
        return None


SPECIALS = [math.nan, math.inf, -math.inf]
FLOOR = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}


@st.composite
def attention_inputs(draw):
    dtype = draw(st.sampled_from([torch.float32, torch.float32, torch.bfloat16, torch.float16]))
    b, hkv, groups = draw(st.integers(0, 2)), draw(st.integers(1, 2)), draw(st.sampled_from([1, 2]))
    sq, sk = draw(st.integers(0, 9)), draw(st.integers(0, 9))
    d, dv = draw(st.sampled_from([1, 3, 8, 16, 33])), draw(st.sampled_from([1, 4, 16, 24]))
    magnitude = draw(st.sampled_from([1.0, 1.0, 1e-20, 1e-4, 1e4, 1e20]))
    seed = draw(st.integers(0, 2 ** 16))
    g = torch.Generator().manual_seed(seed)

    def tensor(*shape):
        x = torch.randn(*shape, generator=g) * magnitude
        if x.numel() and draw(st.integers(0, 5)) == 0:  # sometimes a NaN or an infinity
            x.view(-1)[draw(st.integers(0, x.numel() - 1))] = draw(st.sampled_from(SPECIALS))
        x = x.to(dtype)
        if draw(st.booleans()):  # non-contiguous: (B, S, H, D) memory
            x = x.transpose(1, 2).contiguous().transpose(1, 2)
        return x

    q, k, v = tensor(b, hkv * groups, sq, d), tensor(b, hkv, sk, d), tensor(b, hkv, sk, dv)
    causal = draw(st.booleans())
    scale = draw(st.sampled_from([None, None, 1.0, 0.0, -0.5, 1e-30, 1e30]))
    mask_kind = draw(st.sampled_from([None, None, "bool", "add"]))
    mask = None
    if mask_kind is not None:
        shape = draw(st.sampled_from([(sq, sk), (1, 1, sq, sk), (b, 1, sq, sk), (b, hkv * groups, sq, sk)]))
        keep = torch.rand(shape, generator=g) < 0.6
        if sq and draw(st.booleans()):
            keep[..., draw(st.integers(0, sq - 1)), :] = False  # a fully masked query row
        if mask_kind == "bool":
            mask = keep
        else:
            # In q's dtype, or fp32 holding values q's dtype holds exactly (SDPA, which needs q's dtype, sees the same).
            mask = (torch.randn(shape, generator=g) * 3).masked_fill(~keep, -math.inf).to(dtype)
            if draw(st.booleans()):
                mask = mask.float()
    backend = draw(st.sampled_from([None, "native", "torch_sdpa"]))
    return q, k, v, mask, causal, scale, backend


def abs_err(out, ref):
    """|out - ref|, inf where out is not finite."""
    err = (out.double() - ref).abs()
    return torch.where(torch.isfinite(err), err, math.inf)


def worst(errors):
    return float(errors.max()) if errors.numel() else 0.0


@fuzz(120)
@given(case=attention_inputs())
def test_attention_edge_cases_against_float64(case):
    q, k, v, mask, causal, scale, backend = case
    try:
        out = attnsel.attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale, backend=backend)
    except ValueError as err:
        assert "\n" not in str(err)
        return
    assert out.shape == (*q.shape[:3], v.shape[-1]) and out.dtype == q.dtype
    ref, dead, fits, finite_qk = reference_attention(q, k, v, mask, causal, scale)
    dead, fits, finite_qk = (x.expand_as(ref) for x in (dead, fits, finite_qk))
    if backend != "torch_sdpa":  # PyTorch's own kernel keeps its convention (NaN) for rows that see no key
        assert (out[dead & fits & finite_qk] == 0).all(), "a row that sees no key must be zeros"
    if backend != "torch_sdpa":  # (PyTorch's CPU kernel returns zeros for a row of NaN scores)
        # NaN propagates: where the float64 reference is NaN, so is the output (nothing silently made finite).
        assert torch.isnan(out[torch.isnan(ref) & fits]).all(), "NaN in the inputs was lost"
    # Accuracy where the scores fit in float32. (Beyond, our fp32 q·k overflows before the scale is applied, while
    # PyTorch scales q and k first: with inputs of ~1e19 and a tiny scale PyTorch stays finite and we do not.)
    live = torch.isfinite(ref) & ~dead & fits
    theirs = sdpa_attention(q, k, v, mask, causal, scale)
    theirs_err = worst(abs_err(theirs, ref)[live]) if theirs is not None else 0.0
    bound = 2 * theirs_err + FLOOR[q.dtype] * max(1.0, worst(ref[live].abs()))
    assert worst(abs_err(out, ref)[live]) <= bound


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.float32])
def test_torch_sdpa_takes_a_mask_with_causal(mask_dtype):
    # Regression (found by the property above): torch_sdpa passed both to PyTorch, which raises a RuntimeError.
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, 2, 7, 8, generator=g) for _ in range(3))
    keep = torch.rand(7, 7, generator=g) < 0.7
    keep[:, 0] = True  # every row sees key 0 (SDPA gives NaN, native zeros, for a row that sees none)
    mask = keep if mask_dtype == torch.bool else torch.zeros(7, 7).masked_fill(~keep, -math.inf)
    out = attnsel.attention(q, k, v, attn_mask=mask, is_causal=True, backend="torch_sdpa")
    ref = reference_attention(q, k, v, mask, True, None)[0]
    assert (out.double() - ref).abs().max() <= 1e-5
