"""Backend names, the priority chain at every level, refusals with reasons, and the selection cache."""

import pytest
import torch

import attnsel
from attnsel import Backend, _C


def test_backend_enum_matches_native_registry():
    names = attnsel.backend_names()
    assert names == list(_C.backend_names())
    for name in ["fa2", "fa", "torch_sdpa", "sage_attn", "sage_attn_3", "sliding_tile_attn", "video_sparse_attn",
                 "sparse_video_gen_2_attn", "vmoba_attn", "aiter", "aiter_sage", "sla_attn", "sage_sla_attn",
                 "no_attention", "native"]:
        member = Backend[name.upper()]
        assert member.name.lower() == name
        assert attnsel.normalize_backend_name(name) == name


@pytest.mark.parametrize("raw, expected", [
    ("fa3", "fa"), ("FA4", "fa"), (" Fa3 ", "fa"), ("fa2", "fa2"), ("TORCH_SDPA", "torch_sdpa"),
    ("torch _sdpa", "torch_sdpa"), ("\tnative\n", "native"), (Backend.FA, "fa"),
])
def test_normalize_backend_name(raw, expected):
    assert attnsel.normalize_backend_name(raw) == expected


def test_normalize_rejects_unknown_with_every_option():
    with pytest.raises(ValueError) as info:
        attnsel.normalize_backend_name("flash9")
    message = str(info.value)
    assert "'flash9'" in message
    for name in attnsel.backend_names():
        assert name in message
    assert "fa3" in message and "fa4" in message


@pytest.mark.parametrize("bad", [None, 3, b"fa", ["fa"]])
def test_normalize_rejects_non_strings(bad):
    with pytest.raises(ValueError, match="must be a string"):
        attnsel.normalize_backend_name(bad)


def test_auto_on_cpu_is_native_then_sdpa():
    e = attnsel.explain_attn_backend(64, torch.float32)
    assert (e.backend, e.source, e.component) == (Backend.NATIVE, "auto", None)
    # native refuses head sizes above 512: the automatic choice moves on and says why.
    e = attnsel.explain_attn_backend(1024, torch.float32)
    assert e.backend == Backend.TORCH_SDPA and e.source == "auto"
    assert any("native" in r and "1024" in r for r in e.reasons)
    # a layer that supports only torch_sdpa gets it automatically
    assert attnsel.get_attn_backend(64, torch.float32, supported=["torch_sdpa"]) == Backend.TORCH_SDPA


def test_priority_chain_every_level():
    def pick(**kw):
        e = attnsel.explain_attn_backend(64, torch.float32, "cpu", **kw)
        return e.backend, e.source

    assert pick() == (Backend.NATIVE, "auto")
    attnsel.set_config(attnsel.AttentionConfig(attention_backend="torch_sdpa"))
    assert pick() == (Backend.TORCH_SDPA, "global")
    with attnsel.component_attention_backend("vae", "native"):
        assert pick() == (Backend.NATIVE, "component")
        assert attnsel.explain_attn_backend(64, torch.float32).component == "vae"
        with attnsel.force_attention_backend("torch_sdpa"):
            assert pick() == (Backend.TORCH_SDPA, "forced")
            assert pick(selected="native") == (Backend.NATIVE, "explicit")
        assert pick() == (Backend.NATIVE, "component")
    # a component scope without override falls through to the global level but records the component
    with attnsel.component_attention_backend("text_encoder", None):
        e = attnsel.explain_attn_backend(64, torch.float32)
        assert (e.backend, e.source, e.component) == (Backend.TORCH_SDPA, "global", "text_encoder")
    attnsel.set_config(None)
    assert pick() == (Backend.NATIVE, "auto")


@pytest.mark.parametrize("level", ["explicit", "forced", "component", "global"])
def test_unrunnable_choice_is_an_error_at_every_level(level):
    def select():
        return attnsel.get_attn_backend(64, torch.float32, "cpu", selected="fa3" if level == "explicit" else None)

    if level == "explicit":
        ctx = None
    elif level == "forced":
        ctx = attnsel.force_attention_backend("fa3")
    elif level == "component":
        ctx = attnsel.component_attention_backend("transformer", "fa3")
    else:
        attnsel.set_config(attnsel.AttentionConfig(attention_backend="fa3"))
        ctx = None
    with pytest.raises(ValueError) as info:
        if ctx is None:
            select()
        else:
            with ctx:
                select()
    message = str(info.value)
    assert "'fa'" in message and "cpu" in message and "float32" in message
    if level == "component":
        assert "transformer" in message


def test_refusal_lists_every_reason():
    with pytest.raises(ValueError) as info:
        attnsel.get_attn_backend(600, torch.float32, "cpu", selected="sage_attn")
    message = str(info.value)
    assert "cuda" in message and "float32" in message and "600" in message


def test_known_but_unimplemented_backends_explain_themselves():
    for name in ["sliding_tile_attn", "vmoba_attn", "no_attention"]:
        with pytest.raises(ValueError, match=name):
            attnsel.get_attn_backend(64, torch.bfloat16, "cuda", selected=name)


def test_supported_set_excludes_choice():
    with pytest.raises(ValueError, match="supported set"):
        attnsel.get_attn_backend(64, torch.float32, supported=["torch_sdpa"], selected="native")
    with pytest.raises(ValueError):
        attnsel.get_attn_backend(64, torch.float32, supported=[])


@pytest.mark.parametrize("kwargs, match", [
    (dict(head_size=0, dtype=torch.float32), "head_size"),
    (dict(head_size=True, dtype=torch.float32), "head_size"),
    (dict(head_size=64, dtype=torch.int8), "dtype"),
    (dict(head_size=64, dtype=torch.float32, device="meta"), "cpu, cuda"),
    (dict(head_size=64, dtype=torch.float32, device="nonsense"), "device"),
    (dict(head_size=64, dtype=torch.float32, selected="bogus"), "valid options"),
])
def test_bad_selection_inputs(kwargs, match):
    with pytest.raises(ValueError, match=match):
        attnsel.get_attn_backend(**kwargs)


def test_cache_hits_and_invalidation():
    _C.clear_selection_cache()
    attnsel.get_attn_backend(64, torch.float32)
    hits = _C.selection_cache_hits()
    assert attnsel.get_attn_backend(64, torch.float32) == Backend.NATIVE
    assert _C.selection_cache_hits() == hits + 1
    # every input the answer depends on is part of the key: none of these may return the cached native answer
    assert attnsel.get_attn_backend(64, torch.float32, supported=["torch_sdpa"]) == Backend.TORCH_SDPA
    assert attnsel.get_attn_backend(64, torch.float32, selected="torch_sdpa") == Backend.TORCH_SDPA
    assert attnsel.get_attn_backend(1024, torch.float32) == Backend.TORCH_SDPA
    with attnsel.force_attention_backend("torch_sdpa"):
        assert attnsel.get_attn_backend(64, torch.float32) == Backend.TORCH_SDPA
    with attnsel.component_attention_backend("a", "torch_sdpa"):
        assert attnsel.get_attn_backend(64, torch.float32) == Backend.TORCH_SDPA
        with attnsel.component_attention_backend("b", None):
            assert attnsel.explain_attn_backend(64, torch.float32).component == "b"
    _C.set_global_backend(int(Backend.TORCH_SDPA))
    assert attnsel.get_attn_backend(64, torch.float32) == Backend.TORCH_SDPA
    _C.set_global_backend(None)
    assert attnsel.get_attn_backend(64, torch.float32) == Backend.NATIVE


def test_cache_invalidated_when_availability_changes():
    assert attnsel.get_attn_backend(64, torch.float32) == Backend.NATIVE
    try:
        _C.set_backend_availability(int(Backend.NATIVE), "cpu", False, "disabled by a test")
        e = attnsel.explain_attn_backend(64, torch.float32)
        assert e.backend == Backend.TORCH_SDPA
        assert any("disabled by a test" in r for r in e.reasons)
    finally:
        _C.set_backend_availability(int(Backend.NATIVE), "cpu", True, "")
    assert attnsel.get_attn_backend(64, torch.float32) == Backend.NATIVE


def test_nn_attention_exposes_backend_and_reasons():
    layer = attnsel.nn.Attention(4, 64)
    assert layer.backend == Backend.NATIVE and layer.selection.source == "auto"
    with attnsel.component_attention_backend("vae", "torch_sdpa"):
        inner = attnsel.nn.Attention(4, 64)
    assert inner.backend == Backend.TORCH_SDPA and inner.selection.component == "vae"
    assert attnsel.nn.Attention(4, 64, backend="torch_sdpa").selection.source == "explicit"
    with pytest.raises(ValueError, match="num_kv_heads"):
        attnsel.nn.Attention(4, 64, num_kv_heads=3)
    with pytest.raises(ValueError, match="head_dim"):
        attnsel.nn.Attention(4, -1)
