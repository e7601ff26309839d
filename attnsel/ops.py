"""`attnsel.attention`: one call, any backend, (B, H, S, D) tensors like PyTorch SDPA."""

from __future__ import annotations

import torch

from . import _C
from .backends import Backend, to_backend
from .bridges import BRIDGES
from .context import _SCOPE, current_scope, native_view
from .selection import DEVICE_TYPES, DTYPE_NAMES, explain_attn_backend, get_attn_backend

# The registered op's one overload, called directly (the overload packet resolves it on every call: ~0.3 us).
_OP = torch.ops.attnsel.attention.default

# Per-call fast paths (eager mode). Both only ever hold answers the full path gave, for non-bridge backends:
#   _EXPLICIT: the `backend` argument as the caller spelled it (a str or Backend) -> native backend id;
#   _AUTO: (dtype, device kind, head size, the task's scope view, native selection token) -> native backend id.
# The native token changes whenever the forced backend, the global flag or a capability changes, and is None while
# a C++ scope is active on this thread, so a cached answer is only reused under the state it was selected in; the
# scope view comes from this task's ContextVar, as in the full path. Bounded: cleared when full.
_EXPLICIT: dict = {}
_AUTO: dict = {}
_MAX_CACHED = 1024
_NAME_TYPES = (str, Backend)
# Bound once: on a ~5 us call, each module attribute lookup is measurable.
_is_compiling = torch.compiler.is_compiling
_selection_token = _C.selection_token
_scope_get = _SCOPE.get
_Tensor = torch.Tensor


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
    return_lse: bool = False,
):
    """Scaled dot-product attention on `backend`, or on the selector's answer for these inputs when None.

    q: (B, Hq, Sq, D); k: (B, Hkv, Sk, D); v: (B, Hkv, Sk, Dv) with Hkv dividing Hq (grouped-query);
    attn_mask: bool (True = attend) or additive, broadcastable to (B, Hq, Sq, Sk); causal is top-left aligned.
    Returns the output (B, Hq, Sq, Dv); with return_lse=True, (output, lse) where lse is the natural-log
    log-sum-exp of each query row's scaled, masked scores, (B, Hq, Sq) float32 (-inf for a row that sees no key).
    """
    if return_lse:
        return _attention_lse(q, k, v, attn_mask, is_causal, scale, backend)
    if backend is not None:
        # Only names and members are cached: an int or bool equal to a member must still be refused below.
        bid = _EXPLICIT.get(backend) if backend.__class__ in _NAME_TYPES else None
        if bid is not None:
            return _OP(q, k, v, attn_mask, is_causal, scale, bid)[0]
        chosen = to_backend(backend)
        if chosen not in BRIDGES and backend.__class__ in _NAME_TYPES:
            if len(_EXPLICIT) >= _MAX_CACHED:
                _EXPLICIT.clear()
            _EXPLICIT[backend] = int(chosen)
    elif _is_compiling():
        chosen = None  # the native op selects with this thread's context at run time
    else:
        if not isinstance(q, _Tensor) or len(shape := q.shape) != 4:
            raise ValueError("attnsel.attention: q must be a 4-d tensor (batch, heads, seq, head_dim)")
        token = _selection_token()
        if token is not None:
            scope = _scope_get()
            # Device kind 0 (neither CPU nor CUDA) is never cached: it takes the full path and its error.
            key = (q.dtype, 1 if q.is_cpu else 2 if q.is_cuda else 0, shape[3], scope and scope.view, token)
            if (bid := _AUTO.get(key)) is not None:
                return _OP(q, k, v, attn_mask, is_causal, scale, bid)[0]
        chosen = _auto_backend(q)
        if token is not None and key[1] and chosen not in BRIDGES:
            if len(_AUTO) >= _MAX_CACHED:
                _AUTO.clear()
            _AUTO[key] = int(chosen)
    if chosen is not None and chosen in BRIDGES:
        if backend is not None:  # the native op checks its own backends; bridges are checked here
            explain_attn_backend(q.shape[-1], q.dtype, q.device, selected=chosen)
        return BRIDGES[chosen](q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale)
    return _OP(q, k, v, attn_mask, is_causal, scale, -1 if chosen is None else int(chosen))[0]


def _attention_lse(q, k, v, attn_mask, is_causal, scale, backend):
    chosen = None if backend is None else to_backend(backend)
    if chosen is not None and chosen in BRIDGES:
        raise ValueError(f"attnsel.attention: backend {chosen} does not return the log-sum-exp (use native)")
    return _OP(q, k, v, attn_mask, is_causal, scale, -1 if chosen is None else int(chosen), True)
