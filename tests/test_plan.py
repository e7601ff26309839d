"""Selection that sees the call: descriptors, per-call plans, refusals naming the feature, the tuning table's effect,
and every backend reachable through the op (stand-in bridges on any machine)."""

import itertools

import pytest
import torch
import torch.nn.functional as F

import attnsel
from attnsel import Backend, _C, bridges
from attnsel.selection import call_signature

HEAD_SIZES = [8, 16, 40, 64, 72, 80, 88, 96, 128, 160, 192, 256, 512]


def reference(q, k, v, mask, causal, scale=None):
    """float64 SDPA-semantics reference (top-left causal, GQA by repetition, bool True = attend)."""
    group = q.shape[1] // k.shape[1]
    qd, kd, vd = q.double(), k.double().repeat_interleave(group, 1), v.double().repeat_interleave(group, 1)
    s = (qd @ kd.transpose(-1, -2)) * (scale if scale is not None else q.shape[-1] ** -0.5)
    if causal:
        s = s.masked_fill(torch.ones(q.shape[2], k.shape[2], dtype=torch.bool).triu(1), float("-inf"))
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask.double()
    p = torch.softmax(s, -1).nan_to_num(0.0)  # fully masked rows: zeros
    return p @ vd


def make_mask(kind, form, B, H, Sq, Sk, g):
    if kind is None:
        return None
    shape = {"key_padding": (B, 1, 1, Sk), "2d": (Sq, Sk), "full": (B, H, Sq, Sk), "keys": (Sk,)}[form]
    if kind == "bool":
        m = torch.rand(shape, generator=g) > 0.2
        m[..., 0] = True  # every row sees a key (fully masked rows are tested in the kernel tests)
        return m
    return torch.randn(shape, generator=g)


CASES = list(itertools.product([None, "bool", "additive"], ["key_padding", "2d", "full", "keys"], [False, True]))


def _auto_case(case, device, dtypes):
    g = torch.Generator().manual_seed(100 + case)
    kind, form, causal = CASES[case % len(CASES)]
    D = HEAD_SIZES[case % len(HEAD_SIZES)]
    B, Hkv = 1 + case % 2, 1 + case % 3
    H = Hkv * (1 + case % 2)
    Sq, Sk = 5 + 7 * (case % 4), 3 + 11 * (case % 3) + (case % 2)
    if device == "cuda":  # longer sequences, so the GPU kernels' tiles and their edges are exercised
        Sq, Sk = Sq * 17 + case, Sk * 23 + 2 * case
    dtype = dtypes[case % len(dtypes)]
    q = torch.randn(B, H, Sq, D, generator=g).to(dtype)
    k, v = (torch.randn(B, Hkv, Sk, D, generator=g).to(dtype) for _ in range(2))
    if case % 5 == 0:  # non-contiguous inputs
        q = torch.randn(B, Sq, H, D, generator=g).to(dtype).transpose(1, 2)
    mask = make_mask(kind, form, B, H, Sq, Sk, g)
    if causal and mask is not None and mask.dtype == torch.bool:
        mask[..., 0] = True
    ref = reference(q, k, v, mask, causal)
    q, k, v = (t.to(device) for t in (q, k, v))
    mask = None if mask is None else mask.to(device)
    plan = attnsel.explain_call(q, k, v, attn_mask=mask, is_causal=causal)
    out = attnsel.attention(q, k, v, attn_mask=mask, is_causal=causal)
    assert plan.source == "auto" and plan.reasons
    sdpa_mask = None if mask is None else mask.view((1,) * (4 - mask.dim()) + tuple(mask.shape))
    if sdpa_mask is not None and sdpa_mask.dtype != torch.bool:
        sdpa_mask = sdpa_mask.to(dtype)
    sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=sdpa_mask, is_causal=causal, enable_gqa=H != Hkv)
    ours_err = (out.double().cpu() - ref).abs().max().item()
    sdpa_err = (sdpa.double().cpu() - ref).abs().max().item()
    assert ours_err <= 2 * sdpa_err + (1e-5 if dtype == torch.float32 else 1e-2), (plan, ours_err, sdpa_err)


@pytest.mark.parametrize("case", range(26))
def test_auto_never_fails_where_some_backend_can_run(case):
    """backend=None takes any call some available backend can run (masks of every broadcast form, causal, GQA,
    Sq != Sk, every head size class), and gives the reference's answer."""
    _auto_case(case, "cpu", [torch.bfloat16, torch.float32, torch.float32])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("case", range(48))
def test_auto_never_fails_on_cuda(case):
    """The same sweep on the GPU in half precision, where auto chooses among native, cuDNN, flash, efficient, ..."""
    _auto_case(case, "cuda", [torch.bfloat16, torch.float16])


def _flash_standin(calls):
    """flash_attn_func as flash-attn defines it: (B, S, H, D) in and out; computes with PyTorch SDPA."""

    def flash_attn_func(q, k, v, softmax_scale=None, causal=False):
        calls.append(tuple(q.shape))
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             is_causal=causal, scale=softmax_scale, enable_gqa=q.shape[2] != k.shape[2])
        return out.transpose(1, 2)

    return flash_attn_func


@pytest.fixture
def fa_on_cpu():
    """A flash-attn stand-in registered as `fa` on the CPU, as bridges.detect() registers the real one on CUDA."""
    calls = []
    bridges.register(Backend.FA, bridges._flash_layout(_flash_standin(calls), "fa"), "stand-in (test)", device="cpu",
                     auto_rank=-1)  # a candidate for auto only where measured
    yield calls
    _C.register_backend(int(Backend.FA), "cpu", dict(available=False, unavailable_reason="unregistered (test)"))
    bridges.BRIDGES.clear()
    bridges.detect()
    _C.clear_tuning_table()


def test_a_named_backend_refuses_the_feature_it_cannot_take(fa_on_cpu):
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 2, 16, 64, generator=g).bfloat16()
    k = torch.randn(1, 2, 24, 64, generator=g).bfloat16()
    out = attnsel.attention(q, k, k, backend="fa3")  # runs through the op and the bridge
    assert fa_on_cpu == [(1, 16, 2, 64)]
    assert torch.equal(out, F.scaled_dot_product_attention(q, k, k))
    with pytest.raises(ValueError, match="fa: cannot take a boolean mask"):
        attnsel.attention(q, k, k, attn_mask=torch.ones(16, 24, dtype=torch.bool), backend="fa")
    with pytest.raises(ValueError, match="fa: cannot take an additive mask"):
        attnsel.attention(q, k, k, attn_mask=torch.zeros(16, 24), backend="fa")
    with pytest.raises(ValueError, match=r"fa: cannot take causal masking with query and key lengths differing \(16 vs 24\)"):
        attnsel.attention(q, k, k, is_causal=True, backend="fa")
    with pytest.raises(ValueError, match=r"fa: head_size 264 not supported \(needs 8..256, a multiple of 8\)"):
        big = torch.randn(1, 2, 4, 264, dtype=torch.bfloat16)
        attnsel.attention(big, big, big, backend="fa")
    with pytest.raises(ValueError, match=r"fa: dtype float32 not supported \(takes float16, bfloat16\)"):
        attnsel.attention(q.float(), k.float(), k.float(), backend="fa")
    # Never a silent switch: the same call under a component policy naming fa fails the same way.
    with attnsel.component_attention_backend("transformer", "fa"):
        with pytest.raises(ValueError, match="fa: cannot take a boolean mask"):
            attnsel.attention(q, k, k, attn_mask=torch.ones(16, 24, dtype=torch.bool))


def test_auto_takes_the_measured_fastest_that_accepts_the_call(fa_on_cpu):
    g = torch.Generator().manual_seed(2)
    q = torch.randn(1, 4, 100, 64, generator=g).bfloat16()
    sig = call_signature(q, q, q)
    assert attnsel.explain_call(q, q, q).backend == Backend.NATIVE  # static rank on CPU: native first
    _C.set_tuning_entry(sig.bucket(), [(int(Backend.NATIVE), 3.0), (int(Backend.FA), 1.0),
                                       (int(Backend.TORCH_SDPA), 2.0)])
    plan = attnsel.explain_call(q, q, q)
    assert plan.backend == Backend.FA and plan.measured == {Backend.NATIVE: 3.0, Backend.FA: 1.0,
                                                            Backend.TORCH_SDPA: 2.0}
    assert "fastest measured" in plan.reasons[-1]
    n = len(fa_on_cpu)
    attnsel.attention(q, q, q)
    assert len(fa_on_cpu) == n + 1  # auto ran the measured winner
    # A nearby shape in the same half-octave bucket shares the entry.
    q2 = torch.randn(1, 4, 120, 64, generator=g).bfloat16()  # (91, 128]: the bucket of 100
    assert call_signature(q2, q2, q2).bucket() == sig.bucket()
    assert attnsel.explain_call(q2, q2, q2).backend == Backend.FA
    # Masked calls have their own bucket; where its fastest refuses masks, the next fastest that accepts runs.
    m = torch.rand(100, 100, generator=g) > 0.5
    m[:, 0] = True
    masked_sig = call_signature(q, q, q, m)
    assert masked_sig.bucket() != sig.bucket()
    _C.set_tuning_entry(masked_sig.bucket(), [(int(Backend.FA), 1.0), (int(Backend.TORCH_SDPA), 2.0),
                                              (int(Backend.NATIVE), 3.0)])
    masked = attnsel.explain_call(q, q, q, attn_mask=m)
    assert masked.backend == Backend.TORCH_SDPA and any("fa: cannot take a boolean mask" in r for r in masked.reasons)
    assert torch.equal(attnsel.attention(q, q, q, attn_mask=m), F.scaled_dot_product_attention(q, q, q, attn_mask=m))


def test_torch_compile_traces_auto_and_every_bridge(fa_on_cpu):
    layer_auto = attnsel.nn.Attention(2, 64, dtype=torch.bfloat16)
    layer_fa = attnsel.nn.Attention(2, 64, backend="fa", dtype=torch.bfloat16)
    assert layer_auto.policy is None and layer_fa.policy == Backend.FA

    def f(q, k, v):
        return layer_auto(q, k, v) + layer_fa(q, k, v, is_causal=True) + attnsel.attention(q, k, v, backend="torch_sdpa")

    q = torch.randn(1, 2, 17, 64).bfloat16()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(q, q, q), f(q, q, q))


def test_opcheck_every_registered_backend_available_here(fa_on_cpu):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 9, 16, generator=g).bfloat16()
    k = torch.randn(1, 2, 11, 16, generator=g).bfloat16()
    checked = []
    for backend in Backend:
        sig = call_signature(q, k, k)
        if _C.refusal_reasons(int(backend), sig):
            continue
        torch.library.opcheck(torch.ops.attnsel.attention.default, (q, k, k, None, False, 0.3, int(backend)),
                              test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))
        if _C.backend_descriptor(int(backend), "cpu")["features"]["lse"]:  # and the (out, lse) form
            torch.library.opcheck(torch.ops.attnsel.attention.default,
                                  (q, k, k, None, False, 0.3, int(backend), True),
                                  test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))
        checked.append(backend)
    assert {Backend.NATIVE, Backend.TORCH_SDPA, Backend.FA} <= set(checked)


def test_roles_outrank_the_component_for_layers_of_that_role():
    with attnsel.component_attention_backend("transformer", "native", roles={"cross": "torch_sdpa"}):
        self_layer = attnsel.nn.Attention(2, 32, role="self")
        cross_layer = attnsel.nn.Attention(2, 32, role="cross")
        plain = attnsel.nn.Attention(2, 32)
    assert self_layer.policy == Backend.NATIVE and cross_layer.policy == Backend.TORCH_SDPA
    assert plain.policy == Backend.NATIVE
    assert "transformer.cross" in " ".join(cross_layer.selection.reasons)
    with pytest.raises(ValueError, match=r"\['cross', 'self'\]"):
        attnsel.nn.Attention(2, 32, role="joint")
    with pytest.raises(ValueError, match=r"\['cross', 'self'\]"):
        with attnsel.component_attention_backend("transformer", roles={"joint": "native"}):
            pass


def test_backends_command_prints_features(capsys):
    from attnsel.cli import main

    assert main(["backends"]) == 0
    out = capsys.readouterr().out
    native = out[out.index("\nnative\n"):]
    assert "masks bool+additive" in native and "lse" in native.split("\n")[3]
    assert "runs only on cuda" in out  # e.g. the pinned SDPA kernels on CPU


def test_embedded_pipeline_takes_role_keys_and_refuses_roles_without_layers(capsys):
    from attnsel.cli import main

    assert main(["explain", "--component-attention-backends", "transformer.cross=torch_sdpa,transformer=native"]) == 0
    out = capsys.readouterr().out
    line = next(l for l in out.splitlines() if l.strip().startswith("transformer "))
    assert "native (4 self layers)" in line and "torch_sdpa (4 cross layers)" in line
    assert "transformer.cross=torch_sdpa" in line
    assert main(["explain", "--component-attention-backends.vae.cross", "torch_sdpa"]) == 2
    err = capsys.readouterr().err
    assert "vae.cross=torch_sdpa matches no attention layer" in err and "roles: self" in err
    assert main(["explain", "--component-attention-backends", "transformer.joint=native"]) == 2
    assert "['cross', 'self']" in capsys.readouterr().err


def _flash_standin_with_lse(calls):
    """flash_attn_func as flash-attn 2/3 define it with return_attn_probs: (out, softmax_lse, ...), the lse
    (B, H, Sq) float32 in natural log; computed here in float64 (equal lengths only, as flash-attn's causal)."""

    def flash_attn_func(q, k, v, softmax_scale=None, causal=False, return_attn_probs=False):
        calls.append(return_attn_probs)
        qh, kh, vh = (t.transpose(1, 2).double() for t in (q, k, v))
        group = qh.shape[1] // kh.shape[1]
        kh, vh = kh.repeat_interleave(group, 1), vh.repeat_interleave(group, 1)
        s = qh @ kh.transpose(-1, -2) * (softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5)
        if causal:
            s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool).triu(1), float("-inf"))
        out = (torch.softmax(s, -1) @ vh).to(q.dtype).transpose(1, 2)
        return (out, torch.logsumexp(s, -1).float(), None) if return_attn_probs else out

    return flash_attn_func


def test_a_bridge_returns_the_log_sum_exp_where_its_library_does():
    """fa with a library that returns softmax_lse declares lse, and return_lse (what ring attention needs) gives the
    same lse as native; a library without it is refused for return_lse with the reason."""
    calls = []
    g = torch.Generator().manual_seed(5)
    q = torch.randn(2, 4, 19, 32, generator=g)
    k, v = torch.randn(2, 2, 19, 32, generator=g), torch.randn(2, 2, 19, 32, generator=g)
    try:
        bridges.register(Backend.FA, bridges._flash_layout(_flash_standin_with_lse(calls), "fa"), "stand-in (test)",
                         device="cpu", f32=True, auto_rank=-1)
        assert _C.backend_descriptor(int(Backend.FA), "cpu")["features"]["lse"]
        for causal in (False, True):
            out, lse = attnsel.attention(q, k, v, is_causal=causal, backend="fa", return_lse=True)
            ref_out, ref_lse = attnsel.attention(q, k, v, is_causal=causal, backend="native", return_lse=True)
            assert lse.shape == (2, 4, 19) and lse.dtype == torch.float32
            torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
        assert calls == [True, True]  # the library was asked for its lse
        out = attnsel.attention(q, k, v, backend="fa")  # without return_lse the library is called plainly
        assert calls[-1] is False and out.shape == q.shape

        bridges.register(Backend.FA, bridges._flash_layout(_flash_standin([]), "fa"), "stand-in (test)",
                         device="cpu", f32=True, auto_rank=-1)
        assert not _C.backend_descriptor(int(Backend.FA), "cpu")["features"]["lse"]
        with pytest.raises(ValueError, match="fa: .*log-sum-exp"):
            attnsel.attention(q, k, v, backend="fa", return_lse=True)
    finally:
        _C.register_backend(int(Backend.FA), "cpu", dict(available=False, unavailable_reason="unregistered (test)"))
        bridges.BRIDGES.clear()
        bridges.detect()
        _C.clear_tuning_table()
