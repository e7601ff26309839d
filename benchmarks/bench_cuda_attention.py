"""GPU benchmark: attnsel's native CUDA attention vs PyTorch SDPA backends (and flash-attn / SageAttention
when importable), one GPU, one run.

  python benchmarks/bench_cuda_attention.py --impl attnsel --out benchmarks/results/cuda_h100.json
  python benchmarks/bench_cuda_attention.py --impl dev     # tools/cuda_dev ctypes build, no extension

Timing: per shape, every backend warmed up (>= 200 ms), then timed in --reps (>= 20) interleaved rounds (each in a
seeded shuffled order) with CUDA events around each call, calls queued back to back (host launch work overlaps the
GPU); the median per backend ("ms"), with the rounds' quartiles ("ms_quartiles") to show the spread, and the median
host time per call ("host_us", the caller's time in the call).
TFLOP/s = 4*B*H*Sq*Sk*D / time, halved for causal; masked shapes count the dense work too.
Masks: "keypad" is a boolean (B, 1, 1, Sk) key-padding mask (batch b keeps its first lengths[b] keys, the rest
padding, as text encoders and cross-attention send); "bool" a full (B, H, Sq, Sk) boolean mask (random, 80% kept);
"additive" a full (B, H, Sq, Sk) float bias in q's dtype (standard normal).
--gemm also measures the dense bf16 GEMM ceiling (torch.matmul 8192^3), recorded as "gemm_bf16_tflops".
--graph N also times native, PyTorch's flash and cuDNN kernels (and flash-attn / SageAttention when importable)
replaying a CUDA graph of N calls: the GPU's time without the host's launch work ("graph_ms" / "graph_tflops",
"graph_ms_quartiles").
Calls of tens of microseconds (T5) are host-bound when run eagerly.
"""
import argparse
import json
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

SHAPES = [  # name, (B, H, Sq, Sk, D), causal, mask
    ("flux", (1, 24, 4608, 4608, 128), False, None),
    ("wan-1.3b", (1, 12, 32760, 32760, 128), False, None),
    ("wan-14b", (1, 40, 32760, 32760, 128), False, None),
    ("wan-cross", (1, 40, 32760, 512, 128), False, None),
    ("dit-8x1k", (8, 24, 1024, 1024, 128), False, None),
    ("sd-unet", (2, 10, 4096, 4096, 64), False, None),
    ("sd3-joint", (1, 38, 4429, 4429, 64), False, None),
    ("t5-xxl", (1, 64, 512, 512, 64), False, None),
    ("pixart-72", (2, 16, 4096, 4096, 72), False, None),
    ("hunyuan-88", (2, 16, 4096, 4096, 88), False, None),
    ("lumina-96", (2, 24, 4096, 4096, 96), False, None),
    ("hdim-80", (2, 16, 4096, 4096, 80), False, None),  # the padded-80 kernel at its own size
    ("hd-256", (1, 8, 8192, 8192, 256), False, None),
    ("vae-4k", (1, 1, 4096, 4096, 512), False, None),
    ("vae-12k", (1, 1, 12544, 12544, 512), False, None),
    ("vae-16k", (1, 1, 16384, 16384, 512), False, None),
    ("causal-8k", (1, 32, 8192, 8192, 128), True, None),
    # masked: key padding on text-encoder / cross-attention shapes, full boolean masks
    ("t5-keypad", (4, 64, 512, 512, 64), False, "keypad"),
    ("wan-cross-keypad", (1, 40, 32760, 512, 128), False, "keypad"),
    ("pixart-cross-keypad", (2, 16, 4096, 300, 72), False, "keypad"),
    ("flux-keypad", (2, 24, 4608, 4608, 128), False, "keypad"),
    ("bool-2k-128", (2, 16, 2048, 2048, 128), False, "bool"),
    ("bool-4k-64", (1, 24, 4096, 4096, 64), False, "bool"),
    ("additive-2k-128", (2, 16, 2048, 2048, 128), False, "additive"),
    ("additive-4k-64", (1, 24, 4096, 4096, 64), False, "additive"),
]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
MATH_MAX_BYTES = 12 << 30  # the math path materialises fp32 scores (and their softmax)


def native_fn(impl, variant):
    if impl == "attnsel":
        import attnsel

        return lambda q, k, v, causal, mask=None: attnsel.attention(q, k, v, attn_mask=mask, is_causal=causal,
                                                                     backend="native")
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tools", "cuda_dev"))
    import devattn

    def dev(q, k, v, causal, mask=None):
        return devattn.attention(q, k, v, attn_mask=mask, is_causal=causal, variant=variant)

    return dev


def sdpa_fn(backend):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    b = {"sdpa_flash": SDPBackend.FLASH_ATTENTION, "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION,
         "sdpa_efficient": SDPBackend.EFFICIENT_ATTENTION, "sdpa_math": SDPBackend.MATH}[backend]

    def run(q, k, v, causal, mask=None):
        with sdpa_kernel([b]):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)

    return run


def optional_fns():
    fns, missing = {}, {}
    try:
        import flash_attn  # noqa: F401
        from flash_attn import flash_attn_func

        name = "fa2" if flash_attn.__version__.startswith("2") else "fa"
        fns[name] = lambda q, k, v, causal, mask=None: flash_attn_func(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=causal).transpose(1, 2)
    except Exception as e:  # not installed here
        missing["fa2"] = f"flash_attn not importable: {type(e).__name__}: {e}"
    try:
        from sageattention import sageattn

        fns["sage_attn"] = lambda q, k, v, causal, mask=None: sageattn(q, k, v, tensor_layout="HND", is_causal=causal)
    except Exception as e:
        missing["sage_attn"] = f"sageattention not importable: {type(e).__name__}: {e}"
    return fns, missing


def time_interleaved(fns, args, reps, warmup_ms, host_us=None):
    """Per-call ms of each backend, one sample per round (timed_rounds, which also fills host_us). Backends are timed
    in interleaved rounds, each in a fresh order, so clock or thermal drift and what a neighbour leaves touch them
    alike; calls are queued back to back with CUDA events around each and one sync at the end, so host launch work overlaps
    the GPU as in a real pipeline."""
    for fn in fns.values():  # warm-up: >= 3 calls and >= warmup_ms of wall time per backend
        t0, n = time.perf_counter(), 0
        while n < 3 or (time.perf_counter() - t0) * 1e3 < warmup_ms:
            fn(*args)
            n += 1
            if n % 4 == 0:
                torch.cuda.synchronize()
    return timed_rounds({name: (lambda fn=fn: fn(*args)) for name, fn in fns.items()}, reps, host_us=host_us)


def timed_rounds(runs, reps, calls_per_run=1, host_us=None):
    """ms per call of each zero-argument run in every round (sorted), timed in interleaved rounds with CUDA events
    around each run; with a dict as host_us, also each run's median host time per call in microseconds (the time
    its launch work takes; at most the GPU time when the GPU is the bound).
    Each round takes a fresh seeded shuffle of the runs, so each follows every other about equally often. A fixed
    cycle (even one started one place later each round) gives each run the same predecessor every round: after
    SDPA's math path, whose several launches leave the GPU idle on short calls, the next run's own launch work is
    timed with it, and after its score matrices the next run reads its inputs from a swept L2."""
    torch.cuda.synchronize()
    events = {name: [] for name in runs}
    host = {name: [] for name in runs}
    order = list(runs)
    rng = random.Random(0)
    for _ in range(reps):
        rng.shuffle(order)
        for name in order:
            run = runs[name]
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            t0 = time.perf_counter()
            run()
            host[name].append((time.perf_counter() - t0) * 1e6 / calls_per_run)
            b.record()
            events[name].append((a, b))
    torch.cuda.synchronize()
    if host_us is not None:
        host_us.update({name: statistics.median(h) for name, h in host.items()})
    return {name: sorted(a.elapsed_time(b) / calls_per_run for a, b in ev) for name, ev in events.items()}


def quartiles(samples):
    """(first quartile, median, third quartile) of the rounds' ms samples."""
    if len(samples) < 2:  # BENCH_ALLOW_FEW_REPS with one round
        return samples[0], samples[0], samples[0]
    q1, med, q3 = statistics.quantiles(samples, n=4, method="inclusive")
    return q1, med, q3


def make_mask(kind, B, H, Sq, Sk, gen, dtype=torch.bfloat16):
    if kind is None:
        return None
    if kind == "keypad":  # batch b keeps its first lengths[b] keys (full length, then shorter prompts)
        lengths = torch.tensor([Sk if b == 0 else max(1, Sk * (4 - b % 4) // 5) for b in range(B)], device="cuda")
        return (torch.arange(Sk, device="cuda")[None, :] < lengths[:, None])[:, None, None, :]
    if kind == "bool":
        return torch.rand((B, H, Sq, Sk), generator=gen, device="cuda") < 0.8
    if kind == "additive":  # a float bias in q's dtype (e.g. relative-position terms)
        return torch.randn((B, H, Sq, Sk), generator=gen, device="cuda").to(dtype)
    raise ValueError(kind)


def gemm_ceiling(reps=20):
    """Dense bf16 torch.matmul 8192^3 TFLOP/s (median): the H200's practical tensor-core ceiling."""
    n = 8192
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    ms = statistics.median(time_interleaved({"mm": lambda x, y: x @ y}, (a, b), reps, 300.0)["mm"])
    return 2 * n**3 / ms / 1e9


def env_info():
    info = dict(gpu=torch.cuda.get_device_name(), capability=".".join(map(str, torch.cuda.get_device_capability())),
                torch=torch.__version__, cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
                python=platform.python_version())
    try:
        info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                        capture_output=True, text=True, timeout=20).stdout.strip()
    except Exception as e:
        info["driver"] = f"unknown ({e})"
    return info


GRAPH_BACKENDS = ("native", "sdpa_flash", "sdpa_cudnn", "fa", "fa2", "sage_attn")


def capture(fn, args, calls):
    """A CUDA graph of `calls` calls of fn(*args), captured after a warm-up on a side stream (as torch.cuda.graphs
    asks)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn(*args)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn(*args)
    return graph


def time_graphs(fns, args, reps, calls):
    """Median per-call ms of each backend replaying a CUDA graph of `calls` calls: the GPU's own time, without the
    host's launch work (what a pipeline captured in a graph pays; short calls are host-bound when run eagerly).
    Interleaved rounds as in time_interleaved; a backend that cannot be captured is reported and left out."""
    graphs = {}
    for name, fn in fns.items():
        if name not in GRAPH_BACKENDS:
            continue
        try:
            graphs[name] = capture(fn, args, calls)
        except Exception as e:
            print(f"  {name}: not captured ({type(e).__name__}: {str(e).splitlines()[0][:120]})", flush=True)
    return timed_rounds({name: graph.replay for name, graph in graphs.items()}, reps, calls)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--impl", choices=["attnsel", "dev"], default="attnsel", help="how to call the native kernel")
    ap.add_argument("--variant", type=int, default=-1, help="dev only: tile variant (-1 = default)")
    ap.add_argument("--tune", default="", help="dev only: comma list of extra variants, recorded as native_vN")
    ap.add_argument("--dtypes", default="bf16,fp16")
    ap.add_argument("--shapes", default="", help="comma list of shape names (default all)")
    ap.add_argument("--shape", action="append", default=[], metavar="B,H,S,D[,causal]",
                    help="an extra shape (repeatable), named by its sizes")
    ap.add_argument("--backends", default="native,sdpa_flash,sdpa_cudnn,sdpa_efficient,sdpa_math,fa2,sage_attn")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--warmup-ms", type=float, default=200.0, help="warm-up wall time per backend and shape")
    ap.add_argument("--out", default="")
    ap.add_argument("--gemm", action="store_true", help="also measure the dense bf16 GEMM ceiling")
    ap.add_argument("--graph", type=int, default=0, metavar="N",
                    help="also time native, SDPA's flash and cuDNN kernels (and flash-attn / SageAttention "
                         "when importable) replaying a CUDA graph of N calls (GPU time alone)")
    args = ap.parse_args()
    assert args.reps >= 20 or os.environ.get("BENCH_ALLOW_FEW_REPS"), "median of >= 20 calls"

    want = args.backends.split(",")
    fns = {}
    if "native" in want:
        fns["native"] = native_fn(args.impl, args.variant)
    for v in [int(x) for x in args.tune.split(",") if x]:
        fns[f"native_v{v}"] = native_fn("dev", v)
    for b in ("sdpa_flash", "sdpa_cudnn", "sdpa_efficient", "sdpa_math"):
        if b in want:
            fns[b] = sdpa_fn(b)
    opt, missing = optional_fns()
    fns.update({k: f for k, f in opt.items() if k in want or k == "fa"})
    records, skipped = [], [dict(backend=k, reason=r) for k, r in missing.items() if k in want]
    shapes = [s for s in SHAPES if not args.shapes or s[0] in args.shapes.split(",")]
    for spec in args.shape:
        parts = spec.split(",")
        if len(parts) not in (4, 5) or not all(p.isdigit() for p in parts[:4]) or parts[4:] not in ([], ["causal"]):
            ap.error(f"--shape {spec!r}: expected B,H,S,D or B,H,S,D,causal")
        B, H, S, D = (int(p) for p in parts[:4])
        shapes.append(("x".join(parts[:4]), (B, H, S, S, D), len(parts) == 5, None))
    gen = torch.Generator(device="cuda").manual_seed(0)
    gemm = gemm_ceiling() if args.gemm else None
    if gemm:
        print(f"dense bf16 GEMM 8192^3: {gemm:.1f} TFLOP/s", flush=True)
    for dname in args.dtypes.split(","):
        dtype = DTYPES[dname]
        for name, (B, H, Sq, Sk, D), causal, mkind in shapes:
            q = torch.randn((B, H, Sq, D), generator=gen, device="cuda").to(dtype)
            k, v = (torch.randn((B, H, Sk, D), generator=gen, device="cuda").to(dtype) for _ in range(2))
            mask = make_mask(mkind, B, H, Sq, Sk, gen, dtype)
            flops = 4 * B * H * Sq * Sk * D / (2 if causal else 1)
            shape = [B, H, Sq, Sk, D]
            ref, ok, diffs = None, {}, {}
            for bname, fn in fns.items():  # one checked call each: refusals are recorded, results cross-checked
                if bname == "sdpa_math" and 2 * 4 * B * H * Sq * Sk > MATH_MAX_BYTES:
                    skipped.append(dict(shape=shape, causal=causal, mask=mkind, dtype=dname, backend=bname,
                                        reason=f"math would materialise {2 * 4 * B * H * Sq * Sk / 2**30:.0f} GiB of scores"))
                    continue
                if mask is not None and bname in ("fa", "fa2", "sage_attn"):
                    skipped.append(dict(shape=shape, causal=causal, mask=mkind, dtype=dname, backend=bname,
                                        reason="takes no mask"))
                    continue
                try:
                    out = fn(q, k, v, causal, mask)
                    torch.cuda.synchronize()
                except Exception as e:
                    skipped.append(dict(shape=shape, causal=causal, mask=mkind, dtype=dname, backend=bname,
                                        reason=f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"))
                    continue
                # sanity cross-check against the first backend that ran (not the accuracy test)
                if ref is None:
                    ref = out.float()
                diffs[bname] = ((out.float() - ref).norm() / ref.norm()).item()
                ok[bname] = fn
                del out
            host_us = {}
            times = time_interleaved(ok, (q, k, v, causal, mask), args.reps, args.warmup_ms, host_us)
            graph_times = time_graphs(ok, (q, k, v, causal, mask), args.reps, args.graph) if args.graph > 0 else {}
            for bname, samples in times.items():
                q1, ms, q3 = quartiles(samples)
                rec = dict(shape=shape, causal=causal, mask=mkind, dtype=dname, backend=bname, ms=ms,
                           ms_quartiles=[q1, q3], host_us=host_us[bname], tflops=flops / ms / 1e9, name=name,
                           rel_diff_vs_first=diffs[bname])
                if gemm:
                    rec["share_of_gemm"] = rec["tflops"] / gemm
                if bname in graph_times:
                    gq1, gms, gq3 = quartiles(graph_times[bname])
                    rec.update(graph_ms=gms, graph_ms_quartiles=[gq1, gq3], graph_tflops=flops / gms / 1e9)
                records.append(rec)
                graph = f"  graph {rec['graph_tflops']:7.1f}" if "graph_tflops" in rec else ""
                print(f"{dname} {name:20s} {str(shape):28s} {'causal' if causal else '      '} "
                      f"{bname:14s} {ms:9.3f} ms {rec['tflops']:7.1f} TFLOP/s  diff {diffs[bname]:.1e}{graph}",
                      flush=True)
            del q, k, v, ref, mask
            torch.cuda.empty_cache()
    result = dict(env_info(), impl=args.impl, reps=args.reps, warmup_ms=args.warmup_ms, gemm_bf16_tflops=gemm,
                  graph_calls=args.graph, records=records, skipped=skipped)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    # short table: TFLOP/s per shape x backend, and native over PyTorch's best SDPA kernel
    names = list(dict.fromkeys(r["backend"] for r in records))
    print("\n" + " " * 45 + "".join(f"{n:>11s}" for n in names) + "   native/best-sdpa"
          + ("   (graphs)" if args.graph > 0 else ""))
    for dname in args.dtypes.split(","):
        for name, shape, causal, _ in shapes:
            row = {r["backend"]: r["tflops"] for r in records if r["name"] == name and r["dtype"] == dname}
            best = max((t for b, t in row.items() if b.startswith("sdpa_")), default=None)
            ratio = f"{row['native'] / best:8.2f}x" if best and "native" in row else "       -"
            grow = {r["backend"]: r["graph_tflops"] for r in records
                    if r["name"] == name and r["dtype"] == dname and "graph_tflops" in r}
            gbest = max((t for b, t in grow.items() if b.startswith("sdpa_")), default=None)
            if args.graph > 0:
                ratio += f"   {grow['native'] / gbest:8.2f}x" if gbest and "native" in grow else "          -"
            print(f"{dname} {name:20s} {str(list(shape)):22s}" + "".join(
                f"{row[n]:11.1f}" if n in row else f"{'-':>11s}" for n in names) + "   " + ratio)
    for s in skipped:
        print("skipped:", s)


if __name__ == "__main__":
    main()
