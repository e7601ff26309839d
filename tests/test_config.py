"""Tests for attnsel.config: value parsing, the CLI (incl. dotted flags), env vars, config files, precedence."""

from __future__ import annotations

import argparse
import json
import re

import pytest

import attnsel  # noqa: F401  (loads torch before the native module)
from attnsel import _C
from attnsel.backends import Backend, normalize_backend_name
from attnsel.config import (
    ENV_ATTENTION_BACKEND,
    ENV_COMPONENT_ATTENTION_BACKENDS,
    AttentionConfig,
    HelpRequested,
    ROLES,
    get_config,
    numbered_component_base,
    parse_component_backends,
    set_config,
)


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    # The developer's shell must not leak into the tests.
    monkeypatch.delenv(ENV_ATTENTION_BACKEND, raising=False)
    monkeypatch.delenv(ENV_COMPONENT_ATTENTION_BACKENDS, raising=False)


@pytest.fixture
def restore_config():
    yield
    set_config(None)


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


# ---- the four original tests ---------------------------------------------------------------------------------


def test_backend_name_normalisation():
    assert normalize_backend_name("fa3") == "fa"
    assert normalize_backend_name("FA4") == "fa"
    assert normalize_backend_name(" Fa3 ") == "fa"
    assert normalize_backend_name("fa2") == "fa2"
    assert AttentionConfig(attention_backend=" Fa3 ").attention_backend == "fa"
    assert AttentionConfig(attention_backend="fa2").attention_backend == "fa2"
    assert AttentionConfig(attention_backend=Backend.TORCH_SDPA).attention_backend == "torch_sdpa"
    assert AttentionConfig().attention_backend is None
    assert AttentionConfig(component_attention_backends={"vae": "FA4"}).component_attention_backends == {"vae": "fa"}


def test_component_lookup():
    cfg = AttentionConfig(component_attention_backends="text_encoder=fa3,vae=torch_sdpa,Dit=fa2")
    assert cfg.resolve_component_backend("text_encoder") == (Backend.FA, "text_encoder")
    assert cfg.resolve_component_backend(" text-encoder ") == (Backend.FA, "text_encoder")
    # _2 falls back to the base name; no other suffix does
    assert cfg.resolve_component_backend("text_encoder_2") == (Backend.FA, "text_encoder")
    assert cfg.resolve_component_backend("text-encoder-2") == (Backend.FA, "text_encoder")
    assert cfg.resolve_component_backend("text_encoder_3") == (Backend.FA, "text_encoder")  # SD3's third encoder
    # first name that matches wins; None names are skipped
    assert cfg.resolve_component_backend(None, "unknown", "vae", "text_encoder") == (Backend.TORCH_SDPA, "vae")
    assert cfg.resolve_component_backend("text_encoder", "vae") == (Backend.FA, "text_encoder")
    # case-sensitive
    assert cfg.resolve_component_backend("dit") == (None, None)
    assert cfg.resolve_component_backend("Dit") == (Backend.FA2, "Dit")
    assert cfg.resolve_component_backend() == (None, None)
    assert AttentionConfig().resolve_component_backend("vae") == (None, None)
    # an exact _2 entry beats the fallback
    cfg2 = AttentionConfig(component_attention_backends={"text_encoder": "fa", "text_encoder_2": "fa2"})
    assert cfg2.resolve_component_backend("text_encoder_2") == (Backend.FA2, "text_encoder_2")
    with pytest.raises(ValueError, match="component name"):
        cfg.resolve_component_backend(3)


def test_invalid_backend_raises():
    with pytest.raises(ValueError, match="unknown attention backend 'nope'.*valid options: fa2, fa, torch_sdpa"):
        AttentionConfig(attention_backend="nope")
    with pytest.raises(ValueError, match="component 'vae': unknown attention backend 'nope'.*fa3 \\(= fa\\)"):
        AttentionConfig(component_attention_backends={"vae": "nope"})
    with pytest.raises(ValueError, match="--attention-backend: unknown attention backend 'nope'"):
        AttentionConfig.from_cli(["--attention-backend", "nope"])
    with pytest.raises(ValueError, match="component 'vae': unknown attention backend 'nope'"):
        AttentionConfig.from_cli(["--component-attention-backends.vae", "nope"])


def test_dynamic_dotted_cli_args():
    cfg = AttentionConfig.from_cli(
        [
            "--component-attention-backends.text-encoder", "fa3",
            "--component-attention-backends.vae=torch_sdpa",
            "--component-attention-backends", "dit=fa2,vae=fa",  # later wins for vae
            "--component-attention-backends.dit=sdpa_math",  # and for dit
        ]
    )
    assert cfg.component_attention_backends == {"text_encoder": "fa", "vae": "fa", "dit": "sdpa_math"}
    assert cfg.attention_backend is None
    # a dotted value that looks like a list or JSON is kept whole, not split
    with pytest.raises(ValueError, match="unknown attention backend 'fa,vae=fa2'"):
        AttentionConfig.from_cli(["--component-attention-backends.dit=fa,vae=fa2"])


# ---- roles ---------------------------------------------------------------------------------------------------

ROLE_CONFIG = {"transformer": "fa2", "transformer.self": "fa", "transformer.cross": "torch_sdpa",
               "text_encoder": "native", "text_encoder.cross": "sdpa_math", "vae.self": "fa"}


def test_roles_resolve_in_order():
    cfg = AttentionConfig(component_attention_backends=ROLE_CONFIG)
    assert ROLES == ("cross", "self")
    # component.role > component
    assert cfg.resolve("transformer", "self") == (Backend.FA, "transformer.self")
    assert cfg.resolve("transformer", "cross") == (Backend.TORCH_SDPA, "transformer.cross")
    assert cfg.resolve("transformer") == (Backend.FA2, "transformer")
    assert cfg.resolve(" transformer ", " CROSS ") == (Backend.TORCH_SDPA, "transformer.cross")
    # a role key alone does not serve role-less or other-role layers
    assert cfg.resolve("vae", "self") == (Backend.FA, "vae.self")
    assert cfg.resolve("vae", "cross") == (None, None)
    assert cfg.resolve("vae") == (None, None)
    # numbered components: component.role > component > base.role > base
    assert cfg.resolve("text_encoder_2", "cross") == (Backend.SDPA_MATH, "text_encoder.cross")
    assert cfg.resolve("text-encoder-2", "self") == (Backend.NATIVE, "text_encoder")
    both = AttentionConfig(component_attention_backends={"text_encoder_2": "fa2", "text_encoder.cross": "fa"})
    assert both.resolve("text_encoder_2", "cross") == (Backend.FA2, "text_encoder_2")
    assert both.resolve("text_encoder_2", "self") == (Backend.FA2, "text_encoder_2")
    assert both.resolve("text_encoder", "cross") == (Backend.FA, "text_encoder.cross")
    assert cfg.resolve("unet", "self") == (None, None)
    # the role-less lookup used by the loader
    assert cfg.resolve_component_backend(None, " ", "unet", "transformer") == (Backend.FA2, "transformer")


@pytest.mark.parametrize(
    "component, role, message",
    [
        ("transformer", "selfish", "role 'selfish' not in \\['cross', 'self'\\]"),
        ("transformer", "", "role '' not in"),
        ("transformer", 1, "role must be a string"),
        ("transformer.cross", None, "without '.'"),
        (None, None, "must be a string"),
        ("  ", None, "must not be empty"),
    ],
)
def test_resolve_errors(component, role, message):
    with pytest.raises(ValueError, match=message):
        AttentionConfig(component_attention_backends=ROLE_CONFIG).resolve(component, role)


def test_component_keys():
    cfg = AttentionConfig(component_attention_backends="Transformer.Cross=fa, text-encoder=fa2 ,vae . SELF=fa")
    assert cfg.component_attention_backends == {"Transformer.cross": "fa", "text_encoder": "fa2", "vae.self": "fa"}
    assert cfg.component_keys() == [("Transformer", "cross"), ("text_encoder", None), ("vae", "self")]
    assert AttentionConfig().component_keys() == []


def test_numbered_component_base():
    assert numbered_component_base("text_encoder_2") == "text_encoder"
    assert numbered_component_base("text_encoder_10") == "text_encoder"
    assert numbered_component_base("a_2_3") == "a_2"
    for name in ("text_encoder", "_2", "vae2", "text_encoder_x"):
        assert numbered_component_base(name) is None


def test_roles_in_every_form(tmp_path, monkeypatch):
    expected = {"transformer.self": "fa", "transformer.cross": "torch_sdpa", "vae": "fa2"}
    forms = [
        ["--component-attention-backends", "transformer.self=fa3,transformer.cross=torch_sdpa,vae=fa2"],
        ["--component-attention-backends", json.dumps({"transformer.self": "fa", "transformer": {"cross": "torch_sdpa"},
                                                        "vae": "fa2"})],
        ["--component-attention-backends.transformer.self", "fa",
         "--component-attention-backends.transformer.cross=torch_sdpa", "--component-attention-backends.vae", "fa2"],
        ["--component_attention_backends.transformer.self", "fa",
         "--component_attention_backends.transformer.cross=torch_sdpa", "--component_attention_backends=vae=fa2"],
        ["--config", write(tmp_path, "roles.toml", '[component_attention_backends]\nvae = "fa2"\n'
                           '[component_attention_backends.transformer]\nself = "fa"\ncross = "torch_sdpa"\n')],
        ["--config", write(tmp_path, "dotted.toml", '[component_attention_backends]\n"transformer.self" = "fa"\n'
                           'transformer.cross = "torch_sdpa"\nvae = "fa2"\n')],
        ["--config", write(tmp_path, "roles.json", json.dumps({"component_attention_backends": expected}))],
    ]
    for argv in forms:
        assert AttentionConfig.from_cli(argv).component_attention_backends == expected, argv
    monkeypatch.setenv(ENV_COMPONENT_ATTENTION_BACKENDS, "transformer.self=fa,transformer.cross=torch_sdpa,vae=fa2")
    assert AttentionConfig.from_cli([]).component_attention_backends == expected
    assert AttentionConfig.from_cli(["--attention_backend", "fa2"]).attention_backend == "fa2"
    assert AttentionConfig.from_cli(["--attention_backend=fa2"]).attention_backend == "fa2"


@pytest.mark.parametrize(
    "value, message",
    [
        ("transformer.selfish=fa", "component key 'transformer.selfish': role 'selfish' not in ['cross', 'self']"),
        ("transformer.=fa", "role '' not in ['cross', 'self']"),
        ("transformer.self.x=fa", "role 'self.x' not in"),
        (".self=fa", "key must not be empty"),
        ("transformer.self=fa,Transformer.self=fa", None),  # case of the component is kept: two keys
        ("transformer.self=fa,transformer.SELF=fa2", "component 'transformer.self' is given twice"),
        ({"transformer": {"self": "fa"}, "transformer.self": "fa"}, "'transformer.self' is given twice"),
        ({"transformer.self": {"cross": "fa"}}, "already names a role"),
        ({"transformer": {"self": {"x": "fa"}}},
         "component 'transformer.self': attention backend name must be a string"),
        ({"transformer": {1: "fa"}}, "role must be a string"),
        ({"transformer": {"middle": "fa"}}, "component key 'transformer.middle': role 'middle' not in"),
    ],
)
def test_role_errors(value, message):
    if message is None:
        assert len(parse_component_backends(value)) == 2
        return
    with pytest.raises(ValueError, match=message.replace("[", "\\[").replace("(", "\\(")) as info:
        parse_component_backends(value)
    assert "\n" not in str(info.value)


# ---- parse_component_backends ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value, expected",
    [
        (None, {}),
        ("", {}),
        ("   ", {}),
        ({}, {}),
        ("text-encoder=fa3,vae=torch_sdpa", {"text_encoder": "fa", "vae": "torch_sdpa"}),
        (" text-encoder = FA3 , vae=torch_sdpa, ", {"text_encoder": "fa", "vae": "torch_sdpa"}),
        ("a=fa,,b=fa2,", {"a": "fa", "b": "fa2"}),
        ("Text-Encoder=fa2", {"Text_Encoder": "fa2"}),
        ('{"text-encoder": "fa3"}', {"text_encoder": "fa"}),
        ('  {"vae": "Torch_SDPA", "dit": "fa4"}  ', {"vae": "torch_sdpa", "dit": "fa"}),
        ({" text-encoder ": "fa3", "vae": Backend.FA2}, {"text_encoder": "fa", "vae": "fa2"}),
    ],
)
def test_parse_component_backends_forms(value, expected):
    assert parse_component_backends(value) == expected


@pytest.mark.parametrize(
    "value, message",
    [
        ("=fa", "key must not be empty"),
        ("  =fa", "key must not be empty"),
        ({"": "fa"}, "key must not be empty"),
        ('{"": "fa"}', "key must not be empty"),
        ("vae", "entries must be 'component=backend'"),
        ("vae=fa,dit", "entries must be 'component=backend', got 'dit'"),
        ("text-encoder=fa,text_encoder=fa2", "'text-encoder' and as 'text_encoder'"),
        ("vae=fa,vae=fa", "'vae' and as 'vae'"),
        ({"text-encoder": "fa", "text_encoder": "fa2"}, "'text-encoder' and as 'text_encoder'"),
        ('{"vae": "fa", "vae": "fa2"}', "'vae' is given twice"),
        ('{"text-encoder": "fa", "text_encoder": "fa2"}', "'text-encoder' and as 'text_encoder'"),
        ('["vae=fa"]', "must be an object"),
        ("[]", "must be an object"),
        ('"vae=fa"', "must be an object"),
        ('{"vae": ', "invalid JSON"),
        ('{"vae": null}', "component 'vae': attention backend name must be a string"),
        ('{"vae": {"x": "fa"}}', "component key 'vae.x': role 'x' not in ['cross', 'self']"),
        ("vae=", "component 'vae': unknown attention backend ''"),
        ("vae=bogus", "component 'vae': unknown attention backend 'bogus'; valid options"),
        ({3: "fa"}, "key must be a string"),
        (["vae=fa"], "must be a dict"),
        (42, "must be a dict"),
    ],
)
def test_parse_component_backends_errors(value, message):
    with pytest.raises(ValueError, match=message.replace("(", "\\(").replace("[", "\\[")):
        parse_component_backends(value)


def test_config_type_errors():
    with pytest.raises(ValueError, match="must be a dict"):
        AttentionConfig(component_attention_backends=3)
    with pytest.raises(ValueError, match="must be a string"):
        AttentionConfig(attention_backend=1)


# ---- from_cli ---------------------------------------------------------------------------------------------------


def test_from_cli_global_and_components():
    cfg = AttentionConfig.from_cli(
        ["--attention-backend", "FA3", "--component-attention-backends", '{"text-encoder": "fa2"}']
    )
    assert cfg == AttentionConfig("fa", {"text_encoder": "fa2"})
    assert AttentionConfig.from_cli(["--attention-backend=torch_sdpa"]).attention_backend == "torch_sdpa"
    # repeated global flag: the last one wins
    assert AttentionConfig.from_cli(["--attention-backend", "fa", "--attention-backend", "fa2"]).attention_backend == "fa2"
    assert AttentionConfig.from_cli([]) == AttentionConfig()


def test_from_cli_duplicate_within_one_value_is_error():
    with pytest.raises(ValueError, match="--component-attention-backends: component 'vae' is given twice"):
        AttentionConfig.from_cli(["--component-attention-backends", "vae=fa,vae=fa2"])


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--attention-back", "fa"], "abbreviated option --attention-back"),
        (["--attention-back=fa"], "abbreviated option --attention-back"),
        (["--component-attention-backend", "vae=fa"], "--component-attention-backends"),
        (["--conf", "x.json"], "abbreviated option --conf"),
        (["--unknown-flag"], "unrecognized arguments: --unknown-flag"),
        (["stray"], "unrecognized arguments: stray"),
        (["--attention-backend"], "expected one argument"),
        (["--component-attention-backends.vae"], "--component-attention-backends.vae: expected one argument"),
        (["--component-attention-backends.vae", "--attention-backend", "fa"], "expected one argument"),
        (["--component-attention-backends.=fa"], "key must not be empty"),
        (["--component-attention-backends", "vae"], "entries must be 'component=backend'"),
        (["--component-attention-backends", "[1]"], "must be an object"),
    ],
)
def test_from_cli_errors(argv, message):
    with pytest.raises(ValueError, match=message.replace("[", "\\[")) as info:
        AttentionConfig.from_cli(argv)
    assert "\n" not in str(info.value)  # one clear line


def test_from_cli_reads_sys_argv(monkeypatch):
    monkeypatch.setattr("sys.argv", ["prog", "--component-attention-backends.vae", "fa3"])
    assert AttentionConfig.from_cli().component_attention_backends == {"vae": "fa"}


def test_tokens_after_double_dash_are_not_rewritten():
    with pytest.raises(ValueError, match="unrecognized arguments: (-- )?--component-attention-backends\\.vae fa$"):
        AttentionConfig.from_cli(["--", "--component-attention-backends.vae", "fa"])


# ---- a user's own parser ------------------------------------------------------------------------------------


def make_user_parser(**kwargs):
    parser = argparse.ArgumentParser(prog="user", **kwargs)
    parser.add_argument("--steps", type=int, default=1)
    assert AttentionConfig.add_cli_args(parser) is parser
    return parser


def test_user_parser_round_trip():
    parser = make_user_parser()
    ns = parser.parse_args(
        [
            "--steps", "4",
            "--attention-backend", "fa4",
            "--component-attention-backends.text-encoder", "fa3",
            "--component-attention-backends=vae=torch_sdpa",
            "--component-attention-backends.vae=fa2",
        ]
    )
    assert ns.steps == 4
    assert ns.attention_backend == "fa"
    assert ns.component_attention_backends == {"text_encoder": "fa", "vae": "fa2"}
    cfg = AttentionConfig.from_cli_args(ns)
    assert cfg == AttentionConfig("fa", {"text_encoder": "fa", "vae": "fa2"})
    # parse_known_args goes through the same rewrite and keeps the user's extras
    ns, extras = parser.parse_known_args(["--component-attention-backends.dit", "fa", "--other", "x"])
    assert ns.component_attention_backends == {"dit": "fa"}
    assert extras == ["--other", "x"]
    # defaults are not mutated by the merging action
    assert parser.parse_args([]).component_attention_backends is None


@pytest.mark.parametrize("allow_abbrev", [True, False])
@pytest.mark.parametrize("argv", [["--attention-back", "fa"], ["--conf=x.json"], ["--component-att", "vae=fa"]])
def test_user_parser_rejects_abbreviations(capsys, allow_abbrev, argv):
    parser = make_user_parser(allow_abbrev=allow_abbrev)
    with pytest.raises(SystemExit) as info:
        parser.parse_args(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert ("abbreviated option" in err) if allow_abbrev else ("unrecognized arguments" in err)


def test_user_parser_keeps_its_own_abbreviations():
    parser = make_user_parser()  # allow_abbrev=True: the user's own flags may still be abbreviated
    assert parser.parse_args(["--ste", "7"]).steps == 7


def test_user_parser_errors_exit_2(capsys):
    parser = make_user_parser()
    with pytest.raises(SystemExit) as info:
        parser.parse_args(["--component-attention-backends.vae", "bogus"])
    assert info.value.code == 2
    assert "component 'vae': unknown attention backend 'bogus'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parser.parse_args(["--component-attention-backends.vae"])
    assert "expected one argument" in capsys.readouterr().err


def test_subcommand_parser():
    parser = argparse.ArgumentParser(prog="attnsel")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run")
    AttentionConfig.add_cli_args(run)
    ns = parser.parse_args(["run", "--component-attention-backends.vae", "fa3", "--attention-backend", "fa2"])
    assert ns.command == "run"
    assert AttentionConfig.from_cli_args(ns) == AttentionConfig("fa2", {"vae": "fa"})


def test_intermixed_parse():
    parser = make_user_parser()
    parser.add_argument("prompt")
    ns = parser.parse_intermixed_args(["--component-attention-backends.vae", "fa3", "a cat"])
    assert ns.prompt == "a cat"
    assert ns.component_attention_backends == {"vae": "fa"}


def test_from_cli_args_on_bare_namespace():
    assert AttentionConfig.from_cli_args(argparse.Namespace()) == AttentionConfig()
    ns = argparse.Namespace(attention_backend="FA3", component_attention_backends="vae=fa2")
    assert AttentionConfig.from_cli_args(ns) == AttentionConfig("fa", {"vae": "fa2"})
    with pytest.raises(ValueError, match="--attention-backend: unknown attention backend"):
        AttentionConfig.from_cli_args(argparse.Namespace(attention_backend="nope"))


# ---- config files --------------------------------------------------------------------------------------------


def test_json_config_file(tmp_path):
    path = write(
        tmp_path, "attn.json",
        json.dumps({"attention_backend": "fa3", "component_attention_backends": {"text-encoder": "fa2"}}),
    )
    assert AttentionConfig.from_cli(["--config", path]) == AttentionConfig("fa", {"text_encoder": "fa2"})
    # dashed keys and a string value for the components
    path = write(
        tmp_path, "dashed.json",
        json.dumps({"attention-backend": "torch_sdpa", "component-attention-backends": "vae=fa,dit=fa2"}),
    )
    assert AttentionConfig.from_cli(["--config", path]) == AttentionConfig("torch_sdpa", {"vae": "fa", "dit": "fa2"})


def test_toml_config_file(tmp_path):
    path = write(
        tmp_path, "attn.toml",
        'attention-backend = "FA4"\n\n[component_attention_backends]\ntext-encoder = "fa2"\nvae = "torch_sdpa"\n',
    )
    cfg = AttentionConfig.from_cli(["--config", path])
    assert cfg == AttentionConfig("fa", {"text_encoder": "fa2", "vae": "torch_sdpa"})
    path = write(tmp_path, "inline.toml", 'component_attention_backends = "vae=fa3"\n')
    assert AttentionConfig.from_cli(["--config", path]) == AttentionConfig(None, {"vae": "fa"})


def test_config_file_without_telling_suffix(tmp_path):
    assert AttentionConfig.from_cli(["--config", write(tmp_path, "a.cfg", '{"attention_backend": "fa2"}')]).attention_backend == "fa2"
    assert AttentionConfig.from_cli(["--config", write(tmp_path, "b.cfg", 'attention_backend = "fa2"\n')]).attention_backend == "fa2"


@pytest.mark.parametrize(
    "name, text, message",
    [
        ("bad.json", '{"attention_backend": "nope"}', "unknown attention backend 'nope'"),
        ("bad.toml", "[component_attention_backends]\nvae = \"nope\"\n", "component 'vae': unknown attention backend 'nope'"),
        ("both.json", '{"attention_backend": "fa", "attention-backend": "fa2"}', "given twice"),
        ("dup.json", '{"attention_backend": "fa", "attention_backend": "fa2"}', "given twice"),
        ("extra.json", '{"attention_backend": "fa", "steps": 3}', "unknown key 'steps'"),
        ("list.json", '["fa"]', "must hold an object"),
        ("broken.json", '{"attention_backend": ', "not valid JSON or TOML"),
        ("broken.toml", "attention_backend = ", "not valid JSON or TOML"),
        ("broken.cfg", "{{{", "not valid JSON or TOML"),
        ("type.json", '{"attention_backend": 3}', "must be a string"),
    ],
)
def test_config_file_errors(tmp_path, name, text, message):
    path = write(tmp_path, name, text)
    with pytest.raises(ValueError, match=f"config file '.*{name}': .*{message}"):
        AttentionConfig.from_cli(["--config", path])
    # also when reached through a namespace that skipped parse-time validation
    with pytest.raises(ValueError, match=f"config file '.*{name}': .*{message}"):
        AttentionConfig.from_cli_args(argparse.Namespace(config=path))


def test_missing_config_file(tmp_path):
    with pytest.raises(ValueError, match="config file .*: cannot read"):
        AttentionConfig.from_cli(["--config", str(tmp_path / "missing.json")])


# ---- environment and precedence ----------------------------------------------------------------------------------


def test_env_vars(monkeypatch):
    monkeypatch.setenv(ENV_ATTENTION_BACKEND, " Fa3 ")
    monkeypatch.setenv(ENV_COMPONENT_ATTENTION_BACKENDS, "text-encoder=fa2,vae=torch_sdpa")
    assert AttentionConfig.from_cli([]) == AttentionConfig("fa", {"text_encoder": "fa2", "vae": "torch_sdpa"})
    monkeypatch.setenv(ENV_COMPONENT_ATTENTION_BACKENDS, '{"dit": "fa4"}')
    assert AttentionConfig.from_cli([]).component_attention_backends == {"dit": "fa"}
    # set but empty counts as unset
    monkeypatch.setenv(ENV_ATTENTION_BACKEND, "")
    monkeypatch.setenv(ENV_COMPONENT_ATTENTION_BACKENDS, "")
    assert AttentionConfig.from_cli([]) == AttentionConfig()


def test_env_errors_name_the_variable(monkeypatch):
    monkeypatch.setenv(ENV_ATTENTION_BACKEND, "nope")
    with pytest.raises(ValueError, match="^ATTNSEL_ATTENTION_BACKEND: unknown attention backend 'nope'"):
        AttentionConfig.from_cli([])
    monkeypatch.delenv(ENV_ATTENTION_BACKEND)
    monkeypatch.setenv(ENV_COMPONENT_ATTENTION_BACKENDS, "vae=fa,vae=fa2")
    with pytest.raises(ValueError, match="^ATTNSEL_COMPONENT_ATTENTION_BACKENDS: component 'vae' is given twice"):
        AttentionConfig.from_cli([])


def test_precedence_cli_over_env_over_file(tmp_path, monkeypatch):
    path = write(
        tmp_path, "attn.toml",
        'attention_backend = "fa2"\n[component_attention_backends]\na = "fa2"\nb = "fa2"\nc = "fa2"\n',
    )
    assert AttentionConfig.from_cli(["--config", path]) == AttentionConfig("fa2", {"a": "fa2", "b": "fa2", "c": "fa2"})

    monkeypatch.setenv(ENV_ATTENTION_BACKEND, "torch_sdpa")
    monkeypatch.setenv(ENV_COMPONENT_ATTENTION_BACKENDS, "b=torch_sdpa,c=torch_sdpa,d=torch_sdpa")
    cfg = AttentionConfig.from_cli(["--config", path])
    assert cfg.attention_backend == "torch_sdpa"
    assert cfg.component_attention_backends == {"a": "fa2", "b": "torch_sdpa", "c": "torch_sdpa", "d": "torch_sdpa"}

    cfg = AttentionConfig.from_cli(
        ["--config", path, "--attention-backend", "fa", "--component-attention-backends.c", "fa", "--component-attention-backends", "e=fa"]
    )
    assert cfg.attention_backend == "fa"
    assert cfg.component_attention_backends == {"a": "fa2", "b": "torch_sdpa", "c": "fa", "d": "torch_sdpa", "e": "fa"}


# ---- process-wide config ------------------------------------------------------------------------------------


def test_set_config_pushes_into_native(restore_config):
    assert isinstance(get_config(), AttentionConfig)
    cfg = AttentionConfig(attention_backend="fa3", component_attention_backends="vae=fa2")
    set_config(cfg)
    assert get_config() is cfg
    assert _C.global_backend() == Backend.FA.value == int(Backend.FA)
    set_config(AttentionConfig(attention_backend="sdpa_math"))
    assert _C.global_backend() == Backend.SDPA_MATH.value
    set_config(AttentionConfig())
    assert _C.global_backend() is None
    set_config(AttentionConfig(attention_backend="torch_sdpa"))
    set_config(None)
    assert get_config() == AttentionConfig()
    assert _C.global_backend() is None


def test_set_config_validates_type(restore_config):
    before = get_config()
    for bad in ("fa", {"attention_backend": "fa"}, 1):
        with pytest.raises(ValueError, match="AttentionConfig"):
            set_config(bad)
    assert get_config() is before


def test_user_parser_without_exit_on_error_raises_argument_error():
    parser = make_user_parser(exit_on_error=False)
    with pytest.raises(argparse.ArgumentError, match="abbreviated option --attention-back"):
        parser.parse_args(["--attention-back", "fa"])
    with pytest.raises(argparse.ArgumentError, match="expected one argument"):
        parser.parse_args(["--component-attention-backends.vae"])
    with pytest.raises(argparse.ArgumentError, match="component 'vae': unknown attention backend"):
        parser.parse_args(["--component-attention-backends.vae=nope"])
    assert parser.parse_args(["--component-attention-backends.vae=fa3"]).component_attention_backends == {"vae": "fa"}


# ---- issue 13: every bad input is a ValueError with one line, and the API never exits --------------------------


def test_help_does_not_exit():
    for flag in ("-h", "--help"):
        with pytest.raises(HelpRequested) as info:
            AttentionConfig.from_cli(["--attention-backend", "fa", flag])
        assert isinstance(info.value, ValueError) and "\n" not in str(info.value)
        assert "--component-attention-backends" in info.value.help and "--config" in info.value.help


@pytest.mark.parametrize("argv, message", [
    ([None], "argv[0] must be a string, got NoneType"),
    (["--attention-backend", 3], "argv[1] must be a string, got int"),
    ([b"--attention-backend"], "argv[0] must be a string, got bytes"),
    ("--attention-backend fa", "argv must be a list of strings, not one str"),
    (7, "argv must be a list of strings, got int"),
])
def test_non_string_argv_is_value_error(argv, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        AttentionConfig.from_cli(argv)


@pytest.mark.parametrize("value", [
    "[" * 1200,
    '{"a":' * 1200,
    '{"vae": ' + "[" * 1200,
    json.dumps({"vae": "fa"})[:-1] + ', "x": ' + "[" * 5000 + "]" * 5000 + "}",
])
def test_deep_json_value_is_value_error(value):
    with pytest.raises(ValueError) as info:
        parse_component_backends(value)
    assert "\n" not in str(info.value) and len(str(info.value)) < 1000
    with pytest.raises(ValueError):
        AttentionConfig.from_cli(["--component-attention-backends", value])


@pytest.mark.parametrize("name, text", [
    ("deep.json", "[" * 1200),
    ("deep.toml", "d = " + "[" * 1200),
    ("deep_inline.toml", "component_attention_backends = " + "{a = " * 1200),
    ("deep_value.json", '{"component_attention_backends": {"vae": ' + "[" * 900 + "]" * 900 + "}}"),
])
def test_deep_config_file_is_value_error(tmp_path, name, text):
    path = write(tmp_path, name, text)
    with pytest.raises(ValueError, match=f"config file '.*{name}'") as info:
        AttentionConfig.from_cli(["--config", path])
    assert "\n" not in str(info.value) and len(str(info.value)) < 1000


@pytest.mark.parametrize("value, message", [
    (0, "--config: expected a file path, got int: 0"),
    (1.5, "expected a file path, got float"),
    (["a.toml"], "expected a file path, got list"),
    ("nul\0byte.toml", "cannot read: embedded null byte"),
    ("", "cannot read"),
    ("/dev/zero", "larger than 1048576 bytes"),
])
def test_bad_config_values_are_value_errors(value, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        AttentionConfig.from_cli_args(argparse.Namespace(config=value))


def test_config_path_forms(tmp_path):
    path = write(tmp_path, "a.json", '{"attention_backend": "fa2"}')
    from pathlib import Path

    for value in (path, Path(path), path.encode()):
        assert AttentionConfig.from_cli_args(argparse.Namespace(config=value)).attention_backend == "fa2"
    binary = tmp_path / "bin.json"
    binary.write_bytes(b'{"attention_backend": "\xff"}')
    with pytest.raises(ValueError, match="bin.json': not UTF-8 text"):
        AttentionConfig.from_cli(["--config", str(binary)])


def test_huge_values_give_bounded_one_line_errors():
    with pytest.raises(ValueError) as info:
        parse_component_backends({"x" * 100000: ["nested"] * 100000})
    assert len(str(info.value)) < 1000 and "\n" not in str(info.value)
    with pytest.raises(ValueError, match="entries must be 'component=backend'") as info:
        parse_component_backends("v\nae" * 10000)
    assert "\n" not in str(info.value)
