"""Per-call overhead of attnsel on tiny CPU inputs (where the kernel itself costs almost nothing).

    python benchmarks/bench_dispatch.py [--quick] [--calls N] [--json PATH]

Compares, on the same (1, 1, 1, 8) fp32 tensors:
  * attnsel.attention(..., backend="native")  the Python front (name -> Backend, then the op)
  * attnsel.attention(...) with no backend       the selector picks (cached) each call
  * torch.ops.attnsel.attention(..., id)         the registered op directly (overload packet), native backend id
  * torch.ops.attnsel.attention.default(...)     the op's one overload (what attnsel.attention calls)
  * torch.nn.functional.scaled_dot_product_attention
Reports the median over several rounds of the mean time per call, in microseconds.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import attnsel
from attnsel.backends import Backend


def per_call_us(fn, calls: int, rounds: int) -> tuple[float, float]:
    for _ in range(min(calls, 200)):
        fn()
    samples = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        samples.append((time.perf_counter() - t0) / calls * 1e6)
    return statistics.median(samples), min(samples)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--calls", type=int, default=None, help="calls per round (default 2000, quick 200)")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    calls = args.calls or (200 if args.quick else 2000)

    q = torch.randn(1, 1, 1, 8)
    k = torch.randn(1, 1, 1, 8)
    v = torch.randn(1, 1, 1, 8)
    native_id = int(Backend.NATIVE)
    op = torch.ops.attnsel.attention

    # All four must agree before their timings mean anything.
    ref = F.scaled_dot_product_attention(q, k, v)
    for out in (attnsel.attention(q, k, v, backend="native"), op(q, k, v, None, False, None, native_id)):
        assert torch.allclose(out, ref, atol=1e-6), (out, ref)

    cases = {
        "attnsel.attention(backend='native')": lambda: attnsel.attention(q, k, v, backend="native"),
        "attnsel.attention() (auto select)": lambda: attnsel.attention(q, k, v),
        "torch.ops.attnsel.attention(native id)": lambda: op(q, k, v, None, False, None, native_id),
        "torch.ops.attnsel.attention.default(native id)": lambda: op.default(q, k, v, None, False, None, native_id),
        "F.scaled_dot_product_attention": lambda: F.scaled_dot_product_attention(q, k, v),
    }
    print(f"per-call time on (1,1,1,8) fp32 | {torch.get_num_threads()} threads | ISA {attnsel._C.cpu_isa()} | "
          f"{calls} calls x {args.rounds} rounds")
    results = {}
    for name, fn in cases.items():
        med, best = per_call_us(fn, calls, args.rounds)
        results[name] = {"median_us": med, "best_us": best}
        print(f"  {name:<48} {med:8.2f} us  (best {best:.2f})")
    base = results["torch.ops.attnsel.attention(native id)"]["median_us"]
    front = results["attnsel.attention(backend='native')"]["median_us"]
    auto = results["attnsel.attention() (auto select)"]["median_us"]
    print(f"Python front overhead over the op: {front - base:+.2f} us per call (explicit backend), "
          f"{auto - base:+.2f} us (auto select)")

    host = socket.gethostname().split(".")[0] or "host"
    path = Path(args.json) if args.json else Path(__file__).resolve().parent / "results" / f"dispatch_{host}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        json.dump({"environment": {"threads": torch.get_num_threads(), "torch": torch.__version__,
                                   "isa": attnsel._C.cpu_isa(), "calls": calls, "rounds": args.rounds,
                                   "load_avg": os.getloadavg()},
                   "results": results}, f, indent=2)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
