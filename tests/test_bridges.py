"""Bridges to flash-attn 2/3/4 and sageattention, checked on any machine with stand-in modules.

The stand-ins take flash-attn's (B, S, H, D) layout and compute with PyTorch SDPA, so these tests prove what the
bridge code owns: which module each backend resolves to, the layout transposes, scale / causal / GQA pass-through,
refusals with reasons, and what the native registry is told when a library is missing, broken or has no GPU.
"""

import importlib.machinery
import sys
import types

import pytest
import torch
import torch.nn.functional as F

import attnsel
from attnsel import Backend, bridges


def _module(monkeypatch, name, **attrs):
    mod = types.ModuleType(name)
    mod.__spec__ = importlib.machinery.ModuleSpec(name, None)
    for key, value in attrs.items():
        setattr(mod, key, value)
    monkeypatch.setitem(sys.modules, name, mod)
    return mod


def _flash_standin(calls):
    """flash_attn_func as flash-attn defines it: (B, S, H, D) in and out; FA3 returns (out, lse)."""

    def flash_attn_func(q, k, v, softmax_scale=None, causal=False):
        calls.append(dict(q_shape=tuple(q.shape), scale=softmax_scale, causal=causal))
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal, scale=softmax_scale,
            enable_gqa=q.shape[2] != k.shape[2],
        )
        return out.transpose(1, 2), torch.zeros(1)

    return flash_attn_func


@pytest.fixture
def restore_registry(monkeypatch):
    """The stand-ins must not outlive the test: they are removed, then the registry is re-probed."""
    yield
    monkeypatch.undo()
    bridges.BRIDGES.clear()
    bridges.detect()


def test_fa3_module_wins_and_the_bridge_transposes(monkeypatch, restore_registry):
    calls = []
    _module(monkeypatch, "flash_attn_interface", flash_attn_func=_flash_standin(calls))
    fn, why = bridges._import_fa()
    assert fn is not None and "FA3" in why
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 8, 33, 64, generator=g)
    k, v = (torch.randn(2, 2, 45, 64, generator=g) for _ in range(2))  # GQA: 8 query heads over 2 kv heads
    out = fn(q, k, v, scale=0.3)
    assert calls[-1] == dict(q_shape=(2, 33, 8, 64), scale=0.3, causal=False)  # (B, S, H, D) handed over
    ref = F.scaled_dot_product_attention(q, k, v, scale=0.3, enable_gqa=True)
    assert out.shape == ref.shape and torch.allclose(out, ref, atol=1e-5)  # and (B, H, S, D) handed back
    kk, vv = (torch.randn(2, 2, 33, 64, generator=g) for _ in range(2))
    out = fn(q, kk, vv, is_causal=True)
    assert calls[-1]["causal"] is True
    assert torch.allclose(out, F.scaled_dot_product_attention(q, kk, vv, is_causal=True, enable_gqa=True), atol=1e-5)


def test_fa4_is_found_under_flash_attn_cute(monkeypatch, restore_registry):
    monkeypatch.delitem(sys.modules, "flash_attn_interface", raising=False)
    monkeypatch.setattr(bridges.importlib.util, "find_spec",
                        lambda name, *a: None if name == "flash_attn_interface" else sys.modules[name].__spec__)
    _module(monkeypatch, "flash_attn", __version__="4.0.0", flash_attn_func=_flash_standin([]))
    _module(monkeypatch, "flash_attn.cute")
    _module(monkeypatch, "flash_attn.cute.interface", flash_attn_func=_flash_standin([]))
    fn, why = bridges._import_fa()
    assert fn is not None and "FA4" in why
    fn2, why2 = bridges._import_fa2()
    assert fn2 is not None and "4.0.0" in why2


def test_bridges_refuse_masks_and_misaligned_causal_with_reasons(monkeypatch, restore_registry):
    _module(monkeypatch, "flash_attn_interface", flash_attn_func=_flash_standin([]))
    fn, _ = bridges._import_fa()
    q = torch.randn(1, 2, 5, 64)
    k = torch.randn(1, 2, 7, 64)
    with pytest.raises(ValueError, match="fa takes no attn_mask"):
        fn(q, q, q, attn_mask=torch.ones(5, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="causal masks differently.*5 vs 7"):
        fn(q, k, k, is_causal=True)
    with pytest.raises(ValueError, match="sage_attn takes no attn_mask"):
        bridges._sage(q, q, q, attn_mask=torch.ones(5, 5, dtype=torch.bool))


def test_registry_is_told_why_a_present_library_cannot_run(monkeypatch, restore_registry):
    if torch.cuda.is_available():
        pytest.skip("checks the no-GPU reasons")
    _module(monkeypatch, "flash_attn_interface", flash_attn_func=_flash_standin([]))
    bridges.detect()
    assert Backend.FA in bridges.BRIDGES  # found ...
    no_cuda = "this PyTorch build has no CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
    with pytest.raises(ValueError, match=no_cuda):  # ... but cannot run, and selection says why
        attnsel.get_attn_backend(128, torch.bfloat16, "cuda", selected="fa3")


def test_a_broken_install_explains_itself(monkeypatch, restore_registry):
    real_find_spec = bridges.importlib.util.find_spec

    def find_spec(name, *args):
        if name == "sageattention":
            return importlib.machinery.ModuleSpec(name, None)
        return real_find_spec(name, *args)

    monkeypatch.setattr(bridges.importlib.util, "find_spec", find_spec)
    monkeypatch.setattr(bridges, "_import_sage", lambda: (_ for _ in ()).throw(RuntimeError("boom: missing libcuda")))
    bridges.detect()  # must not raise: `import attnsel` stays usable
    with pytest.raises(ValueError, match="import failed: RuntimeError: boom: missing libcuda"):
        attnsel.get_attn_backend(128, torch.float16, "cuda", selected="sage_attn")
