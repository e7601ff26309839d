"""Is `auto` the fastest? Tune a preset, then time `auto` against every runnable backend on each preset shape, on
an untuned neighbour of each (lengths changed, same tuning bucket), and on its lengths x0.9 where those fall in
another bucket (auto's static rank, unless another shape tuned that bucket), in one run.

  python benchmarks/bench_auto.py --out benchmarks/results/auto_h200.json            # diffusion preset on the GPU
  python benchmarks/bench_auto.py --device cpu --out /tmp/auto_cpu.json               # the small CPU preset

On an H200 the whole diffusion preset (36 shapes, 72 rows) takes several minutes; `--dtypes bfloat16` halves it.

Tuning goes to a fresh temporary cache directory (not the user's table) unless --cache-dir is given; --no-tune
then benchmarks against the table already there. Timing: per shape, `auto` and every backend that accepts the call
are warmed up, then timed in interleaved rounds, each in a fresh seeded order (CUDA events on the GPU,
perf_counter on the CPU; at least --reps rounds, more for fast calls to fill --budget seconds); the median per candidate. Reported per shape: each
candidate's ms, auto's backend, and auto / fastest = fastest_ms / auto_ms (1.0 = auto matched the fastest), from a
second timing of auto and the fastest alone, alternating (in the full rounds a kernel's time also depends on the one
before it: a GPU's clocks recover behind a slow kernel).
TFLOP/s = 4*B*Hq*Sq*Sk*D / time (halved for causal).
"""
import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="diffusion")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when visible)")
    ap.add_argument("--reps", type=int, default=10, help="timed rounds per shape, at least (default %(default)s; "
                                                         "more for fast calls, to fill --budget)")
    ap.add_argument("--tune-reps", type=int, default=20, help="timed calls per backend while tuning")
    ap.add_argument("--budget", type=float, default=2.0, help="seconds of timed calls per shape, at most")
    ap.add_argument("--cache-dir", default=None, help="tuning cache directory (default: a fresh temporary one)")
    ap.add_argument("--no-tune", action="store_true", help="use the table in --cache-dir as it is")
    ap.add_argument("--names", default="", help="comma list of preset shape names to keep (default all)")
    ap.add_argument("--dtypes", default="", help="comma list of dtypes to keep, e.g. bfloat16 (default all)")
    ap.add_argument("--out", default=None, help="JSON file to write")
    return ap.parse_args()


ARGS = parse_args()
if ARGS.no_tune and not ARGS.cache_dir:
    sys.exit("bench_auto.py: --no-tune needs --cache-dir (the table to benchmark)")
# Before attnsel loads its table at import.
os.environ["ATTNSEL_CACHE_DIR"] = ARGS.cache_dir or tempfile.mkdtemp(prefix="attnsel-bench-auto-")
os.environ.pop("ATTNSEL_AUTOTUNE", None)

import torch  # noqa: E402

import attnsel  # noqa: E402
from attnsel import _C, tuning  # noqa: E402
from attnsel.backends import Backend, backend_names  # noqa: E402
from attnsel.selection import explain_call  # noqa: E402


def scaled(shape, factor, step, label):
    """The same call with its query length (and the key length, when equal) times factor, rounded to a multiple of
    step; the key length of cross-attention stays."""
    q_len = max(step, round(shape.q_len * factor / step) * step)
    kv_len = shape.kv_len if shape.kv_len != shape.q_len else q_len
    return tuning.Shape(**{**shape.__dict__, "q_len": q_len, "kv_len": kv_len, "name": f"{shape.name} ({label})"})


def nearby_lengths(shape):
    """The same call with lengths scaled by 0.9: in another bucket when that moves a CUDA key length off a multiple
    of 64 (or across a bucket edge), so auto runs it by the static rank; None when it stays in the bucket (then
    neighbour() covers it)."""
    other = scaled(shape, 0.9, 1, "0.9x")
    return None if other.signature().bucket() == shape.signature().bucket() else other


def neighbour(shape):
    """The same call with lengths moved inside their tuning bucket (None when no nearby length stays in it)."""
    bucket = shape.signature().bucket()
    # A CUDA bucket keeps key lengths that are a multiple of 64 apart from the rest: such a shape's neighbours are
    # multiples of 64 too.
    step = 64 if shape.device.startswith("cuda") and shape.kv_len % 64 == 0 else 1
    for factor in (0.9, 1.1, 0.95, 1.05, 0.85, 1.2, 0.8, 0.75, 0.7):
        other = scaled(shape, factor, step, "untuned")
        if (other.q_len, other.kv_len) != (shape.q_len, shape.kv_len) and other.signature().bucket() == bucket:
            return other
    return None


def tflops(shape, ms):
    flops = 4 * shape.batch * shape.heads * shape.q_len * shape.kv_len * shape.head_dim
    return flops / (2 if shape.causal else 1) / (ms * 1e-3) / 1e12


def time_candidates(fns, device, reps, budget):
    """Median ms per candidate: warm-up, then interleaved rounds."""
    cuda = device.type == "cuda"
    per_call = {}
    for name, fn in fns.items():
        t0, n = time.perf_counter(), 0
        while n < 3 or (time.perf_counter() - t0 < 0.2 and n < 200):
            fn()
            n += 1
            if cuda:
                torch.cuda.synchronize()
        per_call[name] = (time.perf_counter() - t0) / n
    rounds = max(reps, min(2000, int(budget / max(sum(per_call.values()), 1e-9))))
    samples = {name: [] for name in fns}
    order = list(fns.items())
    rng = random.Random(0)
    for _ in range(rounds):  # a fresh seeded order each round: no candidate always runs first or after the same one
        rng.shuffle(order)
        for name, fn in order:
            if cuda:
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fn()
                b.record()
                samples[name].append((a, b))
            else:
                t0 = time.perf_counter()
                fn()
                samples[name].append((time.perf_counter() - t0) * 1e3)
    if cuda:
        torch.cuda.synchronize()
        return {n: statistics.median(a.elapsed_time(b) for a, b in s) for n, s in samples.items()}, rounds
    return {n: statistics.median(s) for n, s in samples.items()}, rounds


def bench_shape(shape, tuned):
    sig = shape.signature()
    q, k, v, mask = tuning.make_inputs(shape)
    row = dict(name=shape.name, shape=shape.label(), call=shape.to_json(), bucket=sig.bucket(), tuned=tuned,
               tuned_bucket=_C.tuning_entry(sig.bucket()) is not None)
    try:
        plan = explain_call(q, k, v, attn_mask=mask, is_causal=shape.causal)
    except ValueError as err:
        row["error"] = f"auto cannot run: {err}"
        return row
    row.update(auto_backend=str(plan.backend), auto_measured=plan.measured is not None)
    fns, refused = {}, {}
    with torch.no_grad():
        fns["auto"] = lambda: attnsel.attention(q, k, v, attn_mask=mask, is_causal=shape.causal)
        for name in backend_names():
            backend = Backend[name.upper()]
            if _C.backend_descriptor(int(backend), sig.device) is None or _C.refusal_reasons(int(backend), sig):
                continue
            why = tuning._math_too_big(backend, sig)
            fn = (lambda b=backend: attnsel.attention(q, k, v, attn_mask=mask, is_causal=shape.causal, backend=b))
            if not why:
                try:
                    fn()
                except Exception as err:  # recorded, not fatal: the row says which backend failed and why
                    why = f"raised {type(err).__name__}: {' '.join(str(err).split())[:200]}"
                    if shape.device_type == "cuda":
                        torch.cuda.empty_cache()
            if why:
                refused[name] = why
            else:
                fns[name] = fn
        if len(fns) == 1:
            row.update(error="no named backend runs this call", refused=refused)
            return row
        ms, rounds = time_candidates(fns, q.device, ARGS.reps, ARGS.budget)
        fastest = min((n for n in ms if n != "auto"), key=ms.get)
        # The ratio from auto and the fastest alone, alternating: in the rounds above a kernel's time also depends
        # on the one before it (a GPU's clocks recover behind a slow, low-power kernel), which is not auto's doing.
        pair, _ = time_candidates({"auto": fns["auto"], fastest: fns[fastest]}, q.device, 2 * ARGS.reps,
                                  ARGS.budget)
    row.update(ms={n: round(t, 5) for n, t in ms.items()}, rounds=rounds, refused=refused, fastest=fastest,
               pair_ms={n: round(t, 5) for n, t in pair.items()},
               auto_over_fastest=round(pair[fastest] / pair["auto"], 4),
               auto_tflops=round(tflops(shape, pair["auto"]), 2))
    fns.clear()  # drops the inputs the closures hold
    return row


def environment(device):
    info = dict(torch=torch.__version__, python=platform.python_version(), attnsel=attnsel.__version__,
                tuning_identity=tuning.device_identity(device), load_avg=list(os.getloadavg()),
                threads=torch.get_num_threads(), date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    if device.startswith("cuda"):
        info.update(gpu=torch.cuda.get_device_name(), cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
                    driver=info["tuning_identity"]["driver"])
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        git = lambda *a: subprocess.run(["git", "-C", here, *a], capture_output=True, text=True, timeout=20).stdout
        info["commit"] = git("rev-parse", "HEAD").strip()
        if git("status", "--porcelain", "--untracked-files=no").strip():  # e.g. a copied tree with a stale .git
            info["commit"] += " (the working tree differs from it)"
    except Exception:
        pass
    return info


def main():
    device = ARGS.device or ("cuda" if torch.cuda.is_available() else "cpu")
    shapes = tuning.preset(ARGS.preset, device)
    if ARGS.names:
        keep = set(ARGS.names.split(","))
        shapes = [s for s in shapes if s.name in keep]
    if ARGS.dtypes:
        keep = set(ARGS.dtypes.split(","))
        shapes = [s for s in shapes if s.dtype in keep]
    start = time.perf_counter()
    if not ARGS.no_tune:
        def progress(i, shape, name):
            print(f"\rtuning {i + 1}/{len(shapes)} {shape.label()}: {name}\033[K", end="", file=sys.stderr,
                  flush=True)

        tuning.tune(shapes, reps=ARGS.tune_reps, progress=progress)
        print(f"\ntuned {len(shapes)} shapes in {time.perf_counter() - start:.0f}s "
              f"({os.environ['ATTNSEL_CACHE_DIR']})", file=sys.stderr)
    todo = [(s, True) for s in shapes] + [(n, False) for n in map(neighbour, shapes) if n is not None]
    todo += [(n, False) for n in map(nearby_lengths, shapes) if n is not None]
    rows = []
    for i, (shape, tuned) in enumerate(todo):
        print(f"\rbenchmark {i + 1}/{len(todo)} {shape.label()}\033[K", end="", file=sys.stderr, flush=True)
        rows.append(bench_shape(shape, tuned))
    print(file=sys.stderr)
    width = max(len(r["shape"]) for r in rows)
    print(f"{'shape':<{width}}  tuned  {'auto backend':<14} {'auto ms':>9} {'fastest':<14} {'ms':>9}  auto/fastest")
    print(f"{'':<{width}}  (yes: this shape; bucket: a shape of its bucket; no: static rank)")
    for r in rows:
        if "error" in r:
            print(f"{r['shape']:<{width}}  {r['error']}")
            continue
        tuned = "yes" if r["tuned"] else "bucket" if r["tuned_bucket"] else "no"
        print(f"{r['shape']:<{width}}  {tuned:<6} {r['auto_backend']:<14} "
              f"{r['pair_ms']['auto']:>9.4g} {r['fastest']:<14} {r['pair_ms'][r['fastest']]:>9.4g}  "
              f"{r['auto_over_fastest']:.3f}")
    summary = {}
    kinds = {"tuned": lambda r: r["tuned"], "untuned_in_tuned_bucket": lambda r: not r["tuned"] and r["tuned_bucket"],
             "untuned_static_rank": lambda r: not r["tuned_bucket"]}
    for label, kind in kinds.items():
        ratios = [r["auto_over_fastest"] for r in rows if kind(r) and "error" not in r]
        if ratios:
            summary[label] = dict(shapes=len(ratios), min_auto_over_fastest=min(ratios),
                                  geomean=round(statistics.geometric_mean(ratios), 4),
                                  at_least_0_97=sum(x >= 0.97 for x in ratios))
    print(json.dumps(summary, indent=1))
    if ARGS.out:
        with open(ARGS.out, "w") as f:
            json.dump(dict(environment=environment(device), preset=ARGS.preset, device=device, reps=ARGS.reps,
                           summary=summary, results=rows), f, indent=1)
            f.write("\n")
        print(f"wrote {ARGS.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
