"""`attnsel.attention`: one call, any backend, (B, H, S, D) tensors like PyTorch SDPA."""

from __future__ import annotations

import contextvars

import torch

from . import _C
from .backends import Backend, to_backend
from .context import _SCOPE

# The registered op's one overload, called directly (the overload packet resolves it on every call: ~0.3 us).
_OP = torch.ops.attnsel.attention.default
AUTO = -2  # the op's backend id for `auto` (the planner's fastest backend that accepts the call)
CONTEXT = -1  # the op's backend id for "this thread's policy" (what a compiled graph passes)

# Name -> backend id as the caller spelled it (a str or Backend): normalisation only, not a selection cache (the
# one plan cache lives in the native core). Bounded: cleared when full.
_NAME_IDS: dict = {}
_MAX_NAMES = 1024
_NAME_TYPES = (str, Backend)
# Bound once: on a ~5 us call, each module attribute lookup is measurable.
_is_compiling = torch.compiler.is_compiling
_call_policy = _C.call_policy
_scope_get = _SCOPE.get

_SDPA_ID = int(Backend.TORCH_SDPA)
_sdpa = torch.nn.functional.scaled_dot_product_attention
_route = _C.route
# _C.route's answer besides SDPA's output or a backend id for the op: the plan is torch_sdpa, the op would pass the
# call to PyTorch's SDPA unchanged, and an input or a mode overrides __torch_function__, so SDPA runs from Python.
SDPA_FROM_PYTHON = _C.ROUTE_SDPA_FROM_PYTHON


def sdpa_direct(q, k, v, attn_mask, is_causal, scale):
    """SDPA as the op's torch_sdpa kernel calls it (same arguments, so the same result, autograd and errors)."""
    return _sdpa(q, k, v, attn_mask, 0.0, is_causal, scale=scale, enable_gqa=q.shape[1] != k.shape[1])


# The (component, role) of the layer calling `attention` for the call hooks, set by integrations that route a
# layer's calls through it (attnsel.diffusers); attnsel.nn.Attention passes its own.
CALLER: contextvars.ContextVar = contextvars.ContextVar("attnsel_calling_layer", default=(None, None))

# Call hooks (attnsel.tuning: shape recording, online tuning): hook(q, k, v, attn_mask, is_causal, scale, backend_id,
# component, role) runs before each eager call of `attention` and `attnsel.nn.Attention`. Empty in normal runs: one check per call.
CALL_HOOKS: list = []


def _call_hooks(q, k, v, attn_mask, is_causal, scale, bid, component=None, role=None) -> None:
    """component/role: the calling layer's (attnsel.nn.Attention), else None."""
    if _is_compiling():  # traced graphs run no Python hooks
        return
    for hook in tuple(CALL_HOOKS):
        hook(q, k, v, attn_mask, is_causal, scale, bid, component, role)


def _backend_id(backend: object) -> int:
    if backend.__class__ in _NAME_TYPES:
        bid = _NAME_IDS.get(backend)
        if bid is None:
            bid = int(to_backend(backend))
            if len(_NAME_IDS) >= _MAX_NAMES:
                _NAME_IDS.clear()
            _NAME_IDS[backend] = bid
        return bid
    return int(to_backend(backend))  # raises the ValueError for anything that is not a name


def _policy_id() -> int:
    """This task's policy for a call without a layer: forced > component > global (a named id) or auto."""
    scope = _scope_get()  # None: the native side consults a scope a C++ caller entered on this thread, if any
    return _call_policy(None if scope is None else scope.view)


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
    """Scaled dot-product attention on `backend`, or on this task's policy when None (forced > component >
    --attention-backend > auto, where auto is the fastest backend that accepts the call).

    q: (B, Hq, Sq, D); k: (B, Hkv, Sk, D); v: (B, Hkv, Sk, Dv) with Hkv dividing Hq (grouped-query);
    attn_mask: bool (True = attend) or additive, broadcastable to (B, Hq, Sq, Sk); causal is top-left aligned.
    A named backend that cannot take the call raises ValueError saying what it cannot take (never a silent switch).
    Returns the output (B, Hq, Sq, Dv); with return_lse=True, (output, lse) where lse is the natural-log
    log-sum-exp of each query row's scaled, masked scores, (B, Hq, Sq) float32 (-inf for a row that sees no key).
    """
    if backend is None:
        bid = CONTEXT  # this task's policy
    elif backend.__class__ is not str or (bid := _NAME_IDS.get(backend)) is None:  # seen before: one dict lookup
        bid = _backend_id(backend)
    if (bid != _SDPA_ID and bid != CONTEXT) or CALL_HOOKS or return_lse or _is_compiling():  # straight to the op
        if bid == CONTEXT and not _is_compiling():  # compiled: the op resolves the thread's policy at run time
            bid = _policy_id()
        if CALL_HOOKS:
            _call_hooks(q, k, v, attn_mask, is_causal, scale, bid, *CALLER.get())
        if return_lse:
            return _OP(q, k, v, attn_mask, is_causal, scale, bid, True)
        return _OP(q, k, v, attn_mask, is_causal, scale, bid)[0]
    # The task's policy, the call's plan and, when that is SDPA taking the call unchanged, SDPA: one native call.
    if bid == CONTEXT:
        scope = _scope_get()
        out = _route(q, k, v, attn_mask, is_causal, scale, CONTEXT, None if scope is None else scope.view)
    else:  # torch_sdpa named
        out = _route(q, k, v, attn_mask, is_causal, scale, bid)
    if out.__class__ is not int:
        return out
    if out >= 0:
        return _OP(q, k, v, attn_mask, is_causal, scale, out)[0]
    return sdpa_direct(q, k, v, attn_mask, is_causal, scale)  # SDPA_FROM_PYTHON
