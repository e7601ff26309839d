"""attnsel native CPU attention vs torch.nn.functional.scaled_dot_product_attention, same tensors, one process.

    python benchmarks/bench_cpu_attention.py [--quick] [--repeats N] [--json PATH] [--isa avx2]

For every shape x dtype: warm-up, then the two kernels alternate for N repeats (so load from other processes hits
both alike); the median time of each gives GFLOP/s (4*B*H*Sq*Sk*D, halved for causal) and the speed-up.
Writes a JSON record (default benchmarks/results/cpu_<host>.json) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import math
import socket
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F

import attnsel
from attnsel.tuning import cpu_model

from _common import load_avg, run_environment, time_pair

# (B, H, S, D, causal): query and key length are both S.
SHAPES = [
    (1, 24, 1024, 128, False),
    (1, 12, 2048, 64, False),
    (2, 10, 1024, 64, False),
    (1, 1, 1024, 512, False),
    (1, 1, 4096, 512, False),
    (1, 64, 512, 64, False),
    (1, 12, 77, 64, False),
    (1, 8, 4096, 64, True),
]
QUICK_SHAPES = [(1, 4, 256, 64, False), (1, 2, 256, 128, True), (1, 12, 77, 64, False)]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def cpu_flags() -> list[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = line.split(":", 1)[1].split()
                    return sorted(x for x in flags if x.startswith(("avx", "fma", "f16c", "amx")))
    except OSError:
        pass
    return []


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small shapes, few repeats (smoke run)")
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats per kernel (default 10, quick 3)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--isa", default=None, help="force a CPU ISA path (scalar, avx2, avx512, avx512_bf16)")
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--json", default=None, help="output JSON path")
    ap.add_argument("--note", default="", help="free text stored in the JSON (e.g. how the extension was built)")
    args = ap.parse_args()

    repeats = args.repeats or (3 if args.quick else 10)
    shapes = QUICK_SHAPES if args.quick else SHAPES
    if args.isa:
        attnsel._C.set_cpu_isa(args.isa)
    host = socket.gethostname().split(".")[0] or "host"
    json_path = Path(args.json) if args.json else Path(__file__).resolve().parent / "results" / f"cpu_{host}.json"

    env = {"isa": attnsel._C.cpu_isa(), "cpu_model": cpu_model(), "cpu_flags": cpu_flags(),
           **run_environment(host, repeats, args.warmup, args.note)}
    print(f"attnsel native CPU vs SDPA | ISA {env['isa']} | {env['threads']} threads | {env['cpu_model']} | "
          f"torch {env['torch']} | median of {repeats}")
    header = (f"{'shape (B,H,S,D)':<22}{'causal':>7}{'dtype':>6}{'native ms':>11}{'sdpa ms':>10}"
              f"{'native GF/s':>12}{'sdpa GF/s':>11}{'speedup':>9}")
    print(header)
    print("-" * len(header))

    rows = []
    g = torch.Generator().manual_seed(0)
    for dname in args.dtypes.split(","):
        dtype = DTYPES[dname]
        for b, h, s, d, causal in shapes:
            q, k, v = (torch.randn(b, h, s, d, generator=g).to(dtype) for _ in range(3))

            def run_native():
                return attnsel.attention(q, k, v, is_causal=causal, backend="native")

            def run_sdpa():
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

            # Sanity: a wrong kernel must not produce a benchmark number.
            err = (run_native().float() - run_sdpa().float()).abs().max().item()
            assert err < (1e-3 if dtype == torch.float32 else 5e-2), f"native differs from SDPA by {err}"
            tn, ts = time_pair(run_native, run_sdpa, args.warmup, repeats)
            mn, ms = statistics.median(tn), statistics.median(ts)
            flops = 4.0 * b * h * s * s * d * (0.5 if causal else 1.0)
            row = {
                "shape": [b, h, s, s, d], "causal": causal, "dtype": dname,
                "native_ms": mn * 1e3, "sdpa_ms": ms * 1e3,
                "native_min_ms": min(tn) * 1e3, "sdpa_min_ms": min(ts) * 1e3,
                "native_gflops": flops / mn * 1e-9, "sdpa_gflops": flops / ms * 1e-9,
                "speedup": ms / mn, "max_abs_diff_vs_sdpa": err,
            }
            rows.append(row)
            print(f"{str((b, h, s, d)):<22}{str(causal):>7}{dname:>6}{mn * 1e3:>11.2f}{ms * 1e3:>10.2f}"
                  f"{row['native_gflops']:>12.1f}{row['sdpa_gflops']:>11.1f}{row['speedup']:>8.2f}x", flush=True)

    summary = {}
    for dname in args.dtypes.split(","):
        sp = [r["speedup"] for r in rows if r["dtype"] == dname]
        if sp:
            summary[dname] = {"geomean_speedup": math.exp(sum(map(math.log, sp)) / len(sp)), "min_speedup": min(sp)}
    print("-" * len(header))
    for dname, sm in summary.items():
        print(f"{dname}: geomean speed-up {sm['geomean_speedup']:.2f}x, worst {sm['min_speedup']:.2f}x")
    env["load_avg_end"] = load_avg()

    json_path.parent.mkdir(parents=True, exist_ok=True)
    with open(json_path, "w") as f:
        json.dump({"environment": env, "results": rows, "summary": summary, "quick": args.quick}, f, indent=2)
    print(f"wrote {json_path}")


if __name__ == "__main__":
    main()
