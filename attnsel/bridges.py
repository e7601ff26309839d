"""Bridges to Python attention libraries (flash-attn, sageattention) and pinned PyTorch SDPA sub-kernels.

Each bridge reports its availability to the native registry at import, with the reason when it cannot run, so
selection and `attnsel backends` explain every refusal. Kernels that live in C++ (native, torch_sdpa) are not here.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Callable

import torch
import torch.nn.functional as F

from . import _C
from .backends import Backend
from .selection import cuda_unavailable_reason

BridgeFn = Callable[..., torch.Tensor]


def _no_mask(name: str, attn_mask) -> None:
    if attn_mask is not None:
        raise ValueError(f"attnsel.attention: backend {name} takes no attn_mask; use native or torch_sdpa")


def _causal_aligned(name: str, q: torch.Tensor, k: torch.Tensor, is_causal: bool) -> None:
    # flash-attn aligns causal masks bottom-right, PyTorch top-left: they agree only when lengths match.
    if is_causal and q.shape[2] != k.shape[2]:
        raise ValueError(
            f"attnsel.attention: backend {name} aligns causal masks differently from PyTorch when query and key "
            f"lengths differ ({q.shape[2]} vs {k.shape[2]}); use native or torch_sdpa"
        )


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def _flash_layout(fn: BridgeFn, name: str) -> BridgeFn:
    """flash-attn takes (B, S, H, D); attnsel's API is (B, H, S, D) like SDPA."""

    def run(q, k, v, attn_mask=None, is_causal=False, scale=None):
        _no_mask(name, attn_mask)
        _causal_aligned(name, q, k, is_causal)
        out = _first(fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale=scale, causal=is_causal))
        return out.transpose(1, 2)

    return run


def _sage(q, k, v, attn_mask=None, is_causal=False, scale=None):
    _no_mask("sage_attn", attn_mask)
    _causal_aligned("sage_attn", q, k, is_causal)
    from sageattention import sageattn

    return sageattn(q, k, v, tensor_layout="HND", is_causal=is_causal, sm_scale=scale)


def _sdpa_pinned(kernel_name: str) -> BridgeFn:
    def run(q, k, v, attn_mask=None, is_causal=False, scale=None):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(getattr(SDPBackend, kernel_name)):
            return F.scaled_dot_product_attention(
                q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale, enable_gqa=q.shape[1] != k.shape[1]
            )

    return run


def _import_fa() -> tuple[BridgeFn | None, str]:
    if importlib.util.find_spec("flash_attn_interface") is not None:  # FlashAttention-3 (Hopper)
        mod = importlib.import_module("flash_attn_interface")
        return _flash_layout(mod.flash_attn_func, "fa"), "flash_attn_interface (FA3)"
    try:
        if importlib.util.find_spec("flash_attn") is not None and importlib.util.find_spec("flash_attn.cute"):
            mod = importlib.import_module("flash_attn.cute.interface")  # FlashAttention-4 (CuTe DSL)
            return _flash_layout(mod.flash_attn_func, "fa"), "flash_attn.cute (FA4)"
    except (ImportError, ModuleNotFoundError):
        pass
    return None, "flash-attn 3/4 is not installed (pip install flash-attn; FA3 provides flash_attn_interface)"


def _import_fa2() -> tuple[BridgeFn | None, str]:
    if importlib.util.find_spec("flash_attn") is None:
        return None, "flash-attn 2 is not installed (pip install flash-attn)"
    mod = importlib.import_module("flash_attn")
    return _flash_layout(mod.flash_attn_func, "fa2"), f"flash_attn {getattr(mod, '__version__', '?')}"


def _import_sage() -> tuple[BridgeFn | None, str]:
    if importlib.util.find_spec("sageattention") is None:
        return None, "sageattention is not installed (pip install sageattention)"
    return _sage, "sageattention"


BRIDGES: dict[Backend, BridgeFn] = {}


def _report(backend: Backend, fn: BridgeFn | None, reason: str, cuda_ok: bool, cuda_reason: str) -> None:
    available = fn is not None and cuda_ok
    _C.set_backend_availability(int(backend), "cuda", available, "" if available else (cuda_reason or reason))
    if fn is not None:
        BRIDGES[backend] = fn


def detect() -> None:
    """Probe the optional libraries and the GPU; tell the native registry what can run."""
    cuda_reason = cuda_unavailable_reason()
    cuda_ok = not cuda_reason
    if cuda_ok:
        major, minor = torch.cuda.get_device_capability()
        _C.set_cuda_compute_capability(major, minor)
    for backend, probe in ((Backend.FA, _import_fa), (Backend.FA2, _import_fa2), (Backend.SAGE_ATTN, _import_sage)):
        try:
            fn, why = probe()
        except Exception as exc:  # a broken install must explain itself, not break `import attnsel`
            fn, why = None, f"import failed: {type(exc).__name__}: {exc}"
        _report(backend, fn, why, cuda_ok, cuda_reason if fn is not None else "")
    for backend, kernel in (
        (Backend.SDPA_CUDNN, "CUDNN_ATTENTION"),
        (Backend.SDPA_FLASH, "FLASH_ATTENTION"),
        (Backend.SDPA_EFFICIENT, "EFFICIENT_ATTENTION"),
        (Backend.SDPA_MATH, "MATH"),
    ):
        _report(backend, _sdpa_pinned(kernel), "", cuda_ok, cuda_reason)
