"""Bridges to Python attention libraries (flash-attn 2/3/4, sageattention).

Each bridge registers its backend's descriptor with the native registry at import (available, or the reason it
cannot run), and its kernel through torch.library (the op attnsel::bridge), so selection, `attnsel backends`, the
op, the C++ API and torch.compile all see it. Backends implemented in C++ (native, the PyTorch SDPA family) are
registered by the torch glue.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
from typing import Callable

import torch

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


def _returns_lse(fn) -> str | None:
    """The keyword with which a flash-attn entry point also returns the log-sum-exp (None: it cannot)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # a builtin without a signature
        return None
    return next((name for name in ("return_lse", "return_attn_probs") if name in params), None)


def _flash_layout(fn: BridgeFn, name: str) -> BridgeFn:
    """flash-attn takes (B, S, H, D); attnsel's API is (B, H, S, D) like SDPA. With return_lse the library's
    softmax_lse ((B, H, Sq) float32, natural log) comes back as the second output."""
    lse_keyword = _returns_lse(fn)

    def run(q, k, v, attn_mask=None, is_causal=False, scale=None, return_lse=False):
        _no_mask(name, attn_mask)
        _causal_aligned(name, q, k, is_causal)
        extra = {lse_keyword: True} if return_lse and lse_keyword else {}
        res = fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale=scale, causal=is_causal,
                 **extra)
        out = (res[0] if isinstance(res, tuple) else res).transpose(1, 2)
        if not return_lse:
            return out
        if not extra or not isinstance(res, tuple) or len(res) < 2:
            raise ValueError(f"attnsel.attention: backend {name} ({getattr(fn, '__module__', '?')}) does not return "
                             f"the log-sum-exp; use native")
        return out, res[1]

    run.returns_lse = lse_keyword is not None
    return run


def _sage(q, k, v, attn_mask=None, is_causal=False, scale=None):
    _no_mask("sage_attn", attn_mask)
    _causal_aligned("sage_attn", q, k, is_causal)
    from sageattention import sageattn

    return sageattn(q, k, v, tensor_layout="HND", is_causal=is_causal, sm_scale=scale)


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

# Descriptors of the bridged backends (what selection checks before a call reaches the library), by the facts each
# library documents. Ranks: `auto` tries fa first on CUDA (rank 10, ahead of native's 20 and torch_sdpa's 30);
# fa2 and sage run only when named or measured fastest by `attnsel tune`. (The pinned PyTorch SDPA kernels are
# registered by the torch glue, csrc/torch/sdpa.cpp.)
_FLASH = dict(f16=True, bf16=True, min_head=8, max_head=256, head_multiple=8, min_sm=80,
              features=dict(causal=True, grouped_query=True, different_lengths=True))
_DESCRIPTORS: dict[Backend, dict] = {
    Backend.FA: dict(_FLASH, auto_rank=10),
    Backend.FA2: dict(_FLASH),
    Backend.SAGE_ATTN: dict(f16=True, bf16=True, min_head=64, max_head=128, head_multiple=64, min_sm=80,
                            features=dict(causal=True, different_lengths=True)),
}


def register(backend: Backend, fn: BridgeFn | None, library: str, device: str = "cuda", reason: str = "",
             **overrides) -> None:
    """Register a bridged backend on `device`: its descriptor (available when `fn` is given and `reason` is empty;
    `overrides` replace descriptor fields; the log-sum-exp feature where the library returns it) and its kernel,
    which the op reaches through attnsel::bridge."""
    descriptor = dict(_DESCRIPTORS[backend], library=library, **overrides)
    if getattr(fn, "returns_lse", False):
        descriptor["features"] = dict(descriptor.get("features", {}), lse=True)
    available = fn is not None and not reason
    descriptor.update(available=available, unavailable_reason="" if available else reason)
    _C.register_backend(int(backend), device, descriptor)
    if fn is not None:
        BRIDGES[backend] = fn


def _bridge_impl(q, k, v, attn_mask, is_causal, scale, backend, return_lse=False):
    fn = BRIDGES.get(Backend(backend))
    if fn is None:  # the descriptor said available; only a registry edited behind our back gets here
        raise ValueError(f"attnsel.attention: backend {Backend(backend)} has no bridge registered in this process")
    if not return_lse:
        out = fn(q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale)
        return out.contiguous(), q.new_empty(0, dtype=torch.float32)
    out, lse = fn(q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale, return_lse=True)
    return out.contiguous(), lse.float().contiguous()


torch.library.impl("attnsel::bridge", ("CPU", "CUDA"))(_bridge_impl)


@torch.library.register_fake("attnsel::bridge")
def _bridge_fake(q, k, v, attn_mask, is_causal, scale, backend, return_lse=False):
    out = q.new_empty((q.shape[0], q.shape[1], q.shape[2], v.shape[3]))
    lse = q.new_empty((q.shape[0], q.shape[1], q.shape[2]) if return_lse else (0,), dtype=torch.float32)
    return out, lse


def detect() -> None:
    """Probe the optional libraries and the GPU; register what can run (and why the rest cannot)."""
    cuda_reason = cuda_unavailable_reason()
    if not cuda_reason:
        major, minor = torch.cuda.get_device_capability()
        _C.set_cuda_compute_capability(major, minor)
    for backend, probe in ((Backend.FA, _import_fa), (Backend.FA2, _import_fa2), (Backend.SAGE_ATTN, _import_sage)):
        try:
            fn, why = probe()
        except Exception as exc:  # a broken install must explain itself, not break `import attnsel`
            fn, why = None, f"import failed: {type(exc).__name__}: {exc}"
        register(backend, fn, why if fn is not None else "", reason=why if fn is None else cuda_reason)
