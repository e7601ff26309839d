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
    e = attnsel.explain_attn_backend(128, torch.bfloat16, "cuda")
    fa = runnable("fa", 128)
    if torch.cuda.get_device_capability() == (9, 0):  # default build has 9.0a: our Hopper kernel beats SDPA at 128
        assert e.backend == (Backend.FA if fa else Backend.NATIVE), e.reasons
    else:
        assert e.backend == (Backend.FA if fa else Backend.TORCH_SDPA), e.reasons
    e = attnsel.explain_attn_backend(64, torch.bfloat16, "cuda")  # cuDNN stays ahead at 64 on long rows
    assert e.backend == (Backend.FA if runnable("fa", 64) else Backend.TORCH_SDPA), e.reasons
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
