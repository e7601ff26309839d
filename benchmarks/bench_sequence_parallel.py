"""Sequence-parallel attention forward on N GPUs vs the same backend on one GPU, same run: Ulysses and ring.

    torchrun --nproc-per-node 2 benchmarks/bench_sequence_parallel.py --backend torch_sdpa --out sp.json

Per shape (bf16): the one-GPU time of attnsel.attention on the whole sequence (every rank runs it on its own GPU at
once; rank 0's median is reported), then each sequence-parallel variant on (B, H, S/N, D) shards. For each variant
also: the communication alone (the same all-to-alls / send-recvs, no attention) and the local compute alone (the
same attention calls on already-exchanged data, no communication); `comm_share` = communication alone / total,
`exposed_ms` = total - compute alone (what overlapping did not hide). Timing: warm-up, then --reps calls back to
back, CUDA events around each call on rank 0, median; `max_rank_ms` is the slowest rank's median.
TFLOP/s = 4*B*H*S*S*D / time. Ring needs a backend that returns the log-sum-exp; without one it is reported as not
measurable, with the reason.
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


def ring_compute(q, blocks, backend):
    """The ring's local work alone: one attention with LSE per block, merged in fp32."""
    acc = lse_acc = None
    for kb, vb in blocks:
        out, lse = attnsel.attention(q, kb, vb, backend=backend, return_lse=True)
        acc, lse_acc = D._merge(acc, lse_acc, out, lse)
    return acc.to(q.dtype)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backend", default="torch_sdpa", help="Ulysses' local backend (default: %(default)s)")
    ap.add_argument("--ring-backend", default="native",
                    help="ring's local backend: must return the log-sum-exp (default: %(default)s)")
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="cpu: gloo, for a smoke test")
    ap.add_argument("--shapes", default="wan-14b,hunyuanvideo", help="comma-separated: " + ", ".join(SHAPES))
    ap.add_argument("--chunks", default="1,2,4", help="Ulysses head chunks to try (default: %(default)s)")
    ap.add_argument("--reps", type=int, default=0, help="timed calls per variant (default: by shape)")
    ap.add_argument("--high-priority", action="store_true",
                    help="NCCL on high-priority streams (its blocks go ahead of queued attention blocks)")
    ap.add_argument("--out", help="JSON file (rank 0 writes it)")
    args = ap.parse_args()

    if args.device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    if device.type == "cuda":
        options = dist.ProcessGroupNCCL.Options()
        options.is_high_priority_stream = args.high_priority
        dist.init_process_group("nccl", pg_options=options)
    else:
        dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    group = dist.group.WORLD
    dtype = torch.bfloat16
    backend = args.backend

    def say(*a):
        if rank == 0:
            print(*a, flush=True)

    try:
        ring_backend, ring_reason = D._lse_backend(args.ring_backend, torch.empty(1, 1, 1, 128, device=device,
                                                                                  dtype=dtype), "ring_attention"), None
    except ValueError as err:
        ring_backend, ring_reason = None, str(err)

    rows = []
    for name in args.shapes.split(","):
        b, h, s, d = SHAPES[name]
        flops = 4 * b * h * s * s * d
        reps = args.reps or (20 if s < 60000 else 6)
        warmup = 3
        gen = torch.Generator(device=device).manual_seed(0)
        q, k, v = (torch.randn(b, h, s, d, device=device, dtype=dtype, generator=gen) for _ in range(3))
        lens = D.shard_lengths(s, world)
        lo = sum(lens[:rank])
        qs, ks, vs = (t[:, :, lo:lo + lens[rank]].contiguous() for t in (q, k, v))

        one_ms, one_worst = timed(lambda: attnsel.attention(q, k, v, backend=backend), reps, warmup, device)
        full_out = attnsel.attention(q, k, v, backend=backend)
        row = {"shape": name, "B": b, "H": h, "S": s, "D": d, "dtype": "bf16", "processes": world,
               "device": device.type, "backend": backend, "nccl_high_priority": args.high_priority,
               "one_gpu_ms": one_ms, "one_gpu_tflops": flops / one_ms / 1e9, "variants": []}
        say(f"{name} {b}x{h}x{s}x{d}: 1 GPU {one_ms:.2f} ms ({flops / one_ms / 1e9:.0f} TFLOP/s)")

        # Ulysses: compute alone = the local attention on (B, H/N, S, D); communication alone = the 4 all-to-alls.
        qh, kh, vh = (D._seq_to_heads(t, group, lens) for t in (qs, ks, vs))
        compute_ms, _ = timed(lambda: attnsel.attention(qh, kh, vh, backend=backend), reps, warmup, device)
        comm_ms, _ = timed(lambda: ulysses_comm(qs, ks, vs, group, lens), reps, warmup, device)
        del qh, kh, vh
        for chunks in (int(c) for c in args.chunks.split(",")):
            fn = lambda: D.ulysses_attention(qs, ks, vs, backend=backend, shard_lengths=lens, chunks=chunks)  # noqa
            out = fn()
            err = (out.float() - full_out[:, :, lo:lo + lens[rank]].float()).abs().max()
            dist.all_reduce(err, op=dist.ReduceOp.MAX)
            ms, worst = timed(fn, reps, warmup, device)
            variant = {"kind": "ulysses", "chunks": chunks, "ms": ms, "max_rank_ms": worst,
                       "speedup": one_ms / worst, "tflops": flops / worst / 1e9, "comm_alone_ms": comm_ms,
                       "compute_alone_ms": compute_ms, "comm_share": comm_ms / worst,
                       "exposed_ms": worst - compute_ms, "max_abs_diff_vs_one_gpu": err.item()}
            row["variants"].append(variant)
            say(f"  ulysses chunks={chunks}: {worst:.2f} ms, speedup {one_ms / worst:.3f}x, comm alone "
                f"{comm_ms:.2f} ms ({100 * comm_ms / worst:.1f}%), compute alone {compute_ms:.2f} ms, "
                f"exposed {worst - compute_ms:.2f} ms, max|diff| {err.item():.3g}")

        if ring_backend is None and ring_reason is not None:
            row["variants"].append({"kind": "ring", "not_measurable": ring_reason})
            say(f"  ring: not measurable: {ring_reason}")
        else:
            blocks = [(kb.contiguous(), vb.contiguous()) for kb, vb in zip(k.split(lens, 2), v.split(lens, 2))]
            compute_ms, _ = timed(lambda: ring_compute(qs, blocks, ring_backend), reps, warmup, device)
            comm_ms, _ = timed(lambda: ring_comm(ks, vs, group), reps, warmup, device)
            del blocks
            fn = lambda: D.ring_attention(qs, ks, vs, backend=ring_backend, shard_lengths=lens)  # noqa: E731
            out = fn()
            err = (out.float() - full_out[:, :, lo:lo + lens[rank]].float()).abs().max()
            dist.all_reduce(err, op=dist.ReduceOp.MAX)
            ms, worst = timed(fn, reps, warmup, device)
            row["variants"].append({"kind": "ring", "backend": str(ring_backend), "ms": ms, "max_rank_ms": worst,
                                    "speedup": one_ms / worst, "tflops": flops / worst / 1e9,
                                    "comm_alone_ms": comm_ms, "compute_alone_ms": compute_ms,
                                    "comm_share": comm_ms / worst, "exposed_ms": worst - compute_ms,
                                    "max_abs_diff_vs_one_gpu": err.item()})
            say(f"  ring: {worst:.2f} ms, speedup {one_ms / worst:.3f}x, comm alone {comm_ms:.2f} ms "
                f"({100 * comm_ms / worst:.1f}%), compute alone {compute_ms:.2f} ms, exposed "
                f"{worst - compute_ms:.2f} ms, max|diff| {err.item():.3g}")
        rows.append(row)
        del q, k, v, qs, ks, vs, full_out
        torch.cuda.empty_cache()

    if rank == 0 and args.out:
        cuda = device.type == "cuda"
        env = {"gpu": torch.cuda.get_device_name() if cuda else platform.processor(), "processes": world,
               "torch": torch.__version__, "cuda": torch.version.cuda,
               "nccl": ".".join(map(str, torch.cuda.nccl.version())) if cuda else None,
               "attnsel": attnsel.__version__, "python": platform.python_version(),
               "nvls_env": {n: os.environ.get(n) for n in ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST",
                                                           "NVSHMEM_DISABLE_NVLS")}}
        with open(args.out, "w") as f:
            json.dump({"environment": env, "method": __doc__.split("\n\n", 2)[2], "results": rows}, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
