"""Backend selection from Python: passes this task's component view to the native selector."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch

from . import _C
from .backends import Backend, to_backend
from .context import ROLES, current_scope, native_view

DTYPE_NAMES = {
    torch.float32: "float32",
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
    "float32": "float32",
    "fp32": "float32",
    "float": "float32",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
}
DEVICE_TYPES = ("cpu", "cuda")


def cuda_unavailable_reason() -> str:
    """Why nothing can run on CUDA here ("" when a GPU is usable): the reason bridges and the pipeline report."""
    if torch.cuda.is_available():
        return ""
    return "this PyTorch build has no CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"


@dataclass(frozen=True)
class Explanation:
    """Why a layer or a call got its backend: the level that chose it (`source`), the component and every reason.

    For a layer (policy), source "auto" means the layer plans per call; `backend` is then the choice for a one-token
    call. For a call (plan), `measured` maps each backend the tuning table timed for the call's bucket to its
    milliseconds (None when the table has no entry).
    """

    backend: Backend
    source: str  # "explicit" | "forced" | "component" | "global" | "auto"
    component: str | None
    reasons: tuple[str, ...]
    measured: dict[Backend, float] | None = None

    def __str__(self) -> str:
        where = f" for component {self.component!r}" if self.component else ""
        return f"{self.backend.name.lower()} ({self.source}{where}): " + "; ".join(self.reasons)


def _dtype_name(dtype: object) -> str:
    name = DTYPE_NAMES.get(dtype) if isinstance(dtype, (torch.dtype, str)) else None
    if name is None:
        raise ValueError(f"dtype must be one of torch.float32, torch.float16, torch.bfloat16, got {dtype!r}")
    return name


def _device_type(device: object) -> str:
    try:
        kind = torch.device(device).type  # type: ignore[arg-type]
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device must be a torch device or one of {', '.join(DEVICE_TYPES)}, got {device!r}") from exc
    if kind not in DEVICE_TYPES:
        raise ValueError(f"attnsel selects backends for {', '.join(DEVICE_TYPES)} devices, got {kind!r}")
    return kind


def _role_name(role: object) -> str | None:
    if role is None:
        return None
    if role not in ROLES:
        raise ValueError(f"role must be one of {list(ROLES)} or None, got {role!r}")
    return role  # type: ignore[return-value]


def explain_attn_backend(
    head_size: int,
    dtype: torch.dtype | str,
    device: torch.device | str = "cpu",
    supported: Iterable[str | Backend] | None = None,
    selected: str | Backend | None = None,
    role: str | None = None,
) -> Explanation:
    """A layer's policy (explicit > forced > component.role > component > global > auto) and why."""
    if isinstance(head_size, bool) or not isinstance(head_size, int) or head_size <= 0:
        raise ValueError(f"head_size must be a positive int, got {head_size!r}")
    supported_ids = None if supported is None else [int(to_backend(b)) for b in supported]
    if supported_ids is not None and not supported_ids:
        raise ValueError("supported must name at least one backend (or be None for all)")
    selected_id = None if selected is None else int(to_backend(selected))
    backend_id, source, component, reasons, _ = _C.select(
        head_size, _dtype_name(dtype), _device_type(device), supported_ids, selected_id, native_view(current_scope()),
        _role_name(role),
    )
    return Explanation(Backend(backend_id), source, component or None, tuple(reasons))


def get_attn_backend(
    head_size: int,
    dtype: torch.dtype | str,
    device: torch.device | str = "cpu",
    supported: Iterable[str | Backend] | None = None,
    selected: str | Backend | None = None,
    role: str | None = None,
) -> Backend:
    """The backend a layer with this head size, dtype and device should use here and now."""
    return explain_attn_backend(head_size, dtype, device, supported, selected, role).backend


def call_signature(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    return_lse: bool = False,
) -> "_C.CallSignature":
    """The planner's view of a call (what `auto` and the tuning table key on). Raises ValueError where the op would."""
    return _C.call_signature(q, k, v, attn_mask, bool(is_causal), bool(return_lse))


def explain_call(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    backend: str | Backend | None = None,
    return_lse: bool = False,
) -> Explanation:
    """The plan for this call: which backend `attnsel.attention` would run, the level that chose it, every reason,
    and what the tuning table measured for the call's bucket. Raises ValueError where the call would."""
    sig = call_signature(q, k, v, attn_mask, is_causal, return_lse)
    backend_id = None if backend is None else int(to_backend(backend))
    chosen, source, component, reasons, _ = _C.explain_call(sig, backend_id, native_view(current_scope()))
    entry = _C.tuning_entry(sig.bucket())
    measured = None if entry is None else {Backend(i): ms for i, ms in entry}
    return Explanation(Backend(chosen), source, component or None, tuple(reasons), measured)
