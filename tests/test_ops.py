"""The attnsel::attention op: correctness against a float64 reference, validation, opcheck, torch.compile."""

import asyncio
import math
import threading

import pytest
import torch
import torch.nn.functional as F

import attnsel

TOL_FLOOR = {torch.float32: 1e-6, torch.bfloat16: 1e-3, torch.float16: 1e-4}


def reference(q, k, v, mask=None, causal=False, scale=None):
    """float64 attention with SDPA's conventions (top-left causal, bool True = attend, GQA by repetition)."""
    q, k, v = (t.double() for t in (q, k, v))
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    s = (q @ k.transpose(-1, -2)) * (scale if scale is not None else 1 / math.sqrt(q.shape[-1]))
    if causal:
        keep = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool).tril()
        s = s.masked_fill(~keep, float("-inf"))
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask.double()
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)  # fully masked rows -> zeros
    return p @ v


def check_close(out, q, k, v, mask=None, causal=False, scale=None):
    ref = reference(q, k, v, mask, causal, scale)
    ours = (out.double() - ref).abs().max().item()
    sdpa_mask = mask if mask is None or mask.dtype == torch.bool else mask.to(q.dtype)
    torch_out = F.scaled_dot_product_attention(q, k, v, attn_mask=sdpa_mask, is_causal=causal, scale=scale,
                                               enable_gqa=q.shape[1] != k.shape[1])
    theirs = (torch_out.double().nan_to_num(0.0) - ref).abs().max().item()
    assert ours <= 2 * theirs + TOL_FLOOR[q.dtype], f"error {ours:.3g} vs PyTorch {theirs:.3g}"


@pytest.mark.parametrize("backend", ["native", "torch_sdpa"])
@pytest.mark.parametrize("seed", range(12))
def test_random_sweep(backend, seed):
    g = torch.Generator().manual_seed(seed)
    dtype = [torch.float32, torch.bfloat16, torch.float16][seed % 3]
    b, hkv = 1 + seed % 2, 1 + seed % 3
    hq = hkv * (1 + seed % 2)
    sq, sk = [(1, 1), (7, 33), (64, 64), (100, 37)][seed % 4]
    d = [8, 40, 64, 128][(seed // 3) % 4]
    q = torch.randn(b, hq, sq, d, generator=g).to(dtype)
    k = torch.randn(b, hkv, sk, d, generator=g).to(dtype)
    v = torch.randn(b, hkv, sk, d, generator=g).to(dtype)
    causal = seed % 2 == 1 and backend == "native" or (seed % 4 == 1)
    mask = None
    if seed % 5 == 2:
        mask = torch.rand(sq, sk, generator=g) > 0.3
    elif seed % 5 == 4:
        mask = torch.randn(1, hq, 1, sk, generator=g)
    out = attnsel.attention(q, k, v, attn_mask=mask, is_causal=causal, backend=backend)
    assert out.shape == (b, hq, sq, d) and out.dtype == dtype
    check_close(out, q, k, v, mask, causal)


def test_non_contiguous_inputs_and_custom_scale():
    g = torch.Generator().manual_seed(1)
    base = torch.randn(2, 50, 6, 32, generator=g)  # (B, S, H, D) layout viewed as (B, H, S, D)
    q = base.transpose(1, 2)
    k = torch.randn(2, 6, 64, 45, generator=g)[..., :32]
    v = torch.randn(2, 45, 6, 32, generator=g).transpose(1, 2)
    k = k[:, :, :45]
    assert not q.is_contiguous() and not k.is_contiguous() and not v.is_contiguous()
    out = attnsel.attention(q, k, v, scale=0.3, backend="native")
    check_close(out, q, k, v, scale=0.3)


def test_default_backend_follows_the_selector():
    q = torch.randn(1, 2, 5, 16)
    with attnsel.component_attention_backend("vae", "torch_sdpa"):
        assert torch.equal(attnsel.attention(q, q, q), F.scaled_dot_product_attention(q, q, q))
    check_close(attnsel.attention(q, q, q), q, q, q)


def test_auto_selection_fast_path_follows_every_state_change():
    """attnsel.attention(backend=None) reuses per-call decisions; each change of selection state must still count."""
    from attnsel import _C

    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 33, 16, generator=g) for _ in range(3))
    native = attnsel.attention(q, k, v, backend="native")
    sdpa = attnsel.attention(q, k, v, backend="torch_sdpa")
    assert not torch.equal(native, sdpa)  # the two are told apart by their bits

    def picks(expected):
        for _ in range(3):  # the first call fills the cache, the others use it
            assert torch.equal(attnsel.attention(q, k, v), expected)

    picks(native)
    with attnsel.force_attention_backend("torch_sdpa"):
        picks(sdpa)
    picks(native)
    with attnsel.component_attention_backend("vae", "torch_sdpa"):
        picks(sdpa)
        with attnsel.component_attention_backend("text", None):
            picks(native)
        picks(sdpa)
    picks(native)
    # a scope entered from C++ on this thread
    assert torch.equal(_C._testing.run_in_native_scope("vae", int(attnsel.Backend.TORCH_SDPA),
                                              lambda: attnsel.attention(q, k, v)), sdpa)
    picks(native)
    # the process-wide flag, set natively (as a C++ caller or the config loader does)
    previous = _C.global_backend()
    _C.set_global_backend(int(attnsel.Backend.TORCH_SDPA))
    try:
        picks(sdpa)
    finally:
        _C.set_global_backend(previous)
    picks(native)
    # capability facts: native reported unavailable on CPU
    _C.set_backend_availability(int(attnsel.Backend.NATIVE), "cpu", False, "test")
    try:
        assert not torch.equal(attnsel.attention(q, k, v), native)
    finally:
        _C.set_backend_availability(int(attnsel.Backend.NATIVE), "cpu", True, "")
    picks(native)

    # another thread in a scope, and interleaved asyncio tasks with different scopes on one thread
    seen = {}

    def worker():
        with attnsel.component_attention_backend("vae", "torch_sdpa"):
            seen["thread"] = attnsel.attention(q, k, v)

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    assert torch.equal(seen["thread"], sdpa)
    picks(native)

    async def task(backend, expected):
        with attnsel.component_attention_backend("unet", backend):
            for _ in range(5):
                assert torch.equal(attnsel.attention(q, k, v), expected)
                await asyncio.sleep(0)

    async def both():
        await asyncio.gather(task("torch_sdpa", sdpa), task("native", native), task(None, native))

    asyncio.run(both())
    picks(native)


@pytest.mark.parametrize("args, match", [
    ((torch.randn(2, 3, 4), torch.randn(2, 3, 4), torch.randn(2, 3, 4)), "4-d"),
    ((torch.randn(1, 4, 5, 8), torch.randn(1, 3, 5, 8), torch.randn(1, 3, 5, 8)), "multiple"),
    ((torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 8)), "head_dim"),
    ((torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8).double(), torch.randn(1, 2, 5, 8)), "dtype"),
    ((torch.randn(1, 2, 5, 8).int(),) * 3, "dtype"),
    ((torch.randn(2, 2, 5, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)), "batch"),
])
def test_native_op_validation_messages(args, match):
    with pytest.raises(ValueError, match=match) as info:
        torch.ops.attnsel.attention(*args, None, False, None, int(attnsel.Backend.NATIVE))
    assert "attnsel.attention" in str(info.value)


def test_mask_validation_and_backend_refusals():
    q = torch.randn(1, 2, 5, 8)
    with pytest.raises(ValueError, match="broadcast"):
        attnsel.attention(q, q, q, attn_mask=torch.ones(3, 5, dtype=torch.bool), backend="native")
    with pytest.raises(ValueError, match="attn_mask must be bool"):
        attnsel.attention(q, q, q, attn_mask=torch.ones(5, 5, dtype=torch.int32), backend="native")
    with pytest.raises(ValueError, match="512"):
        big = torch.randn(1, 1, 4, 520)
        torch.ops.attnsel.attention(big, big, big, None, False, None, int(attnsel.Backend.NATIVE))
    with pytest.raises(ValueError, match="cpu"):
        attnsel.attention(q, q, q, backend="fa3")
    with pytest.raises(ValueError, match="cpu"):
        attnsel.attention(q, q, q, backend="sdpa_flash")
    with pytest.raises(ValueError, match="out of range"):
        torch.ops.attnsel.attention(q, q, q, None, False, None, 99)
    # A member used first (and cached) must not make an equal int or bool pass as a backend name.
    native, sdpa = attnsel.Backend.NATIVE, attnsel.Backend.TORCH_SDPA
    attnsel.attention(q, q, q, backend=native)
    attnsel.attention(q, q, q, backend=sdpa)
    for not_a_name in (int(native), int(sdpa), bool(int(native)) if int(native) in (0, 1) else True):
        with pytest.raises(ValueError, match="must be a string"):
            attnsel.attention(q, q, q, backend=not_a_name)


def test_opcheck():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 9, 16, generator=g)
    k = torch.randn(1, 2, 11, 16, generator=g)
    v = torch.randn(1, 2, 11, 24, generator=g)
    mask = torch.randn(9, 11, generator=g) > 0
    for backend in (attnsel.Backend.NATIVE, attnsel.Backend.TORCH_SDPA):
        if backend == attnsel.Backend.TORCH_SDPA:
            v = v[..., :16]
        torch.library.opcheck(torch.ops.attnsel.attention.default, (q, k, v, mask, True, 0.2, int(backend)),
                              test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


def test_torch_compile_fullgraph():
    layer = attnsel.nn.Attention(2, 32)

    def f(q, k, v):
        return layer(q * 2, k, v, is_causal=True) + 1

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    q = torch.randn(1, 2, 17, 32)
    assert torch.allclose(compiled(q, q, q), f(q, q, q), atol=1e-6)

    def g(q):  # backend=None under compile: the native op selects at run time
        return attnsel.attention(q, q, q)

    assert torch.allclose(torch.compile(g, fullgraph=True, backend="aot_eager")(q), g(q), atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal, mask_kind", [(False, None), (True, None), (False, "bool"), (False, "additive")])
def test_native_cpu_lse_matches_float64(dtype, causal, mask_kind):
    """return_lse=True: the natural-log log-sum-exp per query row, vs a float64 reference (-inf where no key is seen)."""
    g = torch.Generator().manual_seed(3)
    B, Hq, Hkv, Sq, Sk, D = 2, 4, 2, 37, 53, 24
    q, k, v = (torch.randn(B, h, s, D, generator=g).to(dtype) for h, s in ((Hq, Sq), (Hkv, Sk), (Hkv, Sk)))
    mask = None
    if mask_kind == "bool":
        mask = torch.rand(B, 1, Sq, Sk, generator=g) > 0.3
        mask[0, 0, 5] = False  # a fully masked row
    elif mask_kind == "additive":
        mask = torch.randn(Sq, Sk, generator=g)
    out, lse = attnsel.attention(q, k, v, attn_mask=mask, is_causal=causal, scale=0.3, backend="native",
                                 return_lse=True)
    assert lse.shape == (B, Hq, Sq) and lse.dtype == torch.float32
    kk = k.double().repeat_interleave(Hq // Hkv, dim=1)
    s = (q.double() @ kk.transpose(-1, -2)) * 0.3
    if causal:
        s = s.masked_fill(torch.ones(Sq, Sk, dtype=torch.bool).triu(1), float("-inf"))
    if mask_kind == "bool":
        s = s.masked_fill(~mask, float("-inf"))
    elif mask_kind == "additive":
        s = s + mask.double()
    ref = torch.logsumexp(s, dim=-1)
    finite = torch.isfinite(ref)
    assert torch.equal(finite, torch.isfinite(lse))
    assert torch.all(lse[~finite] == float("-inf"))
    tol = 1e-4 if dtype == torch.float32 else 1e-2
    assert (lse[finite].double() - ref[finite]).abs().max() < tol
    assert torch.equal(out, attnsel.attention(q, k, v, attn_mask=mask, is_causal=causal, scale=0.3, backend="native"))


def test_return_lse_refused_where_the_backend_cannot_give_it():
    q = torch.randn(1, 2, 5, 8)
    with pytest.raises(ValueError, match="log-sum-exp"):
        attnsel.attention(q, q, q, backend="torch_sdpa", return_lse=True)


# Calls that the plan sends to `torch_sdpa` skip the op when the op would hand them to SDPA unchanged (_C.route runs
# ATen's SDPA itself, or says to call it from Python for __torch_function__ overrides): the result, the gradients and
# every refusal must be the op's, whether torch_sdpa is named, a layer's policy, or auto's plan.
@pytest.mark.parametrize("case", ["plain", "causal", "scale", "bool_mask", "additive_mask", "gqa", "mqa"])
def test_sdpa_direct_matches_the_op(case):
    g = torch.Generator().manual_seed(3)
    hkv = {"gqa": 2, "mqa": 1}.get(case, 4)
    q = torch.randn(2, 4, 9, 16, generator=g, requires_grad=True)
    k = torch.randn(2, hkv, 11, 16, generator=g, requires_grad=True)
    v = torch.randn(2, hkv, 11, 16, generator=g, requires_grad=True)
    mask = {"bool_mask": torch.rand(2, 1, 9, 11, generator=g) > 0.3,
            "additive_mask": torch.randn(1, 4, 1, 11, generator=g)}.get(case)
    causal, scale = case == "causal", 0.3 if case == "scale" else None
    sdpa = int(attnsel.Backend.TORCH_SDPA)
    routed = attnsel._C.route(q, k, v, mask, causal, scale, sdpa)
    assert isinstance(routed, torch.Tensor), routed  # SDPA ran inside the route
    op = torch.ops.attnsel.attention(q, k, v, mask, causal, scale, sdpa)[0]
    torch.testing.assert_close(routed, op, rtol=0, atol=0)
    op_grads = torch.autograd.grad(op.square().sum(), (q, k, v))
    layer = attnsel.nn.Attention(4, 16, num_kv_heads=hkv, backend="torch_sdpa", scale=scale)
    auto_layer = attnsel.nn.Attention(4, 16, num_kv_heads=hkv, scale=scale)
    bucket = attnsel.selection.call_signature(q, k, v, mask, causal).bucket()
    attnsel._C.set_tuning_entry(bucket, [(sdpa, 1.0), (int(attnsel.Backend.NATIVE), 2.0)])  # auto plans torch_sdpa
    try:
        assert attnsel.explain_call(q, k, v, attn_mask=mask, is_causal=causal).backend == attnsel.Backend.TORCH_SDPA
        runs = {"named": lambda: attnsel.attention(q, k, v, mask, causal, scale, backend="torch_sdpa"),
                "auto": lambda: attnsel.attention(q, k, v, mask, causal, scale),
                "layer": lambda: layer(q, k, v, mask, causal), "auto layer": lambda: auto_layer(q, k, v, mask, causal)}
        for name, run in runs.items():
            ours = run()
            torch.testing.assert_close(ours, op, rtol=0, atol=0, msg=name)
            grads = torch.autograd.grad(ours.square().sum(), (q, k, v))
            for a, b in zip(grads, op_grads):
                torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=name)
    finally:
        attnsel._C.set_tuning_entry(bucket, [])


class _LoggingTensor(torch.Tensor):
    """A subclass that records the torch functions called on it."""
    seen: list = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        cls.seen.append(getattr(func, "__name__", str(func)))
        return super().__torch_function__(func, types, args, kwargs or {})


@pytest.mark.parametrize("override", ["subclass", "mode"])
def test_sdpa_route_keeps_torch_function_overrides(override):
    """Inputs or modes that override __torch_function__ still see the SDPA call (the route leaves it to Python)."""
    q = torch.randn(1, 2, 5, 8)
    sdpa = int(attnsel.Backend.TORCH_SDPA)
    expected = torch.nn.functional.scaled_dot_product_attention(q, q, q)
    if override == "subclass":
        _LoggingTensor.seen.clear()
        qs = q.as_subclass(_LoggingTensor)
        assert attnsel._C.route(qs, qs, qs, None, False, None, sdpa) == attnsel.ops.SDPA_FROM_PYTHON
        out = attnsel.attention(qs, qs, qs, backend="torch_sdpa")
        assert "scaled_dot_product_attention" in _LoggingTensor.seen
    else:
        class Recorder(torch.overrides.TorchFunctionMode):
            seen: list = []

            def __torch_function__(self, func, types, args=(), kwargs=None):
                self.seen.append(getattr(func, "__name__", str(func)))
                return func(*args, **(kwargs or {}))

        with Recorder() as mode:
            assert attnsel._C.route(q, q, q, None, False, None, sdpa) == attnsel.ops.SDPA_FROM_PYTHON
            out = attnsel.attention(q, q, q, backend="torch_sdpa")
        assert "scaled_dot_product_attention" in mode.seen
    torch.testing.assert_close(out.as_subclass(torch.Tensor), expected, rtol=0, atol=0)


@pytest.mark.parametrize("case", ["causal_with_mask", "mask_cast", "mask_1d", "mask_expanded"])
def test_torch_sdpa_calls_the_op_changes_go_through_the_op(case):
    """A mask with causal (folded into the mask), in another dtype (cast), 1-d (given a leading dim: SDPA itself
    raises IndexError on one) or expanded (given back compact) needs the op's changes: no direct route."""
    q = torch.randn(2, 4, 6, 8, dtype=torch.bfloat16)
    mask = {"mask_cast": torch.randn(2, 1, 1, 6), "mask_1d": torch.rand(6) > 0.3,
            "mask_expanded": (torch.rand(2, 1, 1, 6) > 0.3).expand(2, 4, 6, 6)}.get(case, torch.rand(2, 1, 6, 6) > 0.3)
    causal = case == "causal_with_mask"
    sdpa = int(attnsel.Backend.TORCH_SDPA)
    assert attnsel._C.route(q, q, q, mask, causal, None, sdpa) == sdpa
    op = torch.ops.attnsel.attention(q, q, q, mask, causal, None, sdpa)[0]
    assert torch.equal(attnsel.attention(q, q, q, attn_mask=mask, is_causal=causal, backend="torch_sdpa"), op)


@pytest.mark.parametrize("backend", ["torch_sdpa", "native", None])
@pytest.mark.parametrize("mask_shape", [(7,), (1, 7), (5, 7), (2, 1, 1, 7), (1, 3, 1, 7), (2, 3, 5, 7), (3, 5, 7)])
@pytest.mark.parametrize("kind", ["bool", "additive"])
def test_every_documented_mask_form_runs_on_every_backend(backend, mask_shape, kind):
    """Masks broadcast like SDPA's, including a 1-d key mask (which PyTorch's own SDPA rejects), on each backend and
    auto, against an fp64 reference."""
    g = torch.Generator().manual_seed(5)
    q = torch.randn(2, 3, 5, 8, generator=g)
    k, v = torch.randn(2, 3, 7, 8, generator=g), torch.randn(2, 3, 7, 8, generator=g)
    if kind == "bool":
        mask = torch.rand(mask_shape, generator=g) > 0.3
        mask[..., 0] = True  # every row sees a key
        bias = torch.zeros(mask_shape, dtype=torch.float64).masked_fill(~mask, float("-inf"))
    else:
        mask = torch.randn(mask_shape, generator=g)
        bias = mask.double()
    scores = q.double() @ k.double().transpose(-1, -2) / 8 ** 0.5 + bias
    ref = scores.softmax(-1) @ v.double()
    out = attnsel.attention(q, k, v, attn_mask=mask, backend=backend)
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("case", ["batch_broadcast", "heads_broadcast", "kv_heads_differ", "3d", "float64", "mask_5d",
                                  "head_dim_0"])
def test_sdpa_direct_leaves_refusals_to_the_op(case):
    """Inputs SDPA would broadcast or take but the op refuses still raise the op's ValueError, from the plan."""
    shapes = {"batch_broadcast": ((2, 4, 5, 8), (1, 4, 5, 8), (1, 4, 5, 8)),
              "heads_broadcast": ((2, 1, 5, 8), (2, 4, 5, 8), (2, 4, 5, 8)),
              "kv_heads_differ": ((2, 4, 5, 8), (2, 1, 5, 8), (2, 4, 5, 8)),
              "3d": ((4, 5, 8), (4, 5, 8), (4, 5, 8)),
              "head_dim_0": ((2, 4, 5, 0),) * 3}.get(case, ((2, 4, 5, 8),) * 3)
    dtype = torch.float64 if case == "float64" else torch.float32
    q, k, v = (torch.randn(*s, dtype=dtype) for s in shapes)
    mask = torch.ones(1, 2, 4, 5, 5, dtype=torch.bool) if case == "mask_5d" else None
    with pytest.raises(ValueError, match="attnsel.attention"):
        attnsel._C.route(q, k, v, mask, False, None, int(attnsel.Backend.TORCH_SDPA))
    with pytest.raises(ValueError, match="attnsel.attention"):
        attnsel.attention(q, k, v, attn_mask=mask)
    with pytest.raises(ValueError, match="attnsel.attention"):
        attnsel.attention(q, k, v, attn_mask=mask, backend="torch_sdpa")


def test_non_tensor_inputs_are_type_errors_naming_the_argument():
    q = torch.randn(1, 2, 3, 8)
    with pytest.raises(TypeError, match="q must be a tensor, got str"):
        attnsel.attention("x", q, q)
    with pytest.raises(TypeError, match="attn_mask must be a tensor or None, got list"):
        attnsel.attention(q, q, q, attn_mask=[1])
    with pytest.raises(TypeError, match=r"route\(q, k, v, attn_mask, is_causal, scale, backend, context=None\)"):
        attnsel._C.route(q, q, q)
    with pytest.raises(TypeError, match="must be real number"):
        attnsel.attention(q, q, q, scale="x")
