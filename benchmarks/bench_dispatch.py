"""Per-call host overhead of attnsel on tiny inputs (where the kernel itself costs almost nothing).

    python benchmarks/bench_dispatch.py [--device cpu|cuda] [--quick] [--calls N] [--json PATH]

Compares, on the same tiny tensors ((1, 1, 1, 8) fp32 on CPU; (1, 1, 1, 64) bf16 on CUDA):
  * attnsel.attention(..., backend=B)            the Python front with a named backend (B = what auto picks here)
  * attnsel.attention(...) with no backend       the policy (forced > component > global > auto), then the plan
  * attnsel.nn.Attention layer (policy auto)     what a model's layers do
  * torch.ops.attnsel.attention.default(..., id) the op's one overload with the backend id
  * attnsel.attention(..., backend="torch_sdpa") vs F.scaled_dot_product_attention: our route vs the backend direct
Reports the median over several rounds of the mean time per call, in microseconds (CUDA: queued calls, one sync
per round, so host cost is what is measured); the cases take turns within each round, and each comparison is the
median over rounds of the difference within a round. From Python, a call whose
plan is `torch_sdpa` (named, a layer's policy, or auto's plan) goes to ATen's SDPA within the one native call that
plans it (_C.route) when the op would pass it unchanged; other calls go through the op.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import attnsel


def per_call_us(cases: dict, calls: int, rounds: int, sync) -> dict:
    """{case: [mean time per call in each round]}. The cases take turns within each round (each round starting one
    case later), so drift in the machine's speed touches them alike. A case is (fn, no_grad): no_grad cases run the
    whole loop inside torch.no_grad()."""
    def timed(fn, no_grad):
        with torch.no_grad() if no_grad else contextlib.nullcontext():
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            sync()
            return (time.perf_counter() - t0) / calls * 1e6

    for fn, no_grad in cases.values():
        for _ in range(min(calls, 200)):
            fn()
    sync()
    samples = {name: [] for name in cases}
    order = list(cases.items())
    for r in range(rounds):
        for name, (fn, no_grad) in order[r % len(order):] + order[:r % len(order)]:
            samples[name].append(timed(fn, no_grad))
    return samples


def paired_us(samples: dict, case: str, baseline: str) -> float:
    """Median over rounds of case - baseline within the same round: a slow phase of the machine that spans a
    round cancels out (a difference of the two medians would mix rounds)."""
    return statistics.median(a - b for a, b in zip(samples[case], samples[baseline]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--calls", type=int, default=None, help="calls per round (default 2000, quick 200)")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--json", default=None)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = ap.parse_args()
    calls = args.calls or (200 if args.quick else 1000)

    cuda = args.device == "cuda"
    dtype, dim = (torch.bfloat16, 64) if cuda else (torch.float32, 8)
    q, k, v = (torch.randn(1, 1, 1, dim, device=args.device, dtype=dtype) for _ in range(3))
    picked = attnsel.explain_call(q, k, v).backend  # what auto runs for this call
    bid = int(picked)
    name = str(picked)
    op = torch.ops.attnsel.attention.default
    layer = attnsel.nn.Attention(1, dim, dtype=dtype, device=args.device)
    assert layer.policy is None  # auto

    # All must agree before their timings mean anything.
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    for out in (attnsel.attention(q, k, v, backend=name), attnsel.attention(q, k, v), op(q, k, v, None, False, None, bid)[0],
                layer(q, k, v), attnsel.attention(q, k, v, backend="torch_sdpa")):
        assert torch.allclose(out.float(), ref, atol=2e-2 if cuda else 1e-6), (out, ref)

    sync = torch.cuda.synchronize if cuda else (lambda: None)

    cases = {
        f"attnsel.attention(backend='{name}')": lambda: attnsel.attention(q, k, v, backend=name),
        "attnsel.attention() (auto)": lambda: attnsel.attention(q, k, v),
        "attnsel.nn.Attention (policy auto)": lambda: layer(q, k, v),
        f"op.default({name} id)": lambda: op(q, k, v, None, False, None, bid),
        "attnsel.attention(backend='torch_sdpa')": lambda: attnsel.attention(q, k, v, backend="torch_sdpa"),
        "F.scaled_dot_product_attention": lambda: F.scaled_dot_product_attention(q, k, v),
    }

    # Under torch.no_grad() (how pipelines run inference), timed with the whole loop inside the context.
    no_grad_cases = ("attnsel.attention(backend='torch_sdpa')", "F.scaled_dot_product_attention")
    timed_cases = {case: (fn, False) for case, fn in cases.items()}
    timed_cases.update({case + " [no_grad]": (cases[case], True) for case in no_grad_cases})
    print(f"per-call time on (1,1,1,{dim}) {str(dtype).replace('torch.', '')} on {args.device} | "
          f"{torch.get_num_threads()} threads | ISA {attnsel._C.cpu_isa()} | {calls} calls x {args.rounds} rounds")
    samples = per_call_us(timed_cases, calls, args.rounds, sync)
    results = {}
    for case, times in samples.items():
        results[case] = {"median_us": statistics.median(times), "best_us": min(times)}
        print(f"  {case:<48} {results[case]['median_us']:8.2f} us  (best {results[case]['best_us']:.2f})")
    explicit = f"attnsel.attention(backend='{name}')"
    route, direct = "attnsel.attention(backend='torch_sdpa')", "F.scaled_dot_product_attention"
    summary = {"auto_minus_explicit_us": paired_us(samples, "attnsel.attention() (auto)", explicit),
               "route_minus_direct_sdpa_us": paired_us(samples, route, direct),
               "route_minus_direct_sdpa_no_grad_us": paired_us(samples, route + " [no_grad]", direct + " [no_grad]")}
    print(f"medians of the per-round differences: auto vs the same backend named: "
          f"{summary['auto_minus_explicit_us']:+.2f} us per call; our route to torch_sdpa vs SDPA direct: "
          f"{summary['route_minus_direct_sdpa_us']:+.2f} us per call "
          f"({summary['route_minus_direct_sdpa_no_grad_us']:+.2f} us under torch.no_grad())")

    host = socket.gethostname().split(".")[0] or "host"
    default = f"dispatch_{host}.json" if not cuda else "dispatch_cuda.json"
    path = Path(args.json) if args.json else Path(__file__).resolve().parent / "results" / default
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        env = {"threads": torch.get_num_threads(), "torch": torch.__version__, "isa": attnsel._C.cpu_isa(),
               "device": torch.cuda.get_device_name() if cuda else "cpu", "calls": calls, "rounds": args.rounds,
               "load_avg": os.getloadavg(), "auto_backend": name}
        json.dump({"environment": env, "results": results, "summary": summary}, f, indent=2)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
