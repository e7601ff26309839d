"""`attnsel.attention`: one call, any backend, (B, H, S, D) tensors like PyTorch SDPA."""

from __future__ import annotations

import torch

from . import _C
from .backends import Backend, to_backend
from .bridges import BRIDGES
from .context import current_scope, native_view
from .selection import DEVICE_TYPES, DTYPE_NAMES, explain_attn_backend, get_attn_backend


def _auto_backend(q: torch.Tensor) -> Backend:
    """The selector's answer for q, on the cheap per-call path (same native selector and cache)."""
    dtype, device = DTYPE_NAMES.get(q.dtype), q.device.type
    if dtype is None or device not in DEVICE_TYPES:
        return get_attn_backend(q.shape[-1], q.dtype, q.device)  # raises the full ValueError
    return Backend(_C.select_id(q.shape[-1], dtype, device, native_view(current_scope())))


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    backend: str | Backend | None = None,
) -> torch.Tensor:
    """Scaled dot-product attention on `backend`, or on the selector's answer for these inputs when None.

    q: (B, Hq, Sq, D); k: (B, Hkv, Sk, D); v: (B, Hkv, Sk, Dv) with Hkv dividing Hq (grouped-query);
    attn_mask: bool (True = attend) or additive, broadcastable to (B, Hq, Sq, Sk); causal is top-left aligned.
    """
    if backend is not None:
        chosen = to_backend(backend)
    elif torch.compiler.is_compiling():
        chosen = None  # the native op selects with this thread's context at run time
    else:
        if not isinstance(q, torch.Tensor) or q.dim() != 4:
            raise ValueError("attnsel.attention: q must be a 4-d tensor (batch, heads, seq, head_dim)")
        chosen = _auto_backend(q)
    if chosen is not None and chosen in BRIDGES:
        if backend is not None:  # the native op checks its own backends; bridges are checked here
            explain_attn_backend(q.shape[-1], q.dtype, q.device, selected=chosen)
        return BRIDGES[chosen](q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale)
    return torch.ops.attnsel.attention(q, k, v, attn_mask, is_causal, scale, -1 if chosen is None else int(chosen))
