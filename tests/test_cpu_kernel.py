"""Correctness of the native fused CPU attention kernel (backend "native" on CPU), on every ISA path this CPU runs.

Reference: float64 math (fully masked rows = 0). Tolerance rule: our max error <= 2x PyTorch SDPA's own max error on
the same inputs, plus a small absolute floor (so 0-vs-0 cases, e.g. a single key, don't fail on one rounding).
"""

from __future__ import annotations

import math
import os
import random
import subprocess
from pathlib import Path
import sys

import pytest
import torch
import torch.nn.functional as F

attnsel = pytest.importorskip("attnsel")
_C = attnsel._C

ALL_ISAS = ("scalar", "avx2", "avx512", "avx512_bf16")
ISAS = [i for i in ALL_ISAS if _C.cpu_isa_supported(i)]
FLOOR = {torch.float32: 1e-6, torch.bfloat16: 4e-3, torch.float16: 5e-4}


@pytest.fixture(params=ISAS)
def isa(request):
    prev = _C.cpu_isa()
    _C.set_cpu_isa(request.param)
    yield request.param
    _C.set_cpu_isa(prev)


def native(q, k, v, mask=None, causal=False, scale=None):
    return attnsel.attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale, backend="native")


def reference(q, k, v, mask=None, causal=False, scale=None):
    """float64 attention; rows with no visible key are zeros. Returns (out, fully_masked_rows[B,H,Sq])."""
    qd, kd, vd = q.double(), k.double(), v.double()
    hq, hkv = q.shape[1], k.shape[1]
    if hq != hkv:
        kd = kd.repeat_interleave(hq // hkv, dim=1)
        vd = vd.repeat_interleave(hq // hkv, dim=1)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = (qd @ kd.transpose(-1, -2)) * scale
    sq, sk = q.shape[2], k.shape[2]
    if causal:
        s = s.masked_fill(~torch.ones(sq, sk, dtype=torch.bool).tril(), -math.inf)
    if mask is not None:
        s = s.masked_fill(~mask, -math.inf) if mask.dtype == torch.bool else s + mask.double()
    m = s.amax(dim=-1, keepdim=True) if sk > 0 else torch.full((*s.shape[:-1], 1), -math.inf, dtype=torch.float64)
    dead = torch.isneginf(m)
    p = torch.exp(s - torch.where(dead, 0.0, m))
    out = (p @ vd) / p.sum(-1, keepdim=True)
    out = torch.where(dead, 0.0, out)
    return out, dead.squeeze(-1)


def sdpa(q, k, v, mask=None, causal=False, scale=None):
    if mask is not None and mask.dtype != torch.bool:
        mask = mask.to(q.dtype)
    if mask is not None and causal:  # SDPA refuses both: fold the causal triangle into the mask
        tri = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool).tril()
        mask = mask & tri if mask.dtype == torch.bool else mask.masked_fill(~tri, -math.inf)
        causal = False
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale,
                                          enable_gqa=q.shape[1] != k.shape[1])


def max_err(out, ref, live):
    """Max |out - ref| over rows that see at least one key (live: [B,H,Sq] bool)."""
    if out.numel() == 0 or not live.any():
        return 0.0
    d = (out.double() - ref).abs()[live]
    return float(d.max()) if d.numel() else 0.0


def layout(x: torch.Tensor, kind: int) -> torch.Tensor:
    """Same values, different memory layout: 0 contiguous, 1 (B,S,H,D) transposed, 2 dim stride 2, 3 batch-expanded."""
    if kind == 1:
        return x.transpose(1, 2).contiguous().transpose(1, 2)
    if kind == 2:
        wide = torch.empty(*x.shape[:-1], 2 * x.shape[-1], dtype=x.dtype).fill_(float("nan"))
        wide[..., ::2] = x
        return wide[..., ::2]
    if kind == 3 and x.shape[0] > 1:
        return x[:1].expand_as(x)  # stride 0 over batch (its values: batch 0 repeated)
    return x


def make_case(i: int):
    r = random.Random(1000 + i)
    dims = [1, 3, 8, 16, 17, 32, 40, 64, 72, 96, 128, 130, 256, 512]
    dtype = r.choice([torch.float32, torch.float32, torch.bfloat16, torch.bfloat16, torch.float16])
    b, hkv = r.randint(1, 2), r.randint(1, 2)
    hq = hkv * r.choice([1, 1, 2, 3])

    def length():
        return r.choice([r.randint(0, 2), r.randint(1, 20), r.randint(60, 70), r.randint(90, 100), r.randint(1, 200)])

    sq, sk = length(), length()
    d = r.choice(dims)
    dv = d if r.random() < 0.75 else r.choice(dims)
    if d >= 256 or dv >= 256:
        sq, sk = min(sq, 70), min(sk, 100)
    return dict(dtype=dtype, b=b, hq=hq, hkv=hkv, sq=sq, sk=sk, d=d, dv=dv,
                causal=r.random() < 0.3,
                mask=r.choice([None, None, "bool", "add", "add32"]),
                mshape=r.choice(["full", "2d", "b1", "h1"]),
                lay=[r.randint(0, 3) for _ in range(3)],
                scale=None if r.random() < 0.6 else r.uniform(0.02, 0.5),
                seed=i)


N_CASES = 220
CASES = [make_case(i) for i in range(N_CASES)]


def build_inputs(c):
    g = torch.Generator().manual_seed(c["seed"])
    q = torch.randn(c["b"], c["hq"], c["sq"], c["d"], generator=g).to(c["dtype"])
    k = torch.randn(c["b"], c["hkv"], c["sk"], c["d"], generator=g).to(c["dtype"])
    v = torch.randn(c["b"], c["hkv"], c["sk"], c["dv"], generator=g).to(c["dtype"])
    q, k, v = layout(q, c["lay"][0]), layout(k, c["lay"][1]), layout(v, c["lay"][2])
    mask = None
    if c["mask"] is not None:
        shape = {"full": (c["b"], c["hq"], c["sq"], c["sk"]), "2d": (c["sq"], c["sk"]),
                 "b1": (c["b"], 1, c["sq"], c["sk"]), "h1": (1, c["hq"], 1, c["sk"])}[c["mshape"]]
        if c["mask"] == "bool":
            mask = torch.rand(shape, generator=g) < 0.75
            if c["mshape"] != "h1" and c["sq"] > 2:
                mask[..., 1, :] = False  # a fully masked query row
        else:
            mask = torch.randn(shape, generator=g) * 2
            mask = mask.masked_fill(torch.rand(shape, generator=g) < 0.2, -math.inf)
            if c["mshape"] != "h1" and c["sq"] > 2:
                mask[..., 1, :] = -math.inf
            # Additive masks in q's dtype, or fp32 holding values that q's dtype represents exactly (so SDPA,
            # which needs the mask in q's dtype, sees the same numbers).
            mask = mask.to(c["dtype"])
            if c["mask"] == "add32":
                mask = mask.float()
    return q, k, v, mask


def case_id(c):
    dt = str(c["dtype"]).split(".")[-1]
    return (f"{c['seed']}-{dt}-b{c['b']}h{c['hq']}/{c['hkv']}-q{c['sq']}k{c['sk']}-d{c['d']}v{c['dv']}"
            f"{'-causal' if c['causal'] else ''}{'-' + c['mask'] + c['mshape'] if c['mask'] else ''}")


@pytest.mark.parametrize("c", CASES, ids=[case_id(c) for c in CASES])
def test_sweep_against_float64(isa, c):
    q, k, v, mask = build_inputs(c)
    out = native(q, k, v, mask, c["causal"], c["scale"])
    assert out.dtype == q.dtype and out.shape == (c["b"], c["hq"], c["sq"], c["dv"])
    ref, dead = reference(q, k, v, mask, c["causal"], c["scale"])
    live = ~dead
    assert not torch.isnan(out).any(), "NaN in output"
    # Rows that see no key (masked out, or seq_kv == 0) are exactly zero.
    if dead.any():
        assert (out[dead] == 0).all()
    ours = max_err(out, ref, live)
    theirs = max_err(sdpa(q, k, v, mask, c["causal"], c["scale"]), ref, live) if c["sk"] > 0 else 0.0
    if math.isnan(theirs):
        theirs = 0.0
    bound = 2 * theirs + FLOOR[c["dtype"]]
    assert ours <= bound, f"max err {ours:.3g} > 2 x SDPA's {theirs:.3g} + floor"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("d", [64, 128, 512])
def test_multi_tile(isa, dtype, causal, d):
    """Several query blocks and key tiles, the shapes the fast paths are tuned for."""
    g = torch.Generator().manual_seed(d + causal)
    s = 420 if d < 512 else 130  # key tiles are 192 long up to head_dim 128: three of them
    q, k, v = (torch.randn(1, 2, s, d, generator=g).to(dtype) for _ in range(3))
    out = native(q, k, v, causal=causal)
    ref, dead = reference(q, k, v, causal=causal)
    theirs = max_err(sdpa(q, k, v, causal=causal), ref, ~dead)
    assert max_err(out, ref, ~dead) <= 2 * theirs + FLOOR[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("d", [128, 512])
def test_many_query_blocks(isa, dtype, causal, d):
    """>= 64 query blocks at head_dim >= 128: the AVX2 path's 24-query panel geometry (used only then)."""
    g = torch.Generator().manual_seed(d + 2 * causal)
    s = 200 if d < 512 else 130
    q, k, v = (torch.randn(1, 32, s, d, generator=g).to(dtype) for _ in range(3))
    out = native(q, k, v, causal=causal)
    ref, dead = reference(q, k, v, causal=causal)
    theirs = max_err(sdpa(q, k, v, causal=causal), ref, ~dead)
    assert max_err(out, ref, ~dead) <= 2 * theirs + FLOOR[dtype]


@pytest.mark.parametrize("sq,sk", [(0, 5), (5, 0), (0, 0), (1, 1), (1, 7), (7, 1), (3, 130)])
@pytest.mark.parametrize("causal", [False, True])
def test_tiny_and_empty_lengths(isa, sq, sk, causal):
    g = torch.Generator().manual_seed(sq * 31 + sk)
    q = torch.randn(2, 2, sq, 16, generator=g)
    k = torch.randn(2, 2, sk, 16, generator=g)
    v = torch.randn(2, 2, sk, 24, generator=g)
    out = native(q, k, v, causal=causal)
    assert out.shape == (2, 2, sq, 24)
    if sk == 0:
        assert (out == 0).all()  # no keys: zeros, not NaN
    ref, _ = reference(q, k, v, causal=causal)
    assert torch.allclose(out.double(), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fully_masked_rows_are_zero(isa, dtype):
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 40, 32, generator=g).to(dtype) for _ in range(3))
    mask = torch.ones(40, 40, dtype=torch.bool)
    mask[[0, 7, 39]] = False
    out = native(q, k, v, mask)
    assert not torch.isnan(out).any()
    assert (out[:, :, [0, 7, 39]] == 0).all()
    add = torch.zeros(40, 40, dtype=dtype).masked_fill(~mask, -math.inf)
    out2 = native(q, k, v, add)
    assert (out2[:, :, [0, 7, 39]] == 0).all() and not torch.isnan(out2).any()
    tol = 1e-5 if dtype == torch.float32 else 1e-2  # same attention, other rounding path (additive)
    assert torch.allclose(out2.float(), out.float(), rtol=tol, atol=tol)
    allmasked = native(q, k, v, torch.zeros(40, 40, dtype=torch.bool))
    assert (allmasked == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
def test_nan_propagates(isa, dtype, causal):
    g = torch.Generator().manual_seed(5)
    q = torch.randn(1, 2, 50, 64, generator=g).to(dtype)
    k = torch.randn(1, 1, 140, 64, generator=g).to(dtype)  # GQA: both query heads read kv head 0
    v = torch.randn(1, 1, 140, 64, generator=g).to(dtype)
    rows = torch.arange(50)

    qn = q.clone()
    qn[0, 1, 5, 3] = float("nan")
    o = native(qn, k, v, causal=causal)
    assert torch.isnan(o[0, 1, 5]).all()
    assert not torch.isnan(o[0, 1, rows != 5]).any() and not torch.isnan(o[0, 0]).any()

    kn = k.clone()
    kn[0, 0, 10, 7] = float("nan")
    o = native(q, kn, v, causal=causal)
    sees = rows >= 10 if causal else torch.ones(50, dtype=torch.bool)
    assert torch.isnan(o[0, :, sees]).all()
    assert not torch.isnan(o[0, :, ~sees]).any()  # causal rows that never see key 10

    vn = v.clone()
    vn[0, 0, 3, 9] = float("nan")
    o = native(q, k, vn, causal=causal)
    sees = rows >= 3 if causal else torch.ones(50, dtype=torch.bool)
    assert torch.isnan(o[0, :, sees, 9]).all()
    assert not torch.isnan(o[..., 8]).any()  # other value columns stay finite
    # (rows that cannot see key 3 may still get NaN from 0 * NaN inside a tile, as PyTorch's math path does)


def test_head_dim_over_limit_refused():
    q = torch.randn(1, 1, 4, 520)
    with pytest.raises((RuntimeError, ValueError), match="512"):  # the selector refuses first (ValueError)
        native(q, q, q)
    v = torch.randn(1, 1, 4, 600)
    with pytest.raises((RuntimeError, ValueError), match="512"):  # the selector refuses first (ValueError)
        native(q[..., :64], q[..., :64], v)


def test_max_head_dim_accepted(isa):
    g = torch.Generator().manual_seed(9)
    q, k, v = (torch.randn(1, 1, 20, 512, generator=g) for _ in range(3))
    ref, dead = reference(q, k, v)
    assert max_err(native(q, k, v), ref, ~dead) <= 2 * max_err(sdpa(q, k, v), ref, ~dead) + 1e-6


def test_thread_count_does_not_change_results():
    g = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(2, 3, 150, 64, generator=g) for _ in range(3))
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = native(q, k, v, causal=True)
        torch.set_num_threads(max(2, n))
        many = native(q, k, v, causal=True)
    finally:
        torch.set_num_threads(n)
    assert torch.equal(one, many)


def test_isa_control():
    assert _C.cpu_isa() in ALL_ISAS
    assert _C.cpu_isa_supported("scalar")
    assert not _C.cpu_isa_supported("sse9")
    with pytest.raises(Exception):
        _C.set_cpu_isa("sse9")
    for name in ALL_ISAS:
        if not _C.cpu_isa_supported(name):
            with pytest.raises(Exception):
                _C.set_cpu_isa(name)


@pytest.mark.skipif(len(ISAS) < 2, reason="only one ISA path runs here")
def test_isa_switch_takes_effect():
    # The paths compute exp differently, so their last bits differ: proof that set_cpu_isa switches kernels.
    g = torch.Generator().manual_seed(13)
    q, k, v = (torch.randn(1, 2, 64, 64, generator=g) for _ in range(3))
    prev = _C.cpu_isa()
    outs = {}
    try:
        for name in ISAS:
            _C.set_cpu_isa(name)
            assert _C.cpu_isa() == name
            outs[name] = native(q, k, v)
    finally:
        _C.set_cpu_isa(prev)
    assert not torch.equal(outs[ISAS[0]], outs[ISAS[1]])


def _run_with_env(isa_value: str, code: str) -> subprocess.CompletedProcess:
    # Import the attnsel under test (installed or built in place), never a source checkout in the cwd without _C.
    package_parent = str(Path(attnsel.__file__).resolve().parents[1])
    env = dict(os.environ, ATTNSEL_CPU_ISA=isa_value, PYTHONPATH=package_parent)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                          cwd=package_parent)


def test_env_forces_isa_and_rejects_unknown():
    code = ("import torch, attnsel\n"
            "q = torch.randn(1, 1, 8, 16)\n"
            "try:\n"
            "    attnsel.attention(q, q, q, backend='native')\n"
            "    print('ISA', attnsel._C.cpu_isa())\n"
            "except RuntimeError as e:\n"
            "    print('ERR', e)\n")
    ok = _run_with_env("scalar", code)
    assert ok.returncode == 0, ok.stderr
    assert "ISA scalar" in ok.stdout
    bad = _run_with_env("avx1024", code)
    assert bad.returncode == 0, bad.stderr
    assert "ERR" in bad.stdout and "avx1024" in bad.stdout and "scalar" in bad.stdout


@pytest.mark.parametrize("scale", [0.0, -0.2, 1e-3, 3.0])
@pytest.mark.parametrize("causal", [False, True])
def test_unusual_scales(isa, scale, causal):
    # scale <= 0 takes the path that scales inside the GEMM (hidden keys must stay hidden); 3.0 gives peaky rows.
    g = torch.Generator().manual_seed(17)
    q, k, v = (torch.randn(1, 2, 70, 40, generator=g) for _ in range(3))
    mask = torch.rand(70, 70, generator=g) < 0.8
    for m in (None, mask):
        out = native(q, k, v, m, causal, scale)
        ref, dead = reference(q, k, v, m, causal, scale)
        theirs = max_err(sdpa(q, k, v, m, causal, scale), ref, ~dead)
        if math.isnan(theirs):  # SDPA itself returns NaN for causal with scale <= 0 (torch 2.13); floor only
            theirs = 0.0
        assert max_err(out, ref, ~dead) <= 2 * theirs + 1e-6


@pytest.mark.parametrize("scale", [1e10, 1e20, 1e30, None])
@pytest.mark.parametrize("causal", [False, True])
def test_huge_scores_keep_the_argmax(isa, scale, causal):
    # Regression (found by tests/test_properties.py): once scale * |q·k| passed ~2^31, the fused exponent
    # fma(s, scale*log2 e, -max) kept the max's rounding residue (hundreds in log2 units), so exp2 underflowed or
    # overflowed and rows came out as zeros (l = 0) or garbage. The softmax is one-hot there: the output is the
    # value of the best key, and the log-sum-exp its scaled score. `None` gets its huge scores from q's magnitude.
    g = torch.Generator().manual_seed(23)
    sq, sk = 40, 300  # several key tiles, so the best key can sit in an earlier or a later tile than others
    q = torch.randn(1, 2, sq, 16, generator=g) * (1e5 if scale is None else 1.0)
    k, v = torch.randn(1, 2, sk, 16, generator=g), torch.randn(1, 2, sk, 8, generator=g)
    for qq in (q, -q):
        out, lse = attnsel.attention(qq, k, v, is_causal=causal, scale=scale, backend="native", return_lse=True)
        ref, dead = reference(qq, k, v, causal=causal, scale=scale)
        assert not dead.any()
        assert max_err(out, ref, ~dead) <= 1e-6
        s = (qq.double() @ k.double().transpose(-1, -2)) * (0.25 if scale is None else scale)
        if causal:
            s = s.masked_fill(~torch.ones(sq, sk, dtype=torch.bool).tril(), -math.inf)
        best = s.amax(-1)
        assert torch.isfinite(lse).all()
        assert ((lse.double() - best).abs() <= 1e-6 * best.abs()).all()
