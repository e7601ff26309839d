"""Side-by-side timing of dev-harness variants (tools/cuda_dev/build.sh), for differences of a few percent.

  python tools/cuda_dev/ab.py --variants=-1,20 --shapes sd-unet,sd3-joint,flux,dit-8x1k [--cudnn] [--out x.json]
  python tools/cuda_dev/ab.py --variants=-1 --libs main=/tmp/main/libattnsel_dev.so,new=tools/cuda_dev/build/libattnsel_dev.so

Shapes are benchmarks/bench_cuda_attention.py's by name, or BxHxSqxSkxD (a trailing c: causal; no mask), e.g.
--shapes sd-unet,1x12x4224x4096x64,1x16x8192x8192x64c. Per shape and dtype, every variant is warmed up, then timed
in --rounds rounds; in each round every variant runs --calls calls back to back between two CUDA events (the mean of
those calls is the round's time), and the order of the variants rotates from round to round, so neither drift nor
the position after a slower kernel favours one. Reported per variant: TFLOP/s of the median round and the range of
the rounds; ranges that do not overlap mean a real difference. --cudnn adds PyTorch's cuDNN kernel as an anchor.
--graph captures each variant's --calls calls in a CUDA graph and times its replay: the GPU's own time, for short
calls that are host-bound when run eagerly (T5, 1024-token layers).
A tuning tool: the benchmark of record is benchmarks/bench_cuda_attention.py.
"""
import argparse
import json
import os
import statistics
import sys

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "..", "benchmarks"))
import devattn  # noqa: E402
from bench_cuda_attention import DTYPES, SHAPES, capture, env_info, make_mask  # noqa: E402


def variant_fn(v, lib=None):
    return lambda q, k, v_, causal, mask: devattn.attention(q, k, v_, attn_mask=mask, is_causal=causal, variant=v,
                                                            lib=lib)


def cudnn(q, k, v, causal, mask):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)


def explicit_shape(token):
    """'1x38x4429x4429x64' (a trailing 'c': causal) as a SHAPES entry, or None."""
    causal = token.endswith("c")
    dims = token[:-1] if causal else token
    parts = dims.split("x")
    if len(parts) != 5 or not all(p.isdigit() and int(p) > 0 for p in parts):
        return None
    return token, tuple(int(p) for p in parts), causal, None


def time_rounds(fns, args, rounds, calls, graph=False):
    """Per backend: the mean ms per call of each round (order rotated every round)."""
    names = list(fns)
    if graph:  # one replay runs `calls` calls
        graphs = {n: capture(fn, args, calls) for n, fn in fns.items()}
        fns, args, launches = {n: g.replay for n, g in graphs.items()}, (), 1
    else:
        launches = calls
    for name in names:  # warm-up
        for _ in range(max(3, launches // 3)):
            fns[name](*args)
    torch.cuda.synchronize()
    out = {n: [] for n in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        ev = {}
        for name in order:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            for _ in range(launches):
                fns[name](*args)
            b.record()
            ev[name] = (a, b)
        torch.cuda.synchronize()
        for name, (a, b) in ev.items():
            out[name].append(a.elapsed_time(b) / calls)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", default="-1,20", help="comma list of dev-harness variants (-1 = default)")
    ap.add_argument("--shapes", default="sd-unet,sd3-joint,flux,dit-8x1k")
    ap.add_argument("--dtypes", default="bf16,fp16")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--calls", type=int, default=30)
    ap.add_argument("--libs", default="", help="NAME=PATH,...: time every variant of each dev library (A/B of builds)")
    ap.add_argument("--cudnn", action="store_true", help="also time PyTorch's cuDNN kernel")
    ap.add_argument("--graph", action="store_true", help="time CUDA-graph replays of --calls calls (no host work)")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    known = {s[0]: s for s in SHAPES}
    wanted = args.shapes.split(",")
    for s in wanted:
        if s not in known and (shape := explicit_shape(s)) is not None:
            known[s] = shape
    unknown = [s for s in wanted if s not in known]
    if unknown:
        ap.error(f"unknown shape(s) {unknown}; valid: {', '.join(n for n, *_ in SHAPES)} or BxHxSqxSkxD[c]")
    libs = dict(x.split("=", 1) for x in args.libs.split(",")) if args.libs else {"": None}
    fns = {f"{ln}{'.' if ln else ''}v{v}": variant_fn(int(v), path)
           for ln, path in libs.items() for v in args.variants.split(",")}
    if args.cudnn:
        fns["cudnn"] = cudnn
    gen = torch.Generator(device="cuda").manual_seed(0)
    records = []
    for dname in args.dtypes.split(","):
        dtype = DTYPES[dname]
        for name in wanted:
            _, (B, H, Sq, Sk, D), causal, mkind = known[name]
            q = torch.randn((B, H, Sq, D), generator=gen, device="cuda").to(dtype)
            k, v = (torch.randn((B, H, Sk, D), generator=gen, device="cuda").to(dtype) for _ in range(2))
            mask = make_mask(mkind, B, H, Sq, Sk, gen, dtype)
            flops = 4 * B * H * Sq * Sk * D / (2 if causal else 1)
            ok = {}
            for bname, fn in fns.items():  # refusals are reported, not timed
                try:
                    fn(q, k, v, causal, mask)
                    torch.cuda.synchronize()
                    ok[bname] = fn
                except Exception as e:
                    print(f"{dname} {name}: {bname} skipped: {str(e).splitlines()[0][:200]}", flush=True)
            rounds = time_rounds(ok, (q, k, v, causal, mask), args.rounds, args.calls, args.graph)
            line = f"{dname} {name:14s}"
            for bname, ms in rounds.items():
                tf = sorted(flops / m / 1e9 for m in ms)
                med = statistics.median(tf)
                records.append(dict(name=name, shape=[B, H, Sq, Sk, D], causal=causal, mask=mkind, dtype=dname,
                                    backend=bname, round_ms=ms, tflops=med, tflops_min=tf[0], tflops_max=tf[-1]))
                line += f"  {bname} {med:6.1f} [{tf[0]:.1f}-{tf[-1]:.1f}]"
            print(line, flush=True)
            del q, k, v, mask
            torch.cuda.empty_cache()
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(env_info(), rounds=args.rounds, calls=args.calls, graph=args.graph, records=records), f,
                      indent=1)


if __name__ == "__main__":
    main()
