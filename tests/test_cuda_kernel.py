"""GPU tests of the native CUDA attention kernel (backend "native").

Error vs an fp32 reference must stay within 2x PyTorch SDPA's own bf16/fp16 error on the same inputs,
over a seeded sweep: odd lengths, every head size class, causal, GQA, non-contiguous layouts, boolean and
additive masks in every broadcast form (fully masked rows give zeros and an LSE of -inf), and the log-sum-exp
against a float64 reference. Skips cleanly without a GPU or without a CUDA build of attnsel; fails when the
GPU is there and the kernel errs. On Hopper, test_mma_kernels_on_hopper re-runs the mask / head size / LSE
tests with ATTNSEL_CUDA_KERNEL=mma, so the sm_80 mma.sync kernels are checked there too.

ATTNSEL_TEST_DEV_HARNESS=1 runs the tests through tools/cuda_dev (ctypes build of the kernels) instead, for use
before the extension is built (with pytest's --noconftest, which would import the extension).
"""
import math
import os
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")

if not torch.cuda.is_available():
    pytest.skip("CUDA is not available", allow_module_level=True)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEV_HARNESS = bool(os.environ.get("ATTNSEL_TEST_DEV_HARNESS"))


def _native_attention():
    if DEV_HARNESS:
        sys.path.insert(0, os.path.join(ROOT, "tools", "cuda_dev"))
        try:
            import devattn
        except Exception as e:  # pragma: no cover
            pytest.skip(f"dev harness not importable: {e}", allow_module_level=True)

        def dev(q, k, v, is_causal=False, attn_mask=None, return_lse=False):
            return devattn.attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, return_lse=return_lse)

        return dev
    try:
        import attnsel
    except Exception as e:
        pytest.skip(f"attnsel not importable: {e}", allow_module_level=True)
    if not hasattr(attnsel, "attention"):
        pytest.skip("attnsel has no attention() entry point", allow_module_level=True)
    probe = torch.randn(1, 1, 8, 64, device="cuda", dtype=torch.bfloat16)
    try:
        attnsel.attention(probe, probe, probe, is_causal=False, backend="native")
        torch.cuda.synchronize()
    except Exception as e:  # no CUDA build, or native not registered for CUDA
        pytest.skip(f"attnsel has no CUDA build of backend 'native': {type(e).__name__}: {e}", allow_module_level=True)
    return lambda q, k, v, is_causal=False, attn_mask=None, return_lse=False: attnsel.attention(
        q, k, v, attn_mask=attn_mask, is_causal=is_causal, backend="native", return_lse=return_lse)


attention = _native_attention()
MAJOR, MINOR = torch.cuda.get_device_capability()
DTYPES = [torch.bfloat16, torch.float16]


def _make(shape, dtype, layout, gen):
    B, H, S, D = shape
    if layout == "bhsd":
        return torch.randn(shape, generator=gen, device="cuda").to(dtype)
    if layout == "bshd":  # [B, S, H, D] memory viewed as [B, H, S, D]
        return torch.randn((B, S, H, D), generator=gen, device="cuda").to(dtype).transpose(1, 2)
    if layout == "padded":  # rows wider than D, last dim contiguous
        return torch.randn((B, H, S + 3, D + 64), generator=gen, device="cuda").to(dtype)[:, :, 1 : S + 1, 32 : 32 + D]
    if layout == "expand":  # one [S, D] matrix broadcast over batch and heads: strides (0, 0, D, 1)
        return torch.randn((1, 1, S, D), generator=gen, device="cuda").to(dtype).expand(B, H, S, D)
    raise ValueError(layout)


def _scores(q, k, causal, mask, dtype):
    """scale * q.k^T + mask in `dtype` (float32 or float64), -inf where no key is seen, GQA expanded."""
    q, k = q.to(dtype), k.to(dtype)
    g = q.shape[1] // k.shape[1]
    if g > 1:
        k = k.repeat_interleave(g, dim=1)
    s = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    if mask is not None:
        m = mask.expand(s.shape)
        s = s.masked_fill(~m, float("-inf")) if mask.dtype == torch.bool else s + m.to(dtype)
    if causal:  # top-left aligned, as PyTorch
        s = s.masked_fill(~torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).tril(), float("-inf"))
    return s


def _reference(q, k, v, causal, mask=None):
    """fp32 attention; rows that see no key give zeros (what the kernel documents)."""
    s = _scores(q, k, causal, mask, torch.float32)
    g = q.shape[1] // v.shape[1]
    v = v.float().repeat_interleave(g, dim=1) if g > 1 else v.float()
    dead = torch.isneginf(s).all(-1, keepdim=True)
    p = torch.softmax(s.masked_fill(dead, 0.0), dim=-1).masked_fill(dead, 0.0)
    return torch.matmul(p, v), dead.squeeze(-1)


def _rel(out, ref):
    return ((out.float() - ref).norm() / max(ref.norm().item(), 1e-6)).item()


def _sdpa(q, k, v, causal, mask):
    """PyTorch's own kernel on the same inputs (causal folded into the mask when both are given)."""
    if mask is not None:
        B, H, Sq, Sk = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
        m = mask.expand(B, H, Sq, Sk)
        if m.dtype != torch.bool:
            m = m.to(q.dtype)
        if m.data_ptr() % 16:  # PyTorch's SDPA faulted (misaligned address) on such a mask on an H200 (torch 2.11)
            m = m.contiguous()
        if causal:
            tri = torch.ones(Sq, Sk, dtype=torch.bool, device=q.device).tril()
            m = m & tri if m.dtype == torch.bool else m.masked_fill(~tri, float("-inf"))
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=m, enable_gqa=q.shape[1] != k.shape[1])
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=q.shape[1] != k.shape[1])


def _check(B, Hq, Hkv, Sq, Sk, D, causal, dtype, layout=("bhsd", "bhsd", "bhsd"), seed=0, mask=None, lse=False):
    """mask: None or a callable(gen) -> mask tensor on the GPU (bool or additive)."""
    if D == 512 and MAJOR not in (9, 10):
        pytest.skip("head_dim 512 needs ~202 KB shared memory (sm_90/sm_100)")
    gen = torch.Generator(device="cuda").manual_seed(seed)
    q = _make((B, Hq, Sq, D), dtype, layout[0], gen)
    k = _make((B, Hkv, Sk, D), dtype, layout[1], gen)
    v = _make((B, Hkv, Sk, D), dtype, layout[2], gen)
    m = mask(gen) if mask is not None else None
    ref, dead = _reference(q, k, v, causal, m)
    res = attention(q, k, v, is_causal=causal, attn_mask=m, return_lse=lse)
    out = res[0] if lse else res
    torch.cuda.synchronize()
    assert out.shape == (B, Hq, Sq, D) and out.dtype == dtype
    assert torch.isfinite(out).all(), "non-finite output"
    assert (out[dead] == 0).all(), "rows that see no key must be zero"
    live = ~dead
    sdpa = _sdpa(q, k, v, causal, m)
    e_ours, e_sdpa = _rel(out[live], ref[live]), _rel(sdpa[live], ref[live])
    assert e_ours <= 2.0 * max(e_sdpa, 1e-6), f"error {e_ours:.3e} > 2 x SDPA's {e_sdpa:.3e}"
    if lse:
        got = res[1]
        assert got.shape == (B, Hq, Sq) and got.dtype == torch.float32
        want = torch.logsumexp(_scores(q, k, causal, m, torch.float64), dim=-1)
        assert torch.equal(torch.isneginf(got), torch.isneginf(want)), "LSE -inf pattern differs"
        fin = torch.isfinite(want)
        err = (got.double()[fin] - want[fin]).abs().max().item() if fin.any() else 0.0
        assert err <= 1e-3 + 1e-4 * want[fin].abs().max().item(), f"LSE error {err:.3e}"


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("D", [64, 80, 96, 128, 256, 512])
@pytest.mark.parametrize("Sq,Sk", [(1, 1), (1, 77), (77, 1), (127, 129), (128, 128), (257, 1000), (1000, 257)])
def test_lengths(Sq, Sk, D, causal, dtype):
    _check(2, 3, 3, Sq, Sk, D, causal, dtype, seed=Sq * 7919 + Sk)


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("D", [64, 96, 128, 256, 512])
def test_gqa(D, causal, dtype):
    _check(1, 8, 2, 300, 411, D, causal, dtype, seed=D)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("D", [64, 72, 128, 256, 512])
@pytest.mark.parametrize("layout", [("bshd", "padded", "bshd"), ("padded", "bshd", "padded")], ids=["bshd-q", "padded-q"])
def test_non_contiguous(layout, D, causal):
    _check(2, 6, 3, 200, 333, D, causal, torch.bfloat16, layout=layout, seed=D + 1)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("D", [64, 88, 128, 256, 512])
def test_expanded_kv(D, causal):  # zero batch/head strides (e.g. one text context shared by a batch)
    _check(2, 4, 2, 150, 211, D, causal, torch.bfloat16, layout=("bhsd", "expand", "expand"), seed=D + 2)


@pytest.mark.parametrize("D", [64, 72, 88, 128, 512])
def test_long_rows(D):  # many key tiles; for D=512 this also takes the split-KV path
    _check(1, 2, 1, 2049, 4095, D, False, torch.bfloat16, seed=5)
    _check(1, 2, 2, 4095, 2049, D, True, torch.float16, seed=6)


def test_deterministic():
    gen = torch.Generator(device="cuda").manual_seed(3)
    q, k, v = (torch.randn(1, 4, 999, 128, generator=gen, device="cuda").to(torch.bfloat16) for _ in range(3))
    a = attention(q, k, v, is_causal=True)
    b = attention(q, k, v, is_causal=True)
    assert torch.equal(a, b)


HEAD_SIZES = [8, 40, 72, 80, 88, 96, 136, 160, 192, 200, 256, 512]


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("D", HEAD_SIZES)
def test_head_sizes(D, causal, dtype):  # zero-padded to 64/128/256 inside the kernel (Hopper: 65-80 to 80, 81-96 to 96)
    _check(2, 4, 2, 133, 301, D, causal, dtype, seed=D * 3 + causal)
    _check(1, 2, 2, 300, 70, D, causal, dtype, layout=("bshd", "padded", "bshd"), seed=D * 5 + causal)


def _bool(shape, p_keep=0.7):
    return lambda gen: torch.rand(shape, generator=gen, device="cuda") < p_keep


def _add(shape, dtype):
    return lambda gen: (torch.randn(shape, generator=gen, device="cuda") * 2).to(dtype)


def _key_padding(B, Sk, lengths, form):
    """True for the first lengths[b] keys of batch b; form (Sk,) uses batch 0 only."""
    def make(gen):
        idx = torch.arange(Sk, device="cuda")
        m = idx[None, :] < torch.tensor(lengths, device="cuda")[:, None]  # (B, Sk)
        return m[0] if form == "sk" else m[:, None, None, :]
    return make


B_, H_, SQ, SK = 2, 4, 173, 211
MASKS = {
    "bool-sk": _bool((SK,)),
    "bool-b11k": _bool((B_, 1, 1, SK)),
    "bool-11qk": _bool((1, 1, SQ, SK)),
    "bool-bhqk": _bool((B_, H_, SQ, SK)),
    "bool-keypad": _key_padding(B_, SK, [SK, 37], "b11k"),
    "add32-sk": _add((SK,), torch.float32),
    "add32-b11k": _add((B_, 1, 1, SK), torch.float32),
    "add32-11qk": _add((1, 1, SQ, SK), torch.float32),
    "add32-bhqk": _add((B_, H_, SQ, SK), torch.float32),
    "addq-b11k": (B_, 1, 1, SK),  # additive in q's dtype: made per test
    "addq-bhqk": (B_, H_, SQ, SK),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("D", [64, 72, 96, 128, 256, 512])
@pytest.mark.parametrize("form", list(MASKS))
def test_masks(form, D, causal, dtype):
    make = _add(MASKS[form], dtype) if form.startswith("addq") else MASKS[form]
    _check(B_, H_, 2, SQ, SK, D, causal, dtype, seed=len(form) * 31 + D, mask=make, lse=True)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("D", [40, 64, 96, 128, 200, 256, 512])
def test_key_padding_many_tiles(D, causal):  # the key-padding path over many key tiles, bool and additive
    def additive(gen):
        m = torch.randn(3, 1, 1, 1500, generator=gen, device="cuda")
        m[1, ..., 700:] = float("-inf")
        return m

    _check(3, 4, 2, 257, 1500, D, causal, torch.bfloat16, seed=D, mask=_key_padding(3, 1500, [1500, 1023, 129], "b11k"),
           lse=True)
    _check(3, 4, 4, 257, 1500, D, causal, torch.float16, seed=D + 1, mask=additive, lse=True)


@pytest.mark.parametrize("D", [64, 72, 88, 128, 256, 512])
def test_fully_masked_rows(D):  # rows with no key: zeros and LSE -inf (bool all-False, additive all -inf)
    def bool_mask(gen):
        m = torch.rand(2, 1, 90, 150, generator=gen, device="cuda") < 0.5
        m[0, 0, 5] = False
        m[1, 0, 60:70] = False
        return m

    def add_mask(gen):
        m = torch.zeros(2, 3, 90, 150, device="cuda")
        m[:, :, ::7] = float("-inf")
        m[1, 2, 1, 3] = -5.0  # nearly masked row keeps its one key
        m[1, 2, 1, 4:] = float("-inf")
        return m

    key_pad = _key_padding(2, 150, [150, 0], "b11k")  # batch 1 sees no key at all
    for i, mk in enumerate([bool_mask, add_mask, key_pad]):
        _check(2, 3, 3, 90, 150, D, False, torch.bfloat16, seed=D + i, mask=mk, lse=True)
        _check(2, 3, 3, 90, 150, D, True, torch.float16, seed=D + i + 10, mask=mk, lse=True)


@pytest.mark.parametrize("D", [40, 96, 128, 512])
def test_mask_layouts(D):  # non-contiguous masks: last-dim stride 2, transposed storage; GQA + odd lengths
    def strided(gen):
        return (torch.rand(2, 3, 77, 2 * 129, generator=gen, device="cuda") < 0.8)[..., ::2]

    def transposed(gen):
        return torch.randn(2, 3, 129, 77, generator=gen, device="cuda").transpose(-1, -2)

    _check(2, 3, 1, 77, 129, D, False, torch.bfloat16, seed=D, mask=strided, lse=True)
    _check(2, 3, 1, 77, 129, D, True, torch.float16, seed=D + 1, mask=transposed, lse=True,
           layout=("bshd", "bhsd", "padded"))


# Full additive masks in q's dtype whose keys are contiguous and rows 4-byte aligned are staged through shared memory
# by the Hopper kernels (AddMaskStage in flash_fwd_wg_sm90a.cuh; not at D=256): many key tiles and a partial last
# one, an odd key count inside wider rows (a pair holding one key), a row with no key, the persistent schedule, and
# a mask starting 2 bytes into its storage (the unstaged path; _sdpa hands PyTorch an aligned copy of it).
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("D", [64, 80, 128, 256])
def test_additive_mask_q_dtype(D, causal):
    def dense(gen):
        m = (torch.randn(2, 3, 200, 1000, generator=gen, device="cuda") * 2).to(torch.bfloat16)
        m[1, 2, 7] = float("-inf")
        return m

    def odd_keys(gen):  # 999 keys in rows of 1002
        return (torch.randn(1, 1, 200, 1002, generator=gen, device="cuda") * 2).to(torch.float16)[..., :999]

    def unaligned(gen):
        return (torch.randn(2, 1, 200, 1002, generator=gen, device="cuda") * 2).to(torch.bfloat16)[..., 1:1001]

    def persistent(gen):  # 240 work items, 2 key tiles
        return (torch.randn(2, 40, 257, 130, generator=gen, device="cuda") * 2).to(torch.float16)

    def wide_odd(gen):  # 16-byte aligned rows of 1000 (copied in 16-byte pieces), 997 keys: a partial last piece
        return (torch.randn(1, 2, 200, 1000, generator=gen, device="cuda") * 2).to(torch.bfloat16)[..., :997]

    def persistent_wide(gen):  # the persistent schedule with 16-byte pieces: rows of 136, 130 keys
        return (torch.randn(2, 40, 257, 136, generator=gen, device="cuda") * 2).to(torch.float16)[..., :130]

    _check(2, 3, 1, 200, 1000, D, causal, torch.bfloat16, seed=D, mask=dense, lse=True)
    _check(1, 4, 2, 200, 999, D, causal, torch.float16, seed=D + 1, mask=odd_keys, lse=True)
    _check(2, 3, 3, 200, 1000, D, causal, torch.bfloat16, seed=D + 2, mask=unaligned, lse=True)
    _check(1, 2, 1, 200, 997, D, causal, torch.bfloat16, seed=D + 4, mask=wide_odd, lse=True)

    def short(keys):  # 1-3 key tiles: no more than the D=64 kernel stages ahead (its copies past the end are zeros)
        row = (keys + 15) // 8 * 8
        return lambda gen: (torch.randn(1, 1, 130, row, generator=gen, device="cuda") * 2).to(torch.float16)[..., :keys]

    for i, keys in enumerate((100, 250, 300)):
        _check(2, 3, 1, 130, keys, D, causal, torch.float16, seed=D + 10 + i, mask=short(keys), lse=True)
    if not causal:
        _check(2, 40, 8, 257, 130, D, False, torch.float16, seed=D + 3, mask=persistent, lse=True)
        _check(2, 40, 8, 257, 130, D, False, torch.float16, seed=D + 5, mask=persistent_wide, lse=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("D", [64, 80, 96, 128, 256, 512])
@pytest.mark.parametrize("Sq,Sk", [(1, 77), (77, 1), (255, 1000), (1000, 255)])
def test_lse(Sq, Sk, D, causal, dtype):  # log-sum-exp vs float64 (unmasked; the mask tests check it masked)
    _check(2, 3, 1, Sq, Sk, D, causal, dtype, seed=Sq + Sk + D, lse=True)


def test_lse_split_kv():  # D=512 with few query blocks splits the keys; the LSE comes from the combine step
    _check(1, 1, 1, 64, 8192, 512, False, torch.bfloat16, seed=9, lse=True)
    _check(1, 2, 1, 100, 4000, 512, False, torch.float16, seed=10, lse=True, mask=_bool((1, 1, 1, 4000), 0.3))


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16"])
def test_d512_key_splits(dtype):  # Hopper D=512 kernel: splits that start on odd key tiles, GQA, strided, LSE
    _check(1, 1, 1, 65, 5000, 512, False, dtype, seed=11, lse=True)  # 40 key tiles of 128 in 8 splits of 5
    _check(2, 4, 2, 200, 1100, 512, False, dtype, seed=12, lse=True, layout=("bshd", "bhsd", "padded"))


# Two key splits merge inside the kernel (a cluster of two CTAs per query tile; flash_fwd_d512_ws<T, true>) where
# pairs fit the waves: 63 query tiles x 24 key tiles and 2x32 tiles (GQA) take two splits. Partial last query and key
# tiles, strides, the LSE; repeated calls must agree bit for bit (split 0 reads split 1's shared memory).
@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16"])
def test_d512_split_pair(dtype):
    _check(1, 1, 1, 4000, 3000, 512, False, dtype, seed=13, lse=True)
    _check(1, 2, 1, 2000, 1500, 512, False, dtype, seed=14, lse=True, layout=("bshd", "padded", "bhsd"))
    gen = torch.Generator(device="cuda").manual_seed(15)
    q, k, v = (_make((1, 1, 4000, 512), dtype, "bhsd", gen) for _ in range(3))
    first = attention(q, k, v)
    for _ in range(5):
        assert torch.equal(attention(q, k, v), first)


# Hopper's persistent schedule serves short key loops (at most kPersistMaxKeyTiles key tiles, flash_fwd_wg_sm90a.cuh)
# with more (batch, head, query tile) work items than SMs: these shapes have 300-640 items and <= 300 keys, so every
# CTA walks several items (the K/V ring, the Q buffers and the key-padding rows carried across items).
@pytest.mark.parametrize("D", [40, 64, 72, 80, 88, 96, 128, 200, 256])
def test_persistent_schedule(D):
    _check(3, 48, 16, 333, 300, D, False, torch.bfloat16, seed=D, lse=True)
    _check(2, 40, 40, 300, 257, D, False, torch.float16, seed=D + 1, lse=True,
           mask=_key_padding(2, 257, [257, 77], "b11k"))
    _check(2, 40, 40, 257, 130, D, False, torch.bfloat16, seed=D + 2, lse=True, mask=_bool((2, 1, 257, 130)))
    _check(2, 40, 20, 257, 130, D, False, torch.float16, seed=D + 3, mask=_add((2, 40, 257, 130), torch.float32),
           layout=("bshd", "padded", "bhsd"))


# D <= 64 without a mask takes three consumer warpgroups (192 query rows per CTA) where its work items fill the SMs in
# fewer rounds (three_consumers_pay in tile_plan.h): 1x24x1600 queries x 2100 keys is 216 items (2 rounds of
# 132 SMs instead of 3 of 128-row items), causal 1x24x2112 is 264; partial last query tiles, GQA, strides, the LSE.
# Short key loops run persistent, with three consumers by the same rule: 2x10x1000 queries x 1000 keys is 120 items
# of 192 rows (one round) instead of 160 of 128.
@pytest.mark.parametrize("D", [40, 64])
def test_three_consumers(D):
    _check(1, 24, 8, 1600, 2100, D, False, torch.bfloat16, seed=D, lse=True)
    _check(1, 24, 24, 2112, 2112, D, True, torch.float16, seed=D + 1, lse=True, layout=("bshd", "bhsd", "padded"))
    _check(2, 10, 5, 1000, 1000, D, False, torch.bfloat16, seed=D + 2, lse=True, layout=("bshd", "padded", "bhsd"))
    _check(2, 10, 10, 1000, 1000, D, False, torch.float16, seed=D + 3)


# Where one tile height leaves the last round of SMs half idle, D <= 64 without a mask runs 192-row tiles over each
# head's first rows and 128-row tiles after them, two launches sharing the SMs (mixed_height_rows): 1x24x1600 puts 576
# rows in tall tiles, 2x10x4096 (SD-UNet) 2304. Checked with GQA and strides, and, since the second launch may finish
# first, that work queued after the call sees the first launch's rows too (20 calls, each summed right away).
@pytest.mark.parametrize("D", [40, 64])
def test_mixed_tile_heights(D):
    _check(1, 24, 8, 1600, 2100, D, False, torch.bfloat16, seed=D)
    _check(2, 10, 5, 4096, 2100, D, False, torch.float16, seed=D + 1, layout=("bshd", "bhsd", "padded"))
    gen = torch.Generator(device="cuda").manual_seed(D + 2)
    shapes = ((2, 10, 4096, D), (2, 10, 2100, D), (2, 10, 2100, D))
    q, k, v = (_make(shape, torch.bfloat16, "bhsd", gen) for shape in shapes)
    outs, sums = [], []
    # Every output kept alive: each call writes fresh memory, so a row read too early is not equal by chance.
    for _ in range(20):
        outs.append(attention(q, k, v))
        sums.append(outs[-1].float().sum(dim=(0, 1, 3)))
    for s in sums[1:]:
        assert torch.equal(s, sums[0]), "a call's rows differ from the first call's (the launches' order?)"


# On Hopper, O leaves the kernels through the copy engine where a tensor map can be made for it and from registers
# where none can (rows of `out` not a multiple of 16 bytes apart). Only the dev harness takes a caller's output tensor.
@pytest.mark.parametrize("D", [64, 128])
def test_output_views(D):
    if not DEV_HARNESS:
        pytest.skip("only the dev harness (tools/cuda_dev) takes a caller's output tensor")
    import devattn

    gen = torch.Generator(device="cuda").manual_seed(D)
    for B, H, Sq, Sk in ((2, 40, 300, 257), (1, 8, 1000, 2100)):  # persistent, then one CTA per query tile
        q, k, v = (_make(shape, torch.bfloat16, "bhsd", gen) for shape in ((B, H, Sq, D), (B, H, Sk, D), (B, H, Sk, D)))
        ref, _ = _reference(q, k, v, False)
        e_sdpa = _rel(_sdpa(q, k, v, False, None), ref)
        views = {"bshd": torch.full((B, Sq, H, D), float("nan"), device="cuda", dtype=q.dtype).transpose(1, 2),
                 "rows of D+2": torch.full((B, H, Sq, D + 2), float("nan"), device="cuda", dtype=q.dtype)[..., :D]}
        for name, out in views.items():
            devattn.attention(q, k, v, out=out)
            torch.cuda.synchronize()
            assert torch.isfinite(out).all(), f"{name}: rows not written"
            assert _rel(out, ref) <= 2.0 * max(e_sdpa, 1e-6), f"{name}: error {_rel(out, ref):.3e} vs SDPA {e_sdpa:.3e}"


def test_mma_kernels_on_hopper():
    """On sm_90 the Hopper kernels serve by default; re-run the new-feature tests on the mma.sync kernels."""
    if (MAJOR, MINOR) != (9, 0) or DEV_HARNESS or os.environ.get("ATTNSEL_CUDA_KERNEL"):
        pytest.skip("only on sm_90, where the mma.sync kernels are otherwise unused")
    env = dict(os.environ, ATTNSEL_CUDA_KERNEL="mma")
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", os.path.abspath(__file__), "-k",
           "head_sizes or masks or key_padding or fully_masked or mask_layouts or lse or gqa or expanded"]
    # Run from tests/: `python -m pytest` puts the working directory first on sys.path, and a source checkout there
    # (no built extension) would shadow the installed package.
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=os.path.dirname(__file__))
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
