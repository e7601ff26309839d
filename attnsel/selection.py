"""Backend selection from Python: passes this task's component view to the native selector."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch

from . import _C
from .backends import Backend, to_backend
from .context import current_scope, native_view

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
    """Why a layer got its backend: the level that chose it (`source`), the component and every reason."""

    backend: Backend
    source: str  # "explicit" | "forced" | "component" | "global" | "auto"
    component: str | None
    reasons: tuple[str, ...]

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


def explain_attn_backend(
    head_size: int,
    dtype: torch.dtype | str,
    device: torch.device | str = "cpu",
    supported: Iterable[str | Backend] | None = None,
    selected: str | Backend | None = None,
) -> Explanation:
    """Select a backend (explicit > forced > component > global > auto) and say why."""
    if isinstance(head_size, bool) or not isinstance(head_size, int) or head_size <= 0:
        raise ValueError(f"head_size must be a positive int, got {head_size!r}")
    supported_ids = None if supported is None else [int(to_backend(b)) for b in supported]
    if supported_ids is not None and not supported_ids:
        raise ValueError("supported must name at least one backend (or be None for all)")
    selected_id = None if selected is None else int(to_backend(selected))
    backend_id, source, component, reasons = _C.select(
        head_size, _dtype_name(dtype), _device_type(device), supported_ids, selected_id, native_view(current_scope())
    )
    return Explanation(Backend(backend_id), source, component or None, tuple(reasons))


def get_attn_backend(
    head_size: int,
    dtype: torch.dtype | str,
    device: torch.device | str = "cpu",
    supported: Iterable[str | Backend] | None = None,
    selected: str | Backend | None = None,
) -> Backend:
    """The backend a layer with this head size, dtype and device should use here and now."""
    return explain_attn_backend(head_size, dtype, device, supported, selected).backend
