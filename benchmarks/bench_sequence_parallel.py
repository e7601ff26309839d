"""Sequence-parallel attention forward on N GPUs vs the same backend on one GPU, same run: Ulysses and ring.

    torchrun --nproc-per-node 2 benchmarks/bench_sequence_parallel.py --backend native --out sp.json

Per shape (bf16): the one-GPU time of attnsel.attention on the whole sequence (every rank runs it on its own GPU at
once), then each sequence-parallel variant on (B, H, S/N, D) shards, over each transport: `nccl` (NCCL all-to-alls
/ send-recvs, kernels on the SMs) and `copy_engine` (pushes into peers' symmetric memory, copy engines, no SMs);
Ulysses at several head-chunk counts (and, for comparison, with one copy per head instead of one 2-d copy per peer
and tensor), the ring with its last block in several head chunks (RING_LAST_CHUNKS). Per variant also: the
communication alone (the same exchange, no attention) and the local compute alone (Ulysses: one attention call on
already-exchanged data; the ring: its block attentions and their merge, one stream); `comm_share` = communication
alone / total, `exposed_ms` = total - compute alone (what overlapping did not hide), both the slowest rank's.
Diagnostic references: the copy-engine Ulysses' attention alone in its default chunks on its two streams (no copies,
no barriers), on ordinary memory and reading the symmetric buffer, and on ordinary memory with the whole exchange
running beside it, neither waiting for the other (`..._beside_exchange`: what the exchange's traffic costs the
compute even when it hides nothing; a floor for any overlapped schedule moving the same bytes).
Timing: warm-up, then --reps calls back to back, CUDA events around each call, median per rank; `max_rank_ms` is the
slowest rank's median. That is one round; --rounds rounds run one after another, each timing the one-GPU call and
the compute-alone references, then every variant. A round's speedup is rank 0's one-GPU median over the slowest
rank's median of the variant; reported are the median over the rounds and their min and max (the spread), and
`speedup_vs_slowest_gpu` (the one-GPU median of the slower GPU, which also bounds the variant). TFLOP/s =
4*B*H*S*S*D / time. Ring needs a backend that returns the log-sum-exp; without one it is reported as not measurable,
with the reason. USP needs both degrees > 1 (4 GPUs); on 2 GPUs it is Ulysses (2, 1) or the ring (1, 2).
"""

import os

# NVLink multicast stays off in every process (see attnsel.distributed): before torch.distributed starts.
for _name, _value in (("NCCL_NVLS_ENABLE", "0"), ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"),
                      ("NVSHMEM_DISABLE_NVLS", "1")):
    os.environ.setdefault(_name, _value)

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import attnsel  # noqa: E402
import attnsel.distributed as D  # noqa: E402

SHAPES = {  # name: (B, H, S, D)
    "wan-14b": (1, 40, 32760, 128),
    "hunyuanvideo": (1, 24, 118800, 128),  # 720p, 129 frames: 33 x 45 x 80 latent tokens
    "smoke": (1, 4, 1030, 64),  # a quick check of this script (also on CPU: --device cpu, gloo)
}


def timed(fn, reps, warmup, device):
    """Median ms of fn on this rank (CUDA events around each of `reps` back-to-back calls) and the slowest rank's."""
    for _ in range(warmup):
        fn()
    if device.type != "cuda":
        dist.barrier()
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - start))
        mine = statistics.median(times)
    else:
        torch.cuda.synchronize()
        dist.barrier()
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize()
        mine = statistics.median(s.elapsed_time(e) for s, e in events)
    worst = torch.tensor([mine], device=device)
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    return mine, worst.item()


def ulysses_comm(q, k, v, group, lens):
    """The Ulysses exchange alone: q, k, v sequence->heads, an output-sized tensor heads->seq."""
    rank = dist.get_rank(group)
    hu = q.shape[1] // len(lens)
    pending = [D._start_seq_to_heads(t, group, lens, 0, hu) for t in (q, k, v)]
    qh = [p.wait() for p in pending][0]
    return D._heads_to_seq(qh, group, lens, rank)


def ring_comm(k, v, group):
    """The ring's K/V passing alone (N-1 steps)."""
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    nxt, prv = (rank + 1) % size, (rank - 1) % size
    wire = [k, v]
    for _ in range(size - 1):
        recv = [torch.empty_like(t) for t in wire]
        ops = [dist.P2POp(dist.isend, t, nxt) for t in wire] + [dist.P2POp(dist.irecv, t, prv) for t in recv]
        for w in dist.batch_isend_irecv(ops):
            w.wait()
        wire = recv
    return wire


def qkv_stacked_comm(q, k, v, group, lens):
    """q, k, v sequence->heads by one all-to-all: packed per destination, moved, unpacked to (3, B, H/N, S, D)."""
    size = len(lens)
    b, h, n, d = q.shape
    send = torch.stack([t.unflatten(1, (size, h // size)) for t in (q, k, v)], dim=2)  # (B, N, 3, H/N, n, D)
    send = send.transpose(0, 1).contiguous()  # (N, B, 3, H/N, n, D): one block per destination
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    return recv.permute(1, 2, 3, 0, 4, 5).reshape(b, 3, h // size, size * n, d).contiguous()


def qkv_separate_comm(q, k, v, group, lens):
    """The same move by three all-to-alls (what Ulysses runs): each received buffer joined along the sequence."""
    pending = [D._start_seq_to_heads(t, group, lens, 0, q.shape[1] // len(lens)) for t in (q, k, v)]
    return [p.wait() for p in pending]


def ulysses_ce_comm(q, k, v, group, lens, chunks):
    """The copy-engine Ulysses exchange alone: the same pushes, barriers and copies, an empty local attention."""
    mem = D._peer_memory(group, q, "copy_engine", "bench")
    hu = q.shape[1] // len(lens)
    y = q.new_empty(q.shape[0], hu, sum(lens), v.shape[3])

    def no_attention(qh, kh, vh, mask):
        return y[:, :qh.shape[1]]

    return D._ulysses_copy_engine(q, k, v, None, mem, dist.get_rank(group), lens, lens, no_attention, chunks)


def ring_ce_comm(k, v, group, lens):
    """The copy-engine ring's K/V passing alone: N-1 pushes into the next rank's alternating slots."""
    mem = D._peer_memory(group, k, "copy_engine", "bench")
    size, rank = len(lens), dist.get_rank(group)
    layout = D._Layout([(f"{name}{slot}", tuple(k.shape[:2]) + (max(lens), k.shape[3]), k.dtype)
                        for slot in (0, 1) for name in ("k", "v")])
    mem.reserve(layout.nbytes)
    comm, current = mem.comm_stream, torch.cuda.current_stream()
    comm.wait_stream(current)
    held = [k, v]
    with torch.cuda.stream(comm):
        mem.barrier()
        for step in range(size - 1):
            src = (rank - step) % size
            shape = tuple(k.shape[:2]) + (lens[src], k.shape[3])
            dst = [layout.view(mem, (rank + 1) % size, f"{name}{step % 2}", shape) for name in ("k", "v")]
            for d_, t in zip(dst, held):
                d_.copy_(t)
            mem.barrier()
            held = [layout.view(mem, rank, f"{name}{step % 2}",
                                tuple(k.shape[:2]) + (lens[(src - 1) % size], k.shape[3])) for name in ("k", "v")]
    current.wait_stream(comm)
    return held


def ulysses_chunked_compute(q, k, v, group, lens, chunks, backend, heads=None):
    """The copy-engine Ulysses' attention alone: its head chunks on its two streams, no copies and no barriers
    (what is left when communication costs nothing), reading this rank's symmetric buffer as the pipeline does, or
    with `heads` (qh, kh, vh), ordinary memory."""
    mem = D._peer_memory(group, q, "copy_engine", "bench")
    if heads is None:
        b, h, _, d = q.shape
        hu, s = h // len(lens), sum(lens)
        layout = D._Layout([(name, (b, hu, s, d), q.dtype) for name in ("q", "k", "v")])
        mem.reserve(layout.nbytes)
        heads = [layout.view(mem, dist.get_rank(group), name) for name in ("q", "k", "v")]
    current = torch.cuda.current_stream()
    streams = [current, mem.compute_stream]
    mem.compute_stream.wait_stream(current)
    for c, (h0, h1) in enumerate(D._chunk_bounds(heads[0].shape[1], chunks)):
        with torch.cuda.stream(streams[c % 2]):
            attnsel.attention(*(t[:, h0:h1] for t in heads), backend=backend)
    current.wait_stream(mem.compute_stream)


def ulysses_compute_beside_exchange(q, k, v, group, lens, chunks, backend, heads):
    """The copy-engine Ulysses' attention (its head chunks on ordinary memory) with its whole exchange running beside
    it on a side stream, neither waiting for the other: what the exchange's traffic alone costs the compute."""
    current, side = torch.cuda.current_stream(), torch.cuda.Stream(q.device)
    side.wait_stream(current)
    with torch.cuda.stream(side):
        ulysses_ce_comm(q, k, v, group, lens, chunks)
    ulysses_chunked_compute(q, k, v, group, lens, chunks, backend, heads)
    current.wait_stream(side)


def ring_compute(q, blocks, backend):
    """The ring's local work alone: one attention with LSE per block, merged in fp32."""
    acc = lse_acc = None
    for kb, vb in blocks:
        out, lse = attnsel.attention(q, kb, vb, backend=backend, return_lse=True)
        acc, lse_acc = D._merge(acc, lse_acc, out, lse)
    return acc.to(q.dtype)


def _ints(text):
    return [int(c) for c in text.split(",") if c]


def _environment(device, world, transport, label):
    cuda = device.type == "cuda"
    env = {"gpu": torch.cuda.get_device_name() if cuda else platform.processor(), "processes": world,
           "torch": torch.__version__, "cuda": torch.version.cuda,
           "nccl": ".".join(map(str, torch.cuda.nccl.version())) if cuda else None,
           "attnsel": attnsel.__version__, "python": platform.python_version(), "transport_auto": transport,
           "nvls_env": {n: os.environ.get(n) for n in ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST",
                                                       "NVSHMEM_DISABLE_NVLS")},
           "tree": label}
    if cuda:
        for key, cmd in (("driver", ["nvidia-smi", "--query-gpu=driver_version,clocks.max.sm,power.limit",
                                     "--format=csv,noheader"]), ("topology", ["nvidia-smi", "topo", "-m"])):
            try:
                env[key] = subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout.strip()
            except (OSError, subprocess.SubprocessError) as err:
                env[key] = f"unavailable: {err}"
    return env


def _summary(rounds_one, rounds_mine, rounds_worst):
    speedups = [one / worst for one, worst in zip(rounds_one, rounds_worst)]
    return {"ms": statistics.median(rounds_mine), "max_rank_ms": statistics.median(rounds_worst),
            "max_rank_ms_rounds": rounds_worst, "speedup": statistics.median(speedups),
            "speedup_min": min(speedups), "speedup_max": max(speedups), "speedup_rounds": speedups}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backend", default="native", help="the local backend (default: %(default)s)")
    ap.add_argument("--ring-backend", default="",
                    help="the ring's local backend, must return the log-sum-exp (default: --backend)")
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="cpu: gloo, for a smoke test")
    ap.add_argument("--shapes", default="wan-14b,hunyuanvideo", help="comma-separated: " + ", ".join(SHAPES))
    ap.add_argument("--chunks", default="1", help="Ulysses head chunks over NCCL (default: %(default)s)")
    ap.add_argument("--ce-chunks", default="1,4,0,8",
                    help="Ulysses head chunks over the copy engines (default: %(default)s; 0 = the default count)")
    ap.add_argument("--row-copy-chunks", default="6",
                    help="the same with one copy per head instead of 2-d copies (default: %(default)s)")
    ap.add_argument("--ring-chunks", default="1,4",
                    help="the ring's last block in these many head chunks, copy engines (default: %(default)s)")
    ap.add_argument("--rounds", type=int, default=0, help="rounds per shape (default: 5, 1 above 64k tokens)")
    ap.add_argument("--reps", type=int, default=0, help="timed calls per variant and round (default: by shape)")
    ap.add_argument("--trace", help="folder: a torch.profiler trace of each rank's default Ulysses and ring calls "
                                    "(3 calls each, the first shape)")
    ap.add_argument("--qkv-comparisons", action="store_true",
                    help="also time q, k, v moved by one stacked all-to-all against three (communication only)")
    ap.add_argument("--label", default="", help="what tree was measured (recorded in the JSON)")
    ap.add_argument("--out", help="JSON file (rank 0 writes it)")
    args = ap.parse_args()

    if args.device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    group = dist.group.WORLD
    transport = "undecided"
    if device.type == "cuda":
        D._peer_memory(group, torch.empty(1, device=device), "auto", "bench")
        transport = D.transport_in_use(group)
    dtype = torch.bfloat16
    backend = args.backend

    def say(*a):
        if rank == 0:
            print(*a, flush=True)

    try:
        ring_backend, ring_reason = D._lse_backend(args.ring_backend or backend, torch.empty(
            1, 1, 1, 128, device=device, dtype=dtype), "ring_attention"), None
    except ValueError as err:
        ring_backend, ring_reason = None, str(err)

    rows = []
    for name in args.shapes.split(","):
        b, h, s, d = SHAPES[name]
        flops = 4 * b * h * s * s * d
        reps = args.reps or (15 if s < 60000 else 5)
        rounds = args.rounds or (5 if s < 65536 else 1)
        warmup = 3
        gen = torch.Generator(device=device).manual_seed(0)
        q, k, v = (torch.randn(b, h, s, d, device=device, dtype=dtype, generator=gen) for _ in range(3))
        lens = D.shard_lengths(s, world)
        lo = sum(lens[:rank])
        qs, ks, vs = (t[:, :, lo:lo + lens[rank]].contiguous() for t in (q, k, v))
        full_out = attnsel.attention(q, k, v, backend=backend)
        row = {"shape": name, "B": b, "H": h, "S": s, "D": d, "dtype": "bf16", "processes": world,
               "device": device.type, "backend": backend, "rounds": rounds, "reps": reps, "variants": []}

        # Timed in every round besides the variants: the one-GPU call and the local compute alone.
        refs = {"one_gpu": lambda: attnsel.attention(q, k, v, backend=backend)}
        qh, kh, vh = (D._seq_to_heads(t, group, lens) for t in (qs, ks, vs))
        refs["ulysses_compute"] = lambda: attnsel.attention(qh, kh, vh, backend=backend)
        comm_ms, _ = timed(lambda: ulysses_comm(qs, ks, vs, group, lens), reps, warmup, device)
        if args.qkv_comparisons:
            sep_ms, _ = timed(lambda: qkv_separate_comm(qs, ks, vs, group, lens), reps, warmup, device)
            stacked_ms, _ = timed(lambda: qkv_stacked_comm(qs, ks, vs, group, lens), reps, warmup, device)
            row["qkv_in_comm_ms"] = {"three_all_to_alls": sep_ms, "one_stacked_all_to_all": stacked_ms}

        variants = []  # (meta, fn, comm alone ms, the reference its compute alone is)

        def ulysses(chunks, transport_, copy_2d=True):
            def fn():
                D._COPY_2D = copy_2d
                try:
                    return D.ulysses_attention(qs, ks, vs, backend=backend, shard_lengths=lens,
                                               chunks=chunks or None, transport=transport_)
                finally:
                    D._COPY_2D = True
            return fn

        for chunks in _ints(args.chunks):
            variants.append(({"kind": "ulysses", "transport": "nccl", "chunks": chunks},
                             ulysses(chunks, "nccl"), comm_ms, "ulysses_compute"))
        if transport == "copy_engine":
            default = D.copy_engine_chunks(s)
            refs[f"ulysses_compute_{default}_chunks"] = lambda: ulysses_chunked_compute(
                qs, ks, vs, group, lens, default, backend, (qh, kh, vh))
            refs[f"ulysses_compute_{default}_chunks_on_buffer"] = lambda: ulysses_chunked_compute(
                qs, ks, vs, group, lens, default, backend)
            refs[f"ulysses_compute_{default}_chunks_beside_exchange"] = lambda: ulysses_compute_beside_exchange(
                qs, ks, vs, group, lens, default, backend, (qh, kh, vh))
            for chunks in _ints(args.ce_chunks):
                count = chunks or default
                ce_ms, _ = timed(lambda: ulysses_ce_comm(qs, ks, vs, group, lens, count), reps, warmup,  # noqa
                                 device)
                meta = {"kind": "ulysses", "transport": "copy_engine", "chunks": count, "default": count == default}
                variants.append((meta, ulysses(chunks, "copy_engine"), ce_ms, "ulysses_compute"))
            for chunks in _ints(args.row_copy_chunks):
                D._COPY_2D = False
                ce_ms, _ = timed(lambda: ulysses_ce_comm(qs, ks, vs, group, lens, chunks), reps, warmup,  # noqa
                                 device)
                D._COPY_2D = True
                variants.append(({"kind": "ulysses", "transport": "copy_engine", "chunks": chunks,
                                  "copies": "one per head"}, ulysses(chunks, "copy_engine", False), ce_ms,
                                 "ulysses_compute"))
        else:
            row["variants"].append({"kind": "ulysses", "transport": "copy_engine", "not_measurable": transport})

        if ring_backend is None:
            row["variants"].append({"kind": "ring", "not_measurable": ring_reason})
            say(f"  ring: not measurable: {ring_reason}")
        else:
            blocks = [(kb.contiguous(), vb.contiguous()) for kb, vb in zip(k.split(lens, 2), v.split(lens, 2))]
            refs["ring_compute"] = lambda: ring_compute(qs, blocks, ring_backend)
            parts = [attnsel.attention(qs, kb, vb, backend=ring_backend, return_lse=True) for kb, vb in blocks]
            merge_ms, _ = timed(lambda: D._merge(*parts[0], *parts[1], q.dtype), reps, warmup, device)
            del parts
            row["ring_merge_alone_ms"] = merge_ms

            def ring(transport_, last_chunks=None):
                def fn():
                    saved = D.RING_LAST_CHUNKS
                    D.RING_LAST_CHUNKS = last_chunks or saved
                    try:
                        return D.ring_attention(qs, ks, vs, backend=ring_backend, shard_lengths=lens,
                                                transport=transport_)
                    finally:
                        D.RING_LAST_CHUNKS = saved
                return fn

            nccl_ms, _ = timed(lambda: ring_comm(ks, vs, group), reps, warmup, device)
            variants.append(({"kind": "ring", "transport": "nccl"}, ring("nccl"), nccl_ms, "ring_compute"))
            if transport == "copy_engine":
                ce_ms, _ = timed(lambda: ring_ce_comm(ks, vs, group, lens), reps, warmup, device)
                for chunks in _ints(args.ring_chunks):
                    variants.append(({"kind": "ring", "transport": "copy_engine", "last_block_chunks": chunks,
                                      "default": chunks == D.RING_LAST_CHUNKS}, ring("copy_engine", chunks), ce_ms,
                                     "ring_compute"))

        diffs = []
        for meta, fn, _, _ in variants:
            out = fn()
            err = (out.float() - full_out[:, :, lo:lo + lens[rank]].float()).abs().max()
            dist.all_reduce(err, op=dist.ReduceOp.MAX)
            diffs.append(err.item())
        ref_rounds = {key: ([], []) for key in refs}
        results = [([], []) for _ in variants]
        for _ in range(rounds):  # every round: the references, then every variant
            for key, fn in refs.items():
                for store, value in zip(ref_rounds[key], timed(fn, reps, warmup, device)):
                    store.append(value)
            for (meta, fn, _, _), (mine, worst) in zip(variants, results):
                ms, w = timed(fn, reps, warmup, device)
                mine.append(ms)
                worst.append(w)
        one_rounds, one_slowest = ref_rounds["one_gpu"]
        one_ms = statistics.median(one_rounds)
        row.update({"one_gpu_ms": one_ms, "one_gpu_ms_rounds": one_rounds,
                    "one_gpu_slowest_gpu_ms_rounds": one_slowest, "one_gpu_tflops": flops / one_ms / 1e9,
                    "compute_alone_slowest_rank_ms_rounds": {key: ref_rounds[key][1] for key in refs
                                                             if key != "one_gpu"}})
        say(f"{name} {b}x{h}x{s}x{d}: 1 GPU {one_ms:.2f} ms ({flops / one_ms / 1e9:.0f} TFLOP/s; slowest GPU "
            f"{statistics.median(one_slowest):.2f}), {rounds} rounds x {reps} calls; compute alone: " + ", ".join(
                f"{key} {statistics.median(ref_rounds[key][1]):.2f} ms" for key in refs if key != "one_gpu"))
        for (meta, fn, comm_alone, ref), (mine, worst), diff in zip(variants, results, diffs):
            entry = {**meta, **_summary(one_rounds, mine, worst)}
            vs_slowest = [one / w for one, w in zip(one_slowest, worst)]
            compute_alone = statistics.median(ref_rounds[ref][1])
            exposed = [w - c for w, c in zip(worst, ref_rounds[ref][1])]
            entry.update({"speedup_vs_slowest_gpu": statistics.median(vs_slowest),
                          "tflops": flops / entry["max_rank_ms"] / 1e9, "comm_alone_ms": comm_alone,
                          "compute_alone_ms": compute_alone, "comm_share": comm_alone / entry["max_rank_ms"],
                          "exposed_ms": statistics.median(exposed), "max_abs_diff_vs_one_gpu": diff})
            row["variants"].append(entry)
            label = " ".join(f"{k_}={v_}" for k_, v_ in meta.items() if k_ != "kind")
            say(f"  {meta['kind']} {label}: {entry['max_rank_ms']:.2f} ms, speedup {entry['speedup']:.3f}x "
                f"[{entry['speedup_min']:.3f}, {entry['speedup_max']:.3f}] (vs the slowest GPU "
                f"{entry['speedup_vs_slowest_gpu']:.3f}x), comm alone {comm_alone:.2f} ms "
                f"({100 * entry['comm_share']:.1f}%), exposed {entry['exposed_ms']:.2f} ms, max|diff| {diff:.3g}")

        if args.trace and device.type == "cuda" and not rows:  # the first shape only
            os.makedirs(args.trace, exist_ok=True)
            picks = {"ulysses": ulysses(0, "copy_engine")}
            if ring_backend is not None and transport == "copy_engine":
                picks["ring"] = ring("copy_engine")
            for kind, fn in picks.items():
                fn()
                torch.cuda.synchronize()
                with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                        torch.profiler.ProfilerActivity.CUDA]) as prof:
                    for _ in range(3):
                        fn()
                    torch.cuda.synchronize()
                prof.export_chrome_trace(os.path.join(args.trace, f"{name}_{kind}_rank{rank}.json"))
        rows.append(row)
        del q, k, v, qs, ks, vs, full_out, qh, kh, vh, refs
        if ring_backend is not None:
            del blocks
        if device.type == "cuda":
            torch.cuda.empty_cache()

    if rank == 0 and args.out:
        env = _environment(device, world, transport, args.label)
        with open(args.out, "w") as f:
            json.dump({"environment": env, "method": __doc__.split("\n\n", 2)[2], "results": rows}, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
