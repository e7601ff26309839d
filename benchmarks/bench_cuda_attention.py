"""GPU benchmark: attnsel's native CUDA attention vs PyTorch SDPA backends (and flash-attn / SageAttention
when importable), one GPU, one run.

  python benchmarks/bench_cuda_attention.py --impl attnsel --out benchmarks/results/cuda_h100.json
  python benchmarks/bench_cuda_attention.py --impl dev     # tools/cuda_dev ctypes build, no extension

Timing: per shape, every backend warmed up (>= 200 ms), then timed in --reps (>= 20) interleaved rounds with CUDA
events around each call, calls queued back to back (host launch work overlaps the GPU); the median per backend.
TFLOP/s = 4*B*H*Sq*Sk*D / time, halved for causal.
"""
import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

SHAPES = [  # name, (B, H, S, D), causal
    ("flux", (1, 24, 4608, 128), False),
    ("wan-1.3b", (1, 12, 32760, 128), False),
    ("wan-14b", (1, 40, 32760, 128), False),
    ("sd-unet", (2, 10, 4096, 64), False),
    ("t5-xxl", (1, 64, 512, 64), False),
    ("vae-4k", (1, 1, 4096, 512), False),
    ("vae-16k", (1, 1, 16384, 512), False),
    ("causal-8k", (1, 32, 8192, 128), True),
]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
MATH_MAX_BYTES = 12 << 30  # the math path materialises fp32 scores (and their softmax)


def native_fn(impl, variant):
    if impl == "attnsel":
        import attnsel

        return lambda q, k, v, causal: attnsel.attention(q, k, v, is_causal=causal, backend="native")
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tools", "cuda_dev"))
    import devattn

    return lambda q, k, v, causal: devattn.attention(q, k, v, is_causal=causal, variant=variant)


def sdpa_fn(backend):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    b = {"sdpa_flash": SDPBackend.FLASH_ATTENTION, "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION,
         "sdpa_efficient": SDPBackend.EFFICIENT_ATTENTION, "sdpa_math": SDPBackend.MATH}[backend]

    def run(q, k, v, causal):
        with sdpa_kernel([b]):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    return run


def optional_fns():
    fns, missing = {}, {}
    try:
        import flash_attn  # noqa: F401
        from flash_attn import flash_attn_func

        name = "fa2" if flash_attn.__version__.startswith("2") else "fa"
        fns[name] = lambda q, k, v, causal: flash_attn_func(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=causal).transpose(1, 2)
    except Exception as e:  # not installed here
        missing["fa2"] = f"flash_attn not importable: {type(e).__name__}: {e}"
    try:
        from sageattention import sageattn

        fns["sage_attn"] = lambda q, k, v, causal: sageattn(q, k, v, tensor_layout="HND", is_causal=causal)
    except Exception as e:
        missing["sage_attn"] = f"sageattention not importable: {type(e).__name__}: {e}"
    return fns, missing


def time_interleaved(fns, args, reps, warmup_ms):
    """Median per-call ms of each backend. Backends are timed in interleaved rounds (A B C A B C ...), so clock or
    thermal drift during the run touches them alike; calls are queued back to back with CUDA events around each
    and one sync at the end, so host launch work overlaps the GPU as in a real pipeline."""
    for fn in fns.values():  # warm-up: >= 3 calls and >= warmup_ms of wall time per backend
        t0, n = time.perf_counter(), 0
        while n < 3 or (time.perf_counter() - t0) * 1e3 < warmup_ms:
            fn(*args)
            n += 1
            if n % 4 == 0:
                torch.cuda.synchronize()
    torch.cuda.synchronize()
    events = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn(*args)
            b.record()
            events[name].append((a, b))
    torch.cuda.synchronize()
    return {name: statistics.median(a.elapsed_time(b) for a, b in ev) for name, ev in events.items()}


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
        shapes.append(("x".join(parts[:4]), tuple(int(p) for p in parts[:4]), len(parts) == 5))
    gen = torch.Generator(device="cuda").manual_seed(0)
    for dname in args.dtypes.split(","):
        dtype = DTYPES[dname]
        for name, (B, H, S, D), causal in shapes:
            q, k, v = (torch.randn((B, H, S, D), generator=gen, device="cuda").to(dtype) for _ in range(3))
            flops = 4 * B * H * S * S * D / (2 if causal else 1)
            ref, ok, diffs = None, {}, {}
            for bname, fn in fns.items():  # one checked call each: refusals are recorded, results cross-checked
                if bname == "sdpa_math" and 2 * 4 * B * H * S * S > MATH_MAX_BYTES:
                    skipped.append(dict(shape=[B, H, S, D], causal=causal, dtype=dname, backend=bname,
                                        reason=f"math would materialise {2 * 4 * B * H * S * S / 2**30:.0f} GiB of scores"))
                    continue
                try:
                    out = fn(q, k, v, causal)
                    torch.cuda.synchronize()
                except Exception as e:
                    skipped.append(dict(shape=[B, H, S, D], causal=causal, dtype=dname, backend=bname,
                                        reason=f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"))
                    continue
                # sanity cross-check against the first backend that ran (not the accuracy test)
                if ref is None:
                    ref = out.float()
                diffs[bname] = ((out.float() - ref).norm() / ref.norm()).item()
                ok[bname] = fn
                del out
            times = time_interleaved(ok, (q, k, v, causal), args.reps, args.warmup_ms)
            for bname, ms in times.items():
                rec = dict(shape=[B, H, S, D], causal=causal, dtype=dname, backend=bname, ms=ms,
                           tflops=flops / ms / 1e9, name=name, rel_diff_vs_first=diffs[bname])
                records.append(rec)
                print(f"{dname} {name:10s} {str([B, H, S, D]):22s} {'causal' if causal else '      '} "
                      f"{bname:14s} {ms:9.3f} ms {rec['tflops']:7.1f} TFLOP/s  diff {diffs[bname]:.1e}", flush=True)
            del q, k, v, ref
            torch.cuda.empty_cache()
    result = dict(env_info(), impl=args.impl, reps=args.reps, warmup_ms=args.warmup_ms, records=records, skipped=skipped)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    # short table: TFLOP/s per shape x backend
    names = list(dict.fromkeys(r["backend"] for r in records))
    print("\n" + " " * 34 + "".join(f"{n:>13s}" for n in names))
    for dname in args.dtypes.split(","):
        for name, shape, causal in shapes:
            row = {r["backend"]: r["tflops"] for r in records if r["name"] == name and r["dtype"] == dname}
            print(f"{dname} {name:10s} {str(list(shape)):20s}" + "".join(
                f"{row[n]:13.1f}" if n in row else f"{'-':>13s}" for n in names))
    for s in skipped:
        print("skipped:", s)


if __name__ == "__main__":
    main()
