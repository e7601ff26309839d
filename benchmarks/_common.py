"""Pieces the native-vs-SDPA benchmarks share: alternating timing and the environment block of their JSON."""

from __future__ import annotations

import os
import platform
import time

import torch


def wall_time(fn) -> float:
    """Seconds one call of fn takes on the host clock."""
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def time_pair(fa, fb, warmup: int, repeats: int, measure=wall_time) -> tuple[list[float], list[float]]:
    """Per-call times (seconds) of fa and fb over `repeats` rounds after `warmup` calls of each. Which goes first
    alternates, so load from other processes hits both alike and neither always runs right after the other."""
    for _ in range(warmup):
        fa()
        fb()
    ta, tb = [], []
    for i in range(repeats):
        for f in ((fa, fb) if i % 2 == 0 else (fb, fa)):
            (ta if f is fa else tb).append(measure(f))
    return ta, tb


def load_avg():
    return os.getloadavg() if hasattr(os, "getloadavg") else None


def run_environment(host: str, repeats: int, warmup: int, note: str | None) -> dict:
    """The keys every such benchmark's JSON records; each script adds its device's own."""
    return {
        "threads": torch.get_num_threads(),
        "nproc": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "host": host,
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "repeats": repeats,
        "warmup": warmup,
        "statistic": "median",
        "load_avg_start": load_avg(),
        "note": note,
    }
