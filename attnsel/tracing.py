"""`attnsel.trace()`: record what every attention call actually ran on, and how long it took.

(This module is `attnsel.tracing`, so that the name `attnsel.trace` stays the function.)

    with attnsel.trace() as t:
        pipe(prompt)
    print(t.summary())          # per (component, role, backend): calls and total milliseconds

A trace sees the calls of every thread while it is open (process-wide, like a profiler); traces nest, and each open
trace records every call. Callers (attnsel.nn.Attention, the diffusers adapter) check `ACTIVE` -- an empty tuple
when no trace is open -- before doing anything, so tracing costs one attribute read when unused. Times are a CUDA
event pair on GPUs (read when the trace is inspected, so tracing adds no synchronisation) and `perf_counter` around
the call on CPU, where the op is synchronous.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

__all__ = ["ACTIVE", "CallRecord", "Trace", "run", "trace"]

# The traces open now, innermost last. Replaced (never mutated) under _lock, so readers need no lock.
ACTIVE: tuple["Trace", ...] = ()
_lock = threading.Lock()


@dataclass
class CallRecord:
    """One attention call: where it came from, what ran it, on which inputs, and its time."""

    component: str | None
    role: str | None
    backend: str  # the backend that ran the call (for automatic selection: the selector's answer)
    q_shape: tuple[int, ...]
    k_shape: tuple[int, ...]
    v_shape: tuple[int, ...]
    dtype: str
    device: str
    masked: bool
    causal: bool
    _seconds: float | None = None
    _events: tuple[Any, Any] | None = field(default=None, repr=False)

    @property
    def milliseconds(self) -> float:
        if self._seconds is None:  # a CUDA event pair: wait for the end event once, then keep the number
            start, end = self._events
            end.synchronize()
            self._seconds = start.elapsed_time(end) / 1000.0
            self._events = None
        return self._seconds * 1000.0


class Trace:
    """Records attention calls while open (a context manager); `summary()` tabulates them."""

    def __init__(self) -> None:
        self._records: list[CallRecord] = []
        self._records_lock = threading.Lock()
        self._open = False

    def __enter__(self) -> "Trace":
        global ACTIVE
        with _lock:
            if self._open:
                raise ValueError("attnsel.trace: this trace is already open")
            self._open = True
            ACTIVE = ACTIVE + (self,)
        return self

    def __exit__(self, *exc) -> None:
        global ACTIVE
        with _lock:
            self._open = False
            ACTIVE = tuple(t for t in ACTIVE if t is not self)

    def _add(self, record: CallRecord) -> None:
        with self._records_lock:
            self._records.append(record)

    @property
    def records(self) -> list[CallRecord]:
        """Every call recorded so far, in call order."""
        with self._records_lock:
            return list(self._records)

    def rows(self) -> list[dict]:
        """Per (component, role, backend), in order of first call: {component, role, backend, calls, total_ms}."""
        table: dict[tuple, dict] = {}
        for r in self.records:
            key = (r.component, r.role, r.backend)
            row = table.setdefault(key, {"component": r.component, "role": r.role, "backend": r.backend,
                                         "calls": 0, "total_ms": 0.0})
            row["calls"] += 1
            row["total_ms"] += r.milliseconds
        return list(table.values())

    def summary(self) -> str:
        """The table of `rows()` as text (one line per component, role and backend)."""
        rows = self.rows()
        if not rows:
            return "attention calls: none recorded"
        header = ("component", "role", "backend", "calls", "total ms")
        cells = [(r["component"] or "-", r["role"] or "-", r["backend"], str(r["calls"]), f"{r['total_ms']:.2f}")
                 for r in rows]
        widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(header)]

        def line(values) -> str:
            left = "  ".join(f"{v:<{w}}" for v, w in zip(values[:3], widths[:3]))
            right = "  ".join(f"{v:>{w}}" for v, w in zip(values[3:], widths[3:]))
            return f"  {left}  {right}"

        return "\n".join(["attention calls:", line(header), *(line(c) for c in cells)])

    def __str__(self) -> str:
        return self.summary()


def trace() -> Trace:
    """A new trace; use it as a context manager: `with attnsel.trace() as t: ...; print(t.summary())`."""
    return Trace()


def _backend_that_runs(backend, q, k, v, attn_mask, is_causal) -> str:
    from .backends import to_backend

    if backend is not None:
        return str(to_backend(backend))
    from .selection import explain_call  # a policy of `auto` (or the task's): the planner's choice for this call

    return str(explain_call(q, k, v, attn_mask, is_causal).backend)


def run(component: str | None, role: str | None, named_backend, fn: Callable, q: torch.Tensor, k: torch.Tensor,
        v: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False, **kwargs):
    """`fn(q, k, v, attn_mask=..., is_causal=..., **kwargs)`, timed and recorded in every open trace.

    `named_backend` is the caller's named backend, or None where the call is planned (`auto`, or the task's policy): the
    record then names the planner's choice. Call this only when `ACTIVE` is non-empty (the caller's cheap check).
    """
    traces = ACTIVE
    record = CallRecord(component, role, _backend_that_runs(named_backend, q, k, v, attn_mask, is_causal),
                        tuple(q.shape), tuple(k.shape), tuple(v.shape), str(q.dtype).removeprefix("torch."),
                        str(q.device), attn_mask is not None, bool(is_causal))
    if q.is_cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = fn(q, k, v, attn_mask=attn_mask, is_causal=is_causal, **kwargs)
        end.record()
        record._events = (start, end)
    else:
        begin = time.perf_counter()
        out = fn(q, k, v, attn_mask=attn_mask, is_causal=is_causal, **kwargs)
        record._seconds = time.perf_counter() - begin
    for t in traces:
        t._add(record)
    return out
