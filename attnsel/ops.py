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
_plan_route = _C.plan_route
# Routes from _C.plan_route besides a backend id: torch_sdpa, and the op would pass the call to PyTorch's SDPA
# unchanged, so the front calls SDPA itself (skipping the op's boxed call, ~3 us on a tiny call); GQA: grouped-query.
SDPA_DIRECT, SDPA_DIRECT_GQA = -3, -4


def sdpa_direct(route, q, k, v, attn_mask, is_causal, scale):
    """Run a call that _C.plan_route sent to SDPA directly (route SDPA_DIRECT or SDPA_DIRECT_GQA): the op's
    torch_sdpa kernel with the same arguments, so the same result, autograd and errors (the op does not wrap SDPA's)."""
    # Each argument passed costs SDPA's parser ~0.2 us: pass only what is set.
    if route == SDPA_DIRECT_GQA:
        return _sdpa(q, k, v, attn_mask, 0.0, is_causal, scale=scale, enable_gqa=True)
    if attn_mask is not None:
        return _sdpa(q, k, v, attn_mask) if scale is None else _sdpa(q, k, v, attn_mask, scale=scale)
    if scale is None:
        return _sdpa(q, k, v, is_causal=True) if is_causal else _sdpa(q, k, v)
    return _sdpa(q, k, v, is_causal=is_causal, scale=scale)


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
    if bid == CONTEXT:  # the task's policy and the call's plan in one native call
        scope = _scope_get()
        route = _plan_route(q, k, v, attn_mask, is_causal, CONTEXT, None if scope is None else scope.view)
    else:  # torch_sdpa named: checked, and whether SDPA can take the call directly
        route = _plan_route(q, k, v, attn_mask, is_causal, bid)
    if route >= 0:
        return _OP(q, k, v, attn_mask, is_causal, scale, route)[0]
    if route == SDPA_DIRECT and attn_mask is None and scale is None and not is_causal:
        return _sdpa(q, k, v)  # the common case without sdpa_direct's frame
    return sdpa_direct(route, q, k, v, attn_mask, is_causal, scale)
