"""GPU selection and bridges (skipped without a CUDA GPU): every runnable CUDA backend against an fp32 reference."""

import pytest
import torch
import torch.nn.functional as F

import attnsel
from attnsel import Backend

if not torch.cuda.is_available():
    pytest.skip("no CUDA GPU: GPU backend tests need one", allow_module_level=True)

EXACT = ["native", "torch_sdpa", "sdpa_flash", "sdpa_cudnn", "sdpa_efficient", "sdpa_math", "fa", "fa2"]


def runnable(name, head_size=128, dtype=torch.bfloat16):
    try:
        attnsel.get_attn_backend(head_size, dtype, "cuda", selected=name)
        return True
    except ValueError:
        return False


def errors(backend, q, k, v, causal):
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=causal)
    ours = attnsel.attention(q, k, v, is_causal=causal, backend=backend)
    torch_own = F.scaled_dot_product_attention(q, k, v, is_causal=causal)  # PyTorch's own pick (flash/cuDNN)
    return (ours.float() - ref).abs().max().item(), (torch_own.float() - ref).abs().max().item()


@pytest.mark.parametrize("backend", EXACT)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_exact_backends_match_reference(backend, causal, dtype):
    if not runnable(backend, 128, dtype):
        pytest.skip(f"{backend} cannot run here")
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(2, 8, 333, 128, device="cuda", generator=g, dtype=dtype) for _ in range(3))
    ours, theirs = errors(backend, q, k, v, causal)
    assert ours <= 2 * theirs + 1e-3, f"{backend}: error {ours:.3g} vs PyTorch's {theirs:.3g}"


def test_sage_attn_bridge_runs_when_installed():
    if not runnable("sage_attn", 128, torch.float16):
        pytest.skip("sageattention is not installed")
    g = torch.Generator(device="cuda").manual_seed(1)
    q, k, v = (torch.randn(1, 8, 1024, 128, device="cuda", generator=g, dtype=torch.float16) for _ in range(3))
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    out = attnsel.attention(q, k, v, backend="sage_attn")
    # SageAttention quantises Q and K to int8: compare relative error, not the 2x rule for exact kernels.
    rel = ((out.float() - ref).norm() / ref.norm()).item()
    assert rel < 0.05, rel


def test_auto_choice_on_cuda_and_refusals():
    e = attnsel.explain_attn_backend(512, torch.bfloat16, "cuda")
    assert e.backend == Backend.NATIVE and e.source == "auto"
    # A layer's policy shows auto's choice for a one-token call: SDPA leads on short key loops.
    e = attnsel.explain_attn_backend(128, torch.bfloat16, "cuda")
    assert e.backend == (Backend.FA if runnable("fa", 128) else Backend.TORCH_SDPA), e.reasons
    e = attnsel.explain_attn_backend(64, torch.bfloat16, "cuda")
    assert e.backend == (Backend.FA if runnable("fa", 64) else Backend.TORCH_SDPA), e.reasons


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0)
                    or runnable("fa", 128), reason="the static rank measured on an H200 without flash-attn")
@pytest.mark.parametrize("head_dim, keys, expected", [
    (128, 4096, "native"), (128, 1024, "native"), (128, 512, "native"), (128, 300, "torch_sdpa"),
    (96, 4096, "native"), (96, 1024, "torch_sdpa"), (72, 4096, "native"), (256, 2048, "native"),
    (64, 4096, "torch_sdpa"), (64, 4100, "native"), (64, 1000, "torch_sdpa"), (112, 4096, "torch_sdpa")])
def test_untuned_auto_on_hopper_follows_the_measured_rank(head_dim, keys, expected, tmp_path, monkeypatch):
    """Without a tuning entry auto runs native where it measured faster than SDPA on the H200 (from 2048 keys, and at
    head_dim 128 from 512; at head_dim 64 only off a multiple of 64 keys) and SDPA elsewhere."""
    from attnsel import _C

    q = torch.randn(1, 2, 64, head_dim, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, 2, keys, head_dim, device="cuda", dtype=torch.bfloat16)
    sig = attnsel.selection.call_signature(q, k, k)
    saved = _C.tuning_entry(sig.bucket())
    _C.set_tuning_entry(sig.bucket(), [])  # no measurement: the static rank decides
    try:
        plan = attnsel.explain_call(q, k, k)
        assert plan.backend == Backend[expected.upper()] and plan.measured is None, plan.reasons
    finally:
        if saved:
            _C.set_tuning_entry(sig.bucket(), saved)
    with pytest.raises(ValueError, match="float32"):
        attnsel.get_attn_backend(128, torch.float32, "cuda", selected="native")
    # Refusals name the limit hit: multiples of 8 from 8 to 256, and 512.
    with pytest.raises(ValueError, match="head_dim 100 is not a multiple of 8"):
        attnsel.get_attn_backend(100, torch.bfloat16, "cuda", selected="native")
    with pytest.raises(ValueError, match="head_dim 384 is above 256 and not 512"):
        attnsel.get_attn_backend(384, torch.bfloat16, "cuda", selected="native")
    assert attnsel.get_attn_backend(96, torch.bfloat16, "cuda", selected="native") == Backend.NATIVE
    q = torch.randn(1, 2, 64, 96, device="cuda", dtype=torch.bfloat16)
    mask = torch.rand(64, 64, device="cuda") < 0.5
    ours = attnsel.attention(q, q, q, attn_mask=mask, backend="native")  # masks run natively now
    ref = F.scaled_dot_product_attention(q.float(), q.float(), q.float(), attn_mask=mask)
    assert (ours.float() - ref).abs().max().item() < 3e-2


def test_native_cuda_opcheck_and_compile():
    q = torch.randn(1, 4, 77, 64, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, 2, 90, 64, device="cuda", dtype=torch.bfloat16)
    torch.library.opcheck(torch.ops.attnsel.attention.default, (q, k, k, None, True, None, int(Backend.NATIVE)),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))
    layer = attnsel.nn.Attention(4, 64, num_kv_heads=2, dtype=torch.bfloat16, device="cuda", backend="native")
    compiled = torch.compile(lambda a, b: layer(a, b, b, is_causal=True), fullgraph=True)
    assert torch.allclose(compiled(q, k).float(), layer(q, k, k, is_causal=True).float(), atol=1e-2)


def test_vae_pipeline_head_dim_512_runs_on_gpu_native():
    q = torch.randn(1, 1, 4096, 512, device="cuda", dtype=torch.bfloat16)
    ours, theirs = errors("native", q, q * 0.5, q, False)
    assert ours <= 2 * theirs + 1e-3
