"""Gradients through attnsel::attention: every backend that runs forward, against a float64 reference and SDPA."""

import math

import pytest
import torch
import torch.nn.functional as F

import attnsel

# Absolute floors under "2x SDPA's error" (SDPA's own error can be ~0 on tiny inputs).
TOL_FLOOR = {torch.float32: 1e-5, torch.bfloat16: 2e-3, torch.float16: 2e-4}
NATIVE, SDPA = int(attnsel.Backend.NATIVE), int(attnsel.Backend.TORCH_SDPA)


def reference(q, k, v, mask=None, causal=False, scale=None, with_lse=False):
    """Differentiable float64 attention (SDPA conventions); rows that see no key give zeros (and lse -inf)."""
    q, k, v = (t.double() for t in (q, k, v))
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    s = (q @ k.transpose(-1, -2)) * (scale if scale is not None else 1 / math.sqrt(q.shape[-1]))
    if causal:
        s = s.masked_fill(~torch.ones(q.shape[2], k.shape[2], dtype=torch.bool).tril(), float("-inf"))
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask.double()
    dead = torch.isneginf(s).all(-1, keepdim=True)
    s = s.masked_fill(dead, 0.0)
    p = torch.softmax(s, dim=-1).masked_fill(dead, 0.0)
    out = p @ v
    if not with_lse:
        return out
    return out, torch.logsumexp(s, -1).masked_fill(dead.squeeze(-1), float("-inf"))


def grads(fn, inputs, dout):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    return torch.autograd.grad(out, leaves, dout.to(out.dtype))


def reference_grads(inputs, dout, **kw):
    leaves = [t.detach().double().requires_grad_() for t in inputs]
    return torch.autograd.grad(reference(*leaves, **kw), leaves, dout.double())


def sdpa(q, k, v, mask=None, causal=False, scale=None):
    if causal and mask is not None:  # SDPA takes one or the other: fold the causal part into the mask
        keep = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool).tril()
        mask = mask & keep if mask.dtype == torch.bool else mask.masked_fill(~keep, float("-inf"))
        causal = False
    mask = mask if mask is None or mask.dtype == torch.bool else mask.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale,
                                          enable_gqa=q.shape[1] != k.shape[1])


def max_err(got, ref):
    return (got.double().nan_to_num(float("inf")) - ref).abs().max().item() if ref.numel() else 0.0


def check_grads_like_sdpa(q, k, v, mask=None, causal=False, scale=None, backend="native"):
    """Our dq, dk, dv vs float64: error <= 2x SDPA's own error on the same inputs; returns the worst ratio."""
    dout = torch.randn(q.shape[:3] + (v.shape[-1],), generator=torch.Generator().manual_seed(7)).to(q.dtype)
    ref = reference_grads((q, k, v), dout, mask=mask, causal=causal, scale=scale)
    ours = grads(lambda a, b, c: attnsel.attention(a, b, c, attn_mask=mask, is_causal=causal, scale=scale,
                                                   backend=backend), (q, k, v), dout)
    theirs = grads(lambda a, b, c: sdpa(a, b, c, mask, causal, scale), (q, k, v), dout)
    worst = 0.0
    for name, o, t, r in zip("qkv", ours, theirs, ref):
        assert o.shape == r.shape and o.dtype == q.dtype
        e_ours, e_theirs = max_err(o, r), max_err(t.nan_to_num(0.0), r)
        scale_ref = max(r.abs().max().item() if r.numel() else 0.0, 1.0)
        limit = 2 * e_theirs + TOL_FLOOR[q.dtype] * scale_ref
        assert e_ours <= limit, f"d{name}: error {e_ours:.3g} vs SDPA's {e_theirs:.3g}"
        worst = max(worst, e_ours / max(e_theirs, TOL_FLOOR[q.dtype] * scale_ref))
    return worst


def random_case(seed):
    """A seeded call: dtype, shapes (GQA, Sq != Sk, odd lengths), head dims 8..512, causal, mask kinds, layouts."""
    g = torch.Generator().manual_seed(seed)
    dtype = [torch.float32, torch.bfloat16][seed % 2]
    b, hkv = 1 + seed % 2, 1 + (seed // 2) % 2
    hq = hkv * [1, 2, 3][seed % 3]
    sq, sk = [(1, 1), (7, 33), (64, 64), (100, 37), (33, 130), (65, 1)][seed % 6]
    d = [8, 40, 64, 128, 256, 512, 24, 96][seed % 8]
    if d >= 256:  # keep CI time small at the largest head sizes
        b, hq, hkv = 1, hkv, hkv
    dv = d if seed % 5 else max(8, d // 2)
    q = torch.randn(b, hq, sq, d, generator=g).to(dtype)
    k = torch.randn(b, hkv, sk, d, generator=g).to(dtype)
    v = torch.randn(b, hkv, sk, dv, generator=g).to(dtype)
    if seed % 4 == 3:  # non-contiguous: (B, S, H, D) storage viewed as (B, H, S, D)
        q = q.transpose(1, 2).contiguous().transpose(1, 2)
        v = v.transpose(1, 2).contiguous().transpose(1, 2)
    causal = seed % 3 == 1
    mask = None
    if seed % 4 == 1:
        mask = torch.rand(sq, sk, generator=g) > 0.3
        mask[sq // 2] = False  # a fully masked row
    elif seed % 4 == 2:
        mask = torch.randn(1, hq, 1, sk, generator=g)
    return q, k, v, mask, causal


@pytest.mark.parametrize("seed", range(24))
def test_native_gradients_sweep(seed):
    q, k, v, mask, causal = random_case(seed)
    check_grads_like_sdpa(q, k, v, mask, causal)


@pytest.mark.parametrize("seed", [0, 5, 9, 14])
def test_torch_sdpa_backend_gradients(seed):
    q, k, v, mask, causal = random_case(seed)
    if v.shape[-1] != q.shape[-1]:
        v = v[..., : q.shape[-1]] if v.shape[-1] > q.shape[-1] else torch.cat([v, v], -1)[..., : q.shape[-1]]
    check_grads_like_sdpa(q, k, v, mask, causal, backend="torch_sdpa")


@pytest.mark.filterwarnings("ignore:Input #:UserWarning")  # fp32 on purpose: the op has no float64
def test_gradcheck_float32_with_mask_and_lse():
    """Finite differences (fp32, so loose) on q, k, v, an additive mask and the lse output together."""
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 2, 5, 8, generator=g, requires_grad=True)
    k = torch.randn(1, 1, 6, 8, generator=g, requires_grad=True)
    v = torch.randn(1, 1, 6, 4, generator=g, requires_grad=True)
    mask = torch.randn(5, 6, generator=g, requires_grad=True)

    def f(q, k, v, mask):
        out, lse = attnsel.attention(q, k, v, attn_mask=mask, is_causal=True, backend="native", return_lse=True)
        return out, lse

    assert torch.autograd.gradcheck(f, (q, k, v, mask), eps=1e-2, atol=5e-3, rtol=5e-3, nondet_tol=0.0,
                                    fast_mode=False)


def test_fully_masked_rows_give_zero_gradients():
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 2, 9, 16, generator=g) for _ in range(3))
    mask = torch.rand(2, 1, 9, 9, generator=g) > 0.5
    mask[:, :, 4] = False
    mask[1, :, :, :] = False  # a whole batch entry sees nothing
    for backend in ("native", "torch_sdpa"):
        dq, dk, dv = grads(lambda a, b, c: attnsel.attention(a, b, c, attn_mask=mask, backend=backend), (q, k, v),
                           torch.ones(2, 2, 9, 16))
        assert torch.isfinite(dq).all() and torch.isfinite(dk).all() and torch.isfinite(dv).all()
        assert (dq[:, :, 4] == 0).all() and (dq[1] == 0).all() and (dk[1] == 0).all() and (dv[1] == 0).all()
    check_grads_like_sdpa(q, k, v, mask)


@pytest.mark.parametrize("backend", ["native", "torch_sdpa"])
@pytest.mark.parametrize("shape", [(9, 11), (1, 2, 1, 11), (2, 2, 9, 11), (11,)])
def test_additive_mask_gradient(backend, shape):
    """An additive mask that requires grad gets dS summed over its broadcast dims, in its own shape and dtype."""
    g = torch.Generator().manual_seed(4)
    q = torch.randn(2, 2, 9, 16, generator=g, requires_grad=True)
    k, v = (torch.randn(2, 2, 11, 16, generator=g, requires_grad=True) for _ in range(2))
    mask = torch.randn(shape, generator=g).masked_fill(torch.rand(shape, generator=g) > 0.8, float("-inf"))
    mask.requires_grad_()
    causal = backend == "native"  # SDPA refuses a mask together with is_causal
    out = attnsel.attention(q, k, v, attn_mask=mask, is_causal=causal, backend=backend)
    dout = torch.randn(out.shape, generator=g)
    got = torch.autograd.grad(out, (q, k, v, mask), dout)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v, mask)]
    ref = torch.autograd.grad(reference(*leaves[:3], mask=leaves[3], causal=causal), leaves, dout.double())
    for a, r in zip(got, ref):
        assert a.shape == r.shape
        torch.testing.assert_close(a.double(), r, atol=2e-5, rtol=1e-4)


def test_bool_mask_gets_no_gradient():
    q = torch.randn(1, 1, 4, 8, requires_grad=True)
    mask = torch.rand(4, 4) > 0.3
    attnsel.attention(q, q, q, attn_mask=mask, backend="native").sum().backward()
    assert q.grad is not None and mask.grad is None and not mask.requires_grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lse_output_is_differentiable(dtype):
    """return_lse=True: d(lse)/d(scores) = P, so a loss on lse gives the right gradients too (native)."""
    g = torch.Generator().manual_seed(5)
    q = torch.randn(1, 4, 13, 32, generator=g).to(dtype)
    k, v = (torch.randn(1, 2, 21, 32, generator=g).to(dtype) for _ in range(2))
    mask = torch.rand(13, 21, generator=g) > 0.4
    mask[3] = False
    w_out, w_lse = torch.randn(1, 4, 13, 32, generator=g), torch.randn(1, 4, 13, generator=g)

    def loss(out, lse):
        return (out.double() * w_out).sum() + (lse.double().masked_fill(torch.isinf(lse), 0) * w_lse).sum()

    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    got = torch.autograd.grad(loss(*attnsel.attention(*leaves, attn_mask=mask, backend="native", return_lse=True)),
                              leaves)
    ref_leaves = [t.double().requires_grad_() for t in (q, k, v)]
    ref = torch.autograd.grad(loss(*reference(*ref_leaves, mask=mask, with_lse=True)), ref_leaves)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    for a, r in zip(got, ref):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a.double(), r, atol=tol, rtol=tol)


def test_lse_is_not_differentiable_without_return_lse():
    q = torch.randn(1, 1, 4, 8, requires_grad=True)
    out, lse = torch.ops.attnsel.attention(q, q, q, None, False, None, NATIVE, False)
    assert out.requires_grad and lse.numel() == 0 and not lse.requires_grad


def test_composed_backward_on_cpu_matches_the_kernel():
    """The ATen-composed backward (native CUDA's, and any direct call for the SDPA family) runs on CPU too: with the
    saved lse and with lse recomputed, it must agree with the native CPU kernel and the reference."""
    g = torch.Generator().manual_seed(6)
    q = torch.randn(2, 4, 37, 24, generator=g)
    k, v = torch.randn(2, 2, 29, 24, generator=g), torch.randn(2, 2, 29, 16, generator=g)
    mask = torch.randn(1, 4, 37, 29, generator=g)
    mask[0, 1, 5] = float("-inf")  # a row that sees nothing
    out, lse = torch.ops.attnsel.attention(q, k, v, mask, True, 0.3, NATIVE, True)
    dout = torch.randn(out.shape, generator=g)
    ref = reference_grads((q, k, v), dout, mask=mask, causal=True, scale=0.3)
    empty = torch.empty(0)
    for backend, saved in ((NATIVE, lse), (SDPA, lse), (SDPA, empty)):
        dq, dk, dv, dmask = torch.ops.attnsel.attention_backward(dout, q, k, v, out, saved, None, mask, True, 0.3,
                                                                  backend, True)
        for a, r in zip((dq, dk, dv), ref):
            torch.testing.assert_close(a.double(), r, atol=2e-5, rtol=1e-4)
        assert dmask.shape == mask.shape and (dmask[0, 1, 5] == 0).all()


def test_gqa_and_broadcast_kv_strides():
    """K/V expanded over batch (stride 0) and grouped-query heads: dK/dV summed over the group and the batch."""
    g = torch.Generator().manual_seed(8)
    q = torch.randn(3, 6, 17, 32, generator=g, requires_grad=True)
    k0, v0 = (torch.randn(1, 2, 23, 32, generator=g, requires_grad=True) for _ in range(2))
    out = attnsel.attention(q, k0.expand(3, -1, -1, -1), v0.expand(3, -1, -1, -1), backend="native")
    dout = torch.randn(out.shape, generator=g)
    got = torch.autograd.grad(out, (q, k0, v0), dout)
    leaves = [t.detach().double().requires_grad_() for t in (q, k0, v0)]
    ref = torch.autograd.grad(reference(leaves[0], leaves[1].expand(3, -1, -1, -1), leaves[2].expand(3, -1, -1, -1)),
                              leaves, dout.double())
    for a, r in zip(got, ref):
        torch.testing.assert_close(a.double(), r, atol=2e-5, rtol=1e-4)


def test_backward_uses_the_backend_the_forward_ran():
    """The backend is planned once, at the forward; leaving a scope before backward changes nothing."""
    q = torch.randn(1, 2, 8, 16, requires_grad=True)
    with attnsel.component_attention_backend("vae", "torch_sdpa"):
        out_sdpa = attnsel.attention(q, q, q)
    out_native = attnsel.attention(q, q, q)
    assert "ScaledDotProduct" in type(out_sdpa.grad_fn).__name__ or "ScaledDotProduct" in out_sdpa.grad_fn.name()
    assert "NativeAttention" in out_native.grad_fn.name()
    (gs,) = torch.autograd.grad(out_sdpa.sum(), q)
    (gn,) = torch.autograd.grad(out_native.sum(), q)
    torch.testing.assert_close(gs, gn, atol=1e-5, rtol=1e-4)


def test_no_grad_and_inference_paths_have_no_graph():
    q = torch.randn(1, 2, 8, 16, requires_grad=True)
    with torch.no_grad():
        assert attnsel.attention(q, q, q, backend="native").grad_fn is None
    with torch.inference_mode():
        assert attnsel.attention(q, q, q, backend="native").grad_fn is None


def test_double_backward_is_refused():
    q = torch.randn(1, 1, 4, 8, requires_grad=True)
    out = attnsel.attention(q, q, q, backend="native")
    (dq,) = torch.autograd.grad(out.square().sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="attention_backward"):
        dq.sum().backward()


def test_backward_op_rejects_caller_mistakes():
    q = torch.randn(1, 1, 4, 8)
    out, lse = torch.ops.attnsel.attention(q, q, q, None, False, None, NATIVE, True)
    with pytest.raises(ValueError, match="grad_out"):
        torch.ops.attnsel.attention_backward(out[..., :4], q, q, q, out, lse, None, None, False, None, NATIVE, False)
    with pytest.raises(ValueError, match="mask_grad"):
        torch.ops.attnsel.attention_backward(out, q, q, q, out, lse, None, None, False, None, NATIVE, True)
    with pytest.raises(ValueError, match="no_attention"):
        torch.ops.attnsel.attention_backward(out, q, q, q, out, lse, None, None, False, None,
                                             int(attnsel.Backend.NO_ATTENTION), False)


def test_opcheck_with_gradients():
    g = torch.Generator().manual_seed(9)
    q = torch.randn(1, 4, 9, 16, generator=g, requires_grad=True)
    k = torch.randn(1, 2, 11, 16, generator=g, requires_grad=True)
    v = torch.randn(1, 2, 11, 16, generator=g, requires_grad=True)
    mask = torch.randn(9, 11, generator=g, requires_grad=True)
    op = torch.ops.attnsel.attention.default
    for backend in (NATIVE, SDPA):
        torch.library.opcheck(op, (q, k, v, mask, backend == NATIVE, 0.2, backend))
    torch.library.opcheck(op, (q, k, v, mask > 0, False, None, NATIVE, True))
    out, lse = op(q.detach(), k.detach(), v.detach(), mask.detach(), True, 0.2, NATIVE, True)
    torch.library.opcheck(torch.ops.attnsel.attention_backward.default,
                          (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out, lse, None, mask.detach(),
                           True, 0.2, NATIVE, True))


@pytest.mark.parametrize("backend", ["native", "torch_sdpa"])
def test_torch_compile_fullgraph_backward(backend):
    layer = attnsel.nn.Attention(4, 16, num_kv_heads=2, backend=backend)
    mask = torch.randn(9, 11)

    def loss(q, k, v):
        return layer(q * 2, k, v, attn_mask=mask).square().sum()

    g = torch.Generator().manual_seed(10)
    q = torch.randn(1, 4, 9, 16, generator=g, requires_grad=True)
    k, v = (torch.randn(1, 2, 11, 16, generator=g, requires_grad=True) for _ in range(2))
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    got = torch.autograd.grad(compiled(q, k, v), (q, k, v))
    want = torch.autograd.grad(loss(q, k, v), (q, k, v))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


class TinyModel(torch.nn.Module):
    """Projections around one attention layer (attnsel's, or SDPA when backend is None)."""

    def __init__(self, dim=32, heads=4, kv_heads=2, backend=None):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.q = torch.nn.Linear(dim, dim)
        self.kv = torch.nn.Linear(dim, 2 * kv_heads * self.head_dim)
        self.o = torch.nn.Linear(dim, dim)
        self.attn = None if backend is None else attnsel.nn.Attention(heads, self.head_dim, num_kv_heads=kv_heads,
                                                                      backend=backend)

    def forward(self, x, mask):
        b, s, _ = x.shape
        q = self.q(x).view(b, s, self.heads, self.head_dim).transpose(1, 2)
        k, v = self.kv(x).view(b, s, 2, self.kv_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if self.attn is None:
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=True)
        else:
            a = self.attn(q, k, v, attn_mask=mask, is_causal=mask is None)
        return self.o(a.transpose(1, 2).reshape(b, s, -1))


@pytest.mark.parametrize("backend", ["native", "torch_sdpa"])
@pytest.mark.parametrize("masked", [False, True])
def test_training_step_matches_sdpa(backend, masked):
    torch.manual_seed(11)
    ref_model = TinyModel()
    model = TinyModel(backend=backend)
    model.load_state_dict(ref_model.state_dict())
    x, target = torch.randn(2, 19, 32), torch.randn(2, 19, 32)
    mask = (torch.rand(19, 19) > 0.3) | torch.eye(19, dtype=torch.bool) if masked else None
    for m in (ref_model, model):
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        for _ in range(2):  # two steps: the second runs on updated weights
            opt.zero_grad()
            F.mse_loss(m(x, mask), target).backward()
            opt.step()
    for (name, p), (_, r) in zip(model.named_parameters(), ref_model.named_parameters()):
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, r.grad, atol=1e-5, rtol=1e-4, msg=name)
        torch.testing.assert_close(p, r, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("causal", [False, True])
def test_native_cuda_gradients(dtype, d, causal):
    """Native CUDA forward + the ATen-composed backward vs float64 and SDPA's flash/cuDNN backward."""
    g = torch.Generator(device="cuda").manual_seed(12)
    q = torch.randn(2, 8, 300, d, device="cuda", generator=g).to(dtype)
    k, v = (torch.randn(2, 4, 257, d, device="cuda", generator=g).to(dtype) for _ in range(2))
    dout = torch.randn(2, 8, 300, d, device="cuda", generator=g).to(dtype)
    ours = grads(lambda a, b, c: attnsel.attention(a, b, c, is_causal=causal, backend="native"), (q, k, v), dout)
    theirs = grads(lambda a, b, c: sdpa(a, b, c, None, causal), (q, k, v), dout)
    leaves = [t.detach().cpu().double().requires_grad_() for t in (q, k, v)]
    ref = torch.autograd.grad(reference(*leaves, causal=causal), leaves, dout.cpu().double())
    for name, o, t, r in zip("qkv", ours, theirs, ref):
        e_ours, e_theirs = max_err(o.cpu(), r), max_err(t.cpu(), r)
        assert e_ours <= 2 * e_theirs + TOL_FLOOR[dtype], f"d{name}: error {e_ours:.3g} vs SDPA's {e_theirs:.3g}"


@pytest.mark.parametrize("heads", ["one", "many"])
def test_cpu_backward_schedules(heads):
    """The CPU kernel splits few heads into key/query-block items and runs many heads whole (>= 2 per core, fused):
    both schedules over several blocks, grouped-query, causal with Sq != Sk, a mask and its gradient."""
    import os

    g = torch.Generator().manual_seed(13)
    b = 1 if heads == "one" else 2 * (os.cpu_count() or 1)
    q = torch.randn(b, 2, 150, 16, generator=g, requires_grad=True)
    k, v = (torch.randn(b, 1, 133, 16, generator=g, requires_grad=True) for _ in range(2))
    mask = torch.randn(1, 2, 150, 133, generator=g, requires_grad=True)
    out = attnsel.attention(q, k, v, attn_mask=mask, is_causal=True, backend="native")
    dout = torch.randn(out.shape, generator=g)
    got = torch.autograd.grad(out, (q, k, v, mask), dout)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v, mask)]
    ref = torch.autograd.grad(reference(*leaves[:3], mask=leaves[3], causal=True), leaves, dout.double())
    for a, r in zip(got, ref):
        torch.testing.assert_close(a.double(), r, atol=2e-5, rtol=1e-4)
