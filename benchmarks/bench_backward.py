"""Forward + backward through attnsel (backend native) vs torch.nn.functional.scaled_dot_product_attention.

    python benchmarks/bench_backward.py [--device cpu|cuda] [--quick] [--repeats N] [--dtypes fp32,bf16] [--json PATH]

Same tensors for both, one process. Per shape x dtype: warm-up, then the two alternate for N repeats; medians of
"fwd+bwd" (a fresh forward, then backward) and of "bwd" alone (backward again through a kept graph). FLOPs follow the
FlashAttention convention: forward 4*B*H*Sq*Sk*D, backward 2.5x that, halved for causal. On CPU the numbers are
GFLOP/s, on CUDA TFLOP/s (SDPA picks its fastest backward: flash or cuDNN). Gradients are checked against SDPA's
before a number counts. Writes JSON with the environment (default benchmarks/results/backward_<device>_<host>.json).
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

from _common import load_avg, run_environment, time_pair, wall_time

# (B, H, S, D, causal); query and key length are both S.
CPU_SHAPES = [
    (2, 10, 1024, 64, False),
    (1, 24, 1024, 128, False),
    (1, 8, 2048, 64, True),
    (1, 1, 2048, 512, False),
    (1, 12, 77, 64, False),
]
CUDA_SHAPES = [
    (1, 24, 4608, 128, False),  # Flux
    (2, 10, 4096, 64, False),  # SD UNet
    (1, 32, 8192, 128, True),
    (1, 16, 4096, 256, False),
    (1, 1, 4096, 512, False),  # VAE
    (1, 12, 32760, 128, False),  # Wan
]
QUICK_SHAPES = [(1, 4, 256, 64, False), (1, 2, 256, 128, True)]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def timer(device: str):
    """Seconds per call: CUDA events on the GPU, the host clock on the CPU."""
    if device != "cuda":
        return wall_time

    def run(fn):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) * 1e-3
    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--quick", action="store_true", help="small shapes, few repeats (smoke run)")
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats per kernel (default 5 cpu / 20 cuda)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--dtypes", default=None, help="default fp32,bf16 on cpu, bf16 on cuda")
    ap.add_argument("--json", default=None, help="output JSON path")
    ap.add_argument("--note", default="", help="free text stored in the JSON")
    args = ap.parse_args()

    device = args.device
    repeats = args.repeats or (2 if args.quick else 5 if device == "cpu" else 20)
    shapes = QUICK_SHAPES if args.quick else CPU_SHAPES if device == "cpu" else CUDA_SHAPES
    dtypes = (args.dtypes or ("fp32,bf16" if device == "cpu" else "bf16")).split(",")
    host = socket.gethostname().split(".")[0] or "host"
    json_path = Path(args.json) if args.json else (
        Path(__file__).resolve().parent / "results" / f"backward_{device}_{host}.json")
    unit, unit_name = (1e-9, "GF/s") if device == "cpu" else (1e-12, "TF/s")
    env = {"device": device,
           "device_name": torch.cuda.get_device_name() if device == "cuda" else cpu_model(),
           "cpu_isa": attnsel._C.cpu_isa(), "cuda": torch.version.cuda,
           **run_environment(host, repeats, args.warmup, args.note)}
    print(f"attnsel native vs SDPA, forward+backward | {env['device_name']} | {env['threads']} threads | "
          f"torch {env['torch']} | median of {repeats}")
    header = (f"{'shape (B,H,S,D)':<22}{'causal':>7}{'dtype':>6}{'fwd+bwd ms':>12}{'sdpa ms':>10}"
              f"{'bwd ms':>10}{'sdpa bwd':>10}{'native ' + unit_name:>14}{'sdpa ' + unit_name:>12}{'speedup':>9}")
    print(header)
    print("-" * len(header))
    measure = timer(device)
    g = torch.Generator(device=device).manual_seed(0)
    rows = []
    for dname in dtypes:
        dtype = DTYPES[dname]
        for b, h, s, d, causal in shapes:
            q, k, v, dout = (torch.randn(b, h, s, d, device=device, generator=g).to(dtype) for _ in range(4))
            leaves = [t.requires_grad_() for t in (q, k, v)]

            def native():
                return attnsel.attention(*leaves, is_causal=causal, backend="native")

            def sdpa():
                return F.scaled_dot_product_attention(*leaves, is_causal=causal)

            # A wrong gradient must not produce a benchmark number.
            gn = torch.autograd.grad(native(), leaves, dout)
            gs = torch.autograd.grad(sdpa(), leaves, dout)
            err = max((a.float() - b.float()).abs().max().item() for a, b in zip(gn, gs))
            ref = max(b.float().abs().max().item() for b in gs)
            assert err <= (1e-3 if dtype == torch.float32 else 5e-2) * max(ref, 1.0), f"grads differ by {err}"
            del gn, gs

            def step(fn):
                return lambda: torch.autograd.grad(fn(), leaves, dout)

            def bwd_only(fn):
                out = fn()
                return lambda: torch.autograd.grad(out, leaves, dout, retain_graph=True)

            tn, ts = map(statistics.median, time_pair(step(native), step(sdpa), args.warmup, repeats, measure))
            bn, bs = map(statistics.median, time_pair(bwd_only(native), bwd_only(sdpa), args.warmup, repeats, measure))
            flops = 3.5 * 4.0 * b * h * s * s * d * (0.5 if causal else 1.0)
            row = {
                "shape": [b, h, s, s, d], "causal": causal, "dtype": dname,
                "native_fwd_bwd_ms": tn * 1e3, "sdpa_fwd_bwd_ms": ts * 1e3,
                "native_bwd_ms": bn * 1e3, "sdpa_bwd_ms": bs * 1e3,
                "native_fwd_bwd_flops": flops / tn, "sdpa_fwd_bwd_flops": flops / ts,
                "speedup_fwd_bwd": ts / tn, "speedup_bwd": bs / bn, "max_abs_grad_diff_vs_sdpa": err,
            }
            rows.append(row)
            print(f"{str((b, h, s, d)):<22}{str(causal):>7}{dname:>6}{tn * 1e3:>12.2f}{ts * 1e3:>10.2f}"
                  f"{bn * 1e3:>10.2f}{bs * 1e3:>10.2f}{flops / tn * unit:>14.1f}{flops / ts * unit:>12.1f}"
                  f"{ts / tn:>8.2f}x", flush=True)
            del q, k, v, dout, leaves
    summary = {}
    for dname in dtypes:
        sp = [r["speedup_fwd_bwd"] for r in rows if r["dtype"] == dname]
        sb = [r["speedup_bwd"] for r in rows if r["dtype"] == dname]
        if sp:
            summary[dname] = {"geomean_speedup_fwd_bwd": math.exp(sum(map(math.log, sp)) / len(sp)),
                              "geomean_speedup_bwd": math.exp(sum(map(math.log, sb)) / len(sb)),
                              "min_speedup_fwd_bwd": min(sp)}
    print("-" * len(header))
    for dname, sm in summary.items():
        print(f"{dname}: geomean speed-up fwd+bwd {sm['geomean_speedup_fwd_bwd']:.2f}x "
              f"(bwd alone {sm['geomean_speedup_bwd']:.2f}x), worst {sm['min_speedup_fwd_bwd']:.2f}x")
    env["load_avg_end"] = load_avg()
    json_path.parent.mkdir(parents=True, exist_ok=True)
    with open(json_path, "w") as f:
        json.dump({"environment": env, "results": rows, "summary": summary, "quick": args.quick}, f, indent=2)
    print(f"wrote {json_path}")


if __name__ == "__main__":
    main()
