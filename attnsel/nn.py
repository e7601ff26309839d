"""`attnsel.nn.Attention`: an attention layer that picks its backend once, when it is built."""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from . import distributed
from . import tracing as _tracing
from .backends import Backend
from .ops import _OP, _SDPA_ID, AUTO, CALL_HOOKS, _call_hooks, _is_compiling, _route, sdpa_direct
from .selection import Explanation, explain_attn_backend


class Attention(nn.Module):
    """Scaled dot-product attention over (B, H, S, D) tensors on the backend chosen at construction.

    The policy is decided when the layer is built: explicit `backend` > forced > component context for the layer's
    `role` (`self` / `cross`) > the component's > --attention-backend > `auto`. `.policy` holds a named backend, or
    None for `auto`, which plans every call (the fastest backend that accepts it); `.selection` says why, and
    `.backend` is the named backend or, for `auto`, its choice for a one-token call. The forward path carries the
    policy explicitly, so it is cheap and torch.compile-friendly.
    """

    def __init__(
        self,
        num_heads: int,
        head_dim: int,
        *,
        num_kv_heads: int | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        supported_backends: Iterable[str | Backend] | None = None,
        backend: str | Backend | None = None,
        scale: float | None = None,
        role: str | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("num_heads", num_heads), ("head_dim", head_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        kv = num_heads if num_kv_heads is None else num_kv_heads
        if isinstance(kv, bool) or not isinstance(kv, int) or kv <= 0 or num_heads % kv:
            raise ValueError(f"num_kv_heads must be a positive divisor of num_heads ({num_heads}), got {kv!r}")
        self.num_heads, self.head_dim, self.num_kv_heads, self.scale = num_heads, head_dim, kv, scale
        self.role = role
        self.selection: Explanation = explain_attn_backend(
            head_dim, dtype, device, None if supported_backends is None else list(supported_backends), backend, role
        )
        self.backend: Backend = self.selection.backend
        # `auto` plans each call, except within a supported set (the op cannot carry one): then the build-time pick.
        auto = self.selection.source == "auto" and supported_backends is None
        self.policy: Backend | None = None if auto else self.backend
        self._op_backend = AUTO if self.policy is None else int(self.policy)

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
    ) -> torch.Tensor:
        if q.shape[-1] != self.head_dim:
            raise ValueError(f"attnsel.nn.Attention: built for head_dim {self.head_dim}, got q of shape {tuple(q.shape)}")
        if (sp := distributed.active()) is not None:  # inside attnsel.distributed.sequence_parallel(...)
            return sp.layer_attention(self, q, k, v, attn_mask, is_causal)
        if CALL_HOOKS:
            _call_hooks(q, k, v, attn_mask, is_causal, self.scale, self._op_backend, self.selection.component,
                        self.role)
        if _tracing.ACTIVE:  # an attnsel.trace() is open: record this call
            return _tracing.run(self.selection.component, self.role, self.policy, self._attend, q, k, v,
                                attn_mask=attn_mask, is_causal=is_causal)
        bid = self._op_backend
        if (bid == AUTO or bid == _SDPA_ID) and not _is_compiling():  # the plan, and SDPA from there if it says so
            out = _route(q, k, v, attn_mask, is_causal, self.scale, bid)
            if out.__class__ is not int:
                return out
            if out < 0:  # SDPA_FROM_PYTHON
                return sdpa_direct(q, k, v, attn_mask, is_causal, self.scale)
            bid = out
        return _OP(q, k, v, attn_mask, is_causal, self.scale, bid)[0]

    def _attend(self, q, k, v, attn_mask=None, is_causal=False):
        return _OP(q, k, v, attn_mask, is_causal, self.scale, self._op_backend)[0]

    def extra_repr(self) -> str:
        return (
            f"num_heads={self.num_heads}, head_dim={self.head_dim}, num_kv_heads={self.num_kv_heads}, "
            f"policy={'auto' if self.policy is None else self.policy.name.lower()} ({self.selection.source})"
            + (f", role={self.role}" if self.role else "")
        )
