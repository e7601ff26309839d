"""Sequence-parallel attention over torch.distributed: Ulysses, ring, and both (USP).

Every function takes (B, H, S_local, D) shards of a sequence split over the ranks of a process group (rank i holds
the i-th piece, in order) and returns this rank's shard of the output. The attention itself runs through
`attnsel.attention` on the backend the caller (or the layer's policy) chose; `None` is the task's policy, as for
attnsel.attention, and `auto` plans each call on the local shapes.

- Ulysses: an all-to-all turns sequence shards into head shards (each rank: the whole sequence, H/U heads), plain
  attention runs there (so causal and masks are the single-process ones), a second all-to-all turns it back. Needs
  H and H_kv divisible by the Ulysses degree. `chunks=` cuts the heads so that one chunk's exchange can run
  while another chunk's attention computes (default: `copy_engine_chunks(S)` on the copy engines; 1 over NCCL,
  where chunking measured slower on 2 H200s, NCCL's kernels and the attention kernel competing for the SMs).
- Ring: K/V shards travel around the ring while each rank attends its queries to the block it holds; the partial
  results are merged with their log-sum-exp in fp32. The next block's transfer runs during the current block's
  attention. Needs a backend that returns the log-sum-exp (`attnsel.attention(..., return_lse=True)`).
- USP: Ulysses inside groups of `ulysses_degree` ranks, ring across them. Rank layout of a world of U*R ranks:
  rank w = ring_rank * U + ulysses_rank (Ulysses groups are consecutive ranks, e.g. the GPUs of one node), and
  rank w holds sequence shard w.

Uneven lengths: shards may have unequal lengths (`shard_lengths(S, P)` splits as evenly as possible, the first
S % P ranks one token longer); every length must be >= 1. The lengths are exchanged with one small all-gather per
call unless `shard_lengths=` gives them. Masks: key-padding only, sharded with the keys, (B, S_local) or
(B, 1, 1, S_local), bool (True = attend) or additive; causal is top-left aligned over the global positions.

Transport (`transport=` or ATTNSEL_SP_TRANSPORT: auto, nccl, copy_engine): on CUDA with an NCCL group of one host,
`auto` moves the data with the GPUs' copy engines through torch.distributed's symmetric memory (no SMs taken from
the attention), else with the group's collectives (NCCL, gloo); the gradient path of Ulysses always uses the
collectives. Calls on one group are expected one at a time, in the same order on every rank (as collectives are).

Autograd: Ulysses is differentiable when the local backend is (the all-to-alls have exact adjoints). Ring and USP
with ring_degree > 1 are forward-only and raise ValueError for inputs that require grad while grad mode is on.

NVLink multicast (NVLS) is kept off in every process that imports attnsel: NCCL_NVLS_ENABLE=0,
TORCH_SYMM_MEM_DISABLE_MULTICAST=1 and NVSHMEM_DISABLE_NVLS=1 are set here when unset, before any process group.
"""

from __future__ import annotations

import os

for _name, _value in (("NCCL_NVLS_ENABLE", "0"), ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"),
                      ("NVSHMEM_DISABLE_NVLS", "1")):
    os.environ.setdefault(_name, _value)

import contextlib  # noqa: E402
import ctypes  # noqa: E402
import contextvars  # noqa: E402
import math  # noqa: E402
import socket  # noqa: E402
import threading  # noqa: E402
import warnings  # noqa: E402
from typing import Callable, Sequence  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from .backends import Backend, to_backend  # noqa: E402
from .ops import _OP, AUTO  # noqa: E402
from .ops import attention as _public_attention  # noqa: E402

__all__ = [
    "TRANSPORTS",
    "SequenceParallel",
    "active",
    "ring_attention",
    "sequence_parallel",
    "shard_lengths",
    "transport_in_use",
    "copy_engine_chunks",
    "ulysses_attention",
    "usp_attention",
]

_ACTIVE: contextvars.ContextVar["SequenceParallel | None"] = contextvars.ContextVar("attnsel_sp", default=None)
# Scopes entered anywhere in the process: while none is, active() reads only this int, which torch.compile traces
# (it cannot trace ContextVar.get: inside a scope, a compiled attnsel.nn.Attention breaks the graph there).
_ENTERED = 0
_ENTERED_LOCK = threading.Lock()


def active() -> "SequenceParallel | None":
    """The sequence-parallel setting of the current `sequence_parallel(...)` scope, or None outside one."""
    return _ACTIVE.get() if _ENTERED else None


def shard_lengths(length: int, parts: int) -> list[int]:
    """How `length` tokens are split over `parts` ranks: as evenly as possible, the first length % parts longer."""
    if parts < 1 or length < parts:
        raise ValueError(f"attnsel.distributed: cannot split a sequence of {length} tokens over {parts} ranks "
                         f"(every rank needs at least one token)")
    base, extra = divmod(length, parts)
    return [base + (i < extra) for i in range(parts)]


# -- small helpers -----------------------------------------------------------------------------------------------
def _attend(q, k, v, attn_mask=None, is_causal=False, scale=None, backend=None, return_lse=False):
    """attnsel.attention, where `backend` may also be `AUTO` (a layer whose policy is auto: plan this call)."""
    if type(backend) is int and backend == AUTO:
        out = _OP(q, k, v, attn_mask, is_causal, scale, AUTO, return_lse)
        return out if return_lse else out[0]
    return _public_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale, backend=backend,
                             return_lse=return_lse)


def _group_size(group) -> int:
    return dist.get_world_size(group)


def _comm_device(group, like: torch.Tensor) -> torch.device:
    return like.device if dist.get_backend(group) == "nccl" else torch.device("cpu")


def _check_qkv(q, k, v, where: str) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"attnsel.distributed.{where}: {name} must be a 4-d (batch, heads, seq_local, head_dim) "
                             f"tensor")
    if k.shape[2] != v.shape[2] or k.shape[1] != v.shape[1]:
        raise ValueError(f"attnsel.distributed.{where}: k {tuple(k.shape)} and v {tuple(v.shape)} must have the same "
                         f"heads and length")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"attnsel.distributed.{where}: k/v heads ({k.shape[1]}) must divide q heads ({q.shape[1]})")


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _forward_only(where: str, *tensors) -> None:
    if _needs_grad(*tensors):
        raise ValueError(f"attnsel.distributed.{where} is forward-only (no backward pass for the ring's log-sum-exp "
                         f"merge): run it under torch.no_grad(), or use ulysses_attention (ring_degree=1), which is "
                         f"differentiable")


def _key_padding(mask: torch.Tensor | None, batch: int, length: int, where: str) -> torch.Tensor | None:
    """A key-padding mask as (B or 1, S_local), or a ValueError naming the accepted shapes."""
    if mask is None:
        return None
    ok = mask.dim() == 2 or (mask.dim() == 4 and mask.shape[1] == 1 and mask.shape[2] == 1)
    if not ok or mask.shape[-1] != length or mask.shape[0] not in (1, batch):
        raise ValueError(f"attnsel.distributed.{where}: attn_mask must be a key-padding mask sharded with the keys, "
                         f"(B, S_local) or (B, 1, 1, S_local) with S_local={length} and B in (1, {batch}); got "
                         f"{tuple(mask.shape)}")
    return mask.reshape(mask.shape[0], length)


def _gather_lengths(group, like: torch.Tensor, nq: int, nk: int) -> tuple[list[int], list[int]]:
    """Every rank's (q, k/v) local lengths, in group rank order: one all-gather of two ints."""
    size = _group_size(group)
    dev = _comm_device(group, like)
    mine = torch.tensor([nq, nk], dtype=torch.int64, device=dev)
    parts = [torch.empty_like(mine) for _ in range(size)]
    dist.all_gather(parts, mine, group=group)
    both = torch.stack(parts).tolist()
    q_lens, k_lens = [p[0] for p in both], [p[1] for p in both]
    if min(q_lens) < 1 or min(k_lens) < 1:
        raise ValueError(f"attnsel.distributed: every rank needs at least one token (q lengths {q_lens}, "
                         f"k/v lengths {k_lens})")
    return q_lens, k_lens


def _resolve_lengths(group, like, nq, nk, given, where) -> tuple[list[int], list[int]]:
    if given is None:
        return _gather_lengths(group, like, nq, nk)
    given = [int(n) for n in given]
    rank = dist.get_rank(group)
    if len(given) != _group_size(group) or nq != nk or given[rank] != nq or min(given) < 1:
        raise ValueError(f"attnsel.distributed.{where}: shard_lengths must list every rank's local length (self-"
                         f"attention: q and k/v sharded alike), {_group_size(group)} positive ints with this rank's "
                         f"entry {nq} (k/v local length {nk}); got {given}")
    return given, given


def _gather_key_padding(mask: torch.Tensor | None, group, k_lens: Sequence[int]) -> torch.Tensor | None:
    """All-gather (B', S_local) key-padding shards into (B', 1, 1, S) (padded to the longest shard, then cut)."""
    if mask is None:
        return None
    bool_mask = mask.dtype == torch.bool
    wire = mask.to(torch.uint8) if bool_mask else mask
    longest = max(k_lens)
    if wire.shape[1] < longest:
        wire = torch.nn.functional.pad(wire, (0, longest - wire.shape[1]))
    dev = _comm_device(group, mask)
    wire = wire.to(dev).contiguous()
    parts = [torch.empty_like(wire) for _ in k_lens]
    dist.all_gather(parts, wire, group=group)
    full = torch.cat([p[:, :n] for p, n in zip(parts, k_lens)], dim=1).to(mask.device)
    full = full.bool() if bool_mask else full
    return full[:, None, None, :]


# -- Ulysses -------------------------------------------------------------------------------------------------------
class _Pending:
    """An in-flight collective and the function that turns its receive buffer into the result."""

    def __init__(self, work, finish: Callable[[], torch.Tensor]):
        self.work, self.finish = work, finish

    def wait(self) -> torch.Tensor:
        if self.work is not None:
            self.work.wait()
        return self.finish()


def _start_seq_to_heads(x: torch.Tensor, group, lens: Sequence[int], h0: int, h1: int) -> _Pending:
    """(B, H, S_local, D) -> (B, h1-h0, S, D): heads [h0, h1) of every rank's head block, the whole sequence."""
    size = len(lens)
    b, h, n, d = x.shape
    hc = h1 - h0
    send = x.unflatten(1, (size, h // size))[:, :, h0:h1].transpose(0, 1).contiguous()  # (U, B, hc, S_local, D)
    recv_sizes = [b * hc * s * d for s in lens]
    recv = x.new_empty(sum(recv_sizes))
    work = dist.all_to_all_single(recv, send.view(-1), recv_sizes, [b * hc * n * d] * size, group=group,
                                  async_op=True)
    return _Pending(work, lambda: torch.cat([c.view(b, hc, s, d) for c, s in zip(recv.split(recv_sizes), lens)], 2))


def _start_heads_to_seq(y: torch.Tensor, group, lens: Sequence[int], rank: int) -> _Pending:
    """(B, hc, S, Dv) -> (U, B, hc, S_local, Dv): every rank's same head chunk for this rank's tokens."""
    size = len(lens)
    b, hc, _, d = y.shape
    send, off = y.new_empty(y.numel()), 0
    for part, s in zip(y.split(list(lens), dim=2), lens):  # one copy per destination, straight into the buffer
        send[off:off + b * hc * s * d].view(b, hc, s, d).copy_(part)
        off += b * hc * s * d
    recv = y.new_empty(size * b * hc * lens[rank] * d)
    work = dist.all_to_all_single(recv, send, [b * hc * lens[rank] * d] * size, [b * hc * s * d for s in lens],
                                  group=group, async_op=True)
    return _Pending(work, lambda: recv.view(size, b, hc, lens[rank], d))


def _seq_to_heads(x, group, lens):
    return _start_seq_to_heads(x, group, lens, 0, x.shape[1] // len(lens)).wait()


def _heads_to_seq(y, group, lens, rank):
    parts = _start_heads_to_seq(y, group, lens, rank).wait()  # (U, B, hu, S_local, Dv)
    return parts.transpose(0, 1).flatten(1, 2)


class _SeqToHeads(torch.autograd.Function):
    # The all-to-all is a permutation of the elements over the ranks: its adjoint is the inverse all-to-all.
    @staticmethod
    def forward(ctx, x, group, lens, rank):
        ctx.group, ctx.lens, ctx.rank = group, lens, rank
        return _seq_to_heads(x, group, lens)

    @staticmethod
    def backward(ctx, grad):
        return _heads_to_seq(grad.contiguous(), ctx.group, ctx.lens, ctx.rank), None, None, None


class _HeadsToSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, group, lens, rank):
        ctx.group, ctx.lens = group, lens
        return _heads_to_seq(y, group, lens, rank)

    @staticmethod
    def backward(ctx, grad):
        return _seq_to_heads(grad.contiguous(), ctx.group, ctx.lens), None, None, None


LocalFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


def _ulysses(q, k, v, mask, group, q_lens, k_lens, local: LocalFn, chunks: int | None, mem=None):
    size, rank = len(q_lens), dist.get_rank(group)
    b, h, _, _ = q.shape
    hkv = k.shape[1]
    if h % size or hkv % size:
        raise ValueError(f"attnsel.distributed: Ulysses degree {size} must divide the q heads ({h}) and k/v heads "
                         f"({hkv}); use a ring degree for the rest (e.g. ulysses_degree=1, ring_degree={size}, or "
                         f"usp_attention with a Ulysses degree that divides both)")
    full_mask = _gather_key_padding(mask, group, k_lens)
    if _needs_grad(q, k, v):
        qh = _SeqToHeads.apply(q, group, q_lens, rank)
        kh = _SeqToHeads.apply(k, group, k_lens, rank)
        vh = _SeqToHeads.apply(v, group, k_lens, rank)
        return _HeadsToSeq.apply(local(qh, kh, vh, full_mask), group, q_lens, rank)
    if mem is not None:
        return _ulysses_copy_engine(q, k, v, full_mask, mem, rank, q_lens, k_lens, local,
                                    copy_engine_chunks(sum(q_lens)) if chunks is None else chunks)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    hkv_u, group_size = hkv // size, h // hkv
    n = max(1, min(chunks or 1, hkv_u))
    bounds = [(hkv_u * i // n, hkv_u * (i + 1) // n) for i in range(n)]
    # Launch every chunk's input all-to-alls up front (they queue on the communication stream in order), then
    # compute chunk by chunk, sending each output back while the next chunk computes.
    inputs = [(_start_seq_to_heads(q, group, q_lens, k0 * group_size, k1 * group_size),
               _start_seq_to_heads(k, group, k_lens, k0, k1), _start_seq_to_heads(v, group, k_lens, k0, k1))
              for k0, k1 in bounds]
    outputs = []
    for pq, pk, pv in inputs:
        outputs.append(_start_heads_to_seq(local(pq.wait(), pk.wait(), pv.wait(), full_mask), group, q_lens, rank))
    if n == 1:  # (U, B, hu, S_local, Dv) -> (B, H, S_local, Dv): a view when B == 1
        return outputs[0].wait().transpose(0, 1).reshape(b, h, q_lens[rank], v.shape[3])
    out = q.new_empty(b, h, q_lens[rank], v.shape[3])
    blocks = out.unflatten(1, (size, h // size))  # (B, U, hu, S_local, Dv), a view of out
    for (k0, k1), pending in zip(bounds, outputs):
        blocks[:, :, k0 * group_size:k1 * group_size].copy_(pending.wait().transpose(0, 1))
    return out


# -- copy-engine transport ------------------------------------------------------------------------------------------
# On one host, torch.distributed's symmetric memory maps every rank's buffer into every process: a contiguous copy_
# into a peer's buffer is a cudaMemcpy that the copy engines run over NVLink, with no SMs taken from the attention
# kernel (NCCL's all-to-all and send/recv are kernels that compete with it for the SMs; measured on 2 H200s, chunked
# pipelining over NCCL lost more than it hid). Each rank pushes what a peer needs into that peer's buffer, then a
# barrier (a one-block kernel on the same side stream) tells every rank its buffer is filled.
TRANSPORTS = ("auto", "nccl", "copy_engine")


def copy_engine_chunks(seq_len: int) -> int:
    """Ulysses' default head chunks on the copy engines for a sequence of seq_len tokens (over NCCL: 1).

    Measured on 2 H200s (benchmarks/results/sequence_parallel_h200x2.json): Wan-14B's 32760 tokens ran fastest in 6
    chunks (of 1, 2, 4, 6, 8: 19.11, 18.93, 18.72, 18.56, 18.60 ms), HunyuanVideo's 118800 unchunked (there the
    exchange is 1.5% of the call and chunking cost more than it hid). The threshold between them is a guess.
    """
    return 6 if seq_len <= 65536 else 1


def _transport(transport, where: str) -> str:
    value = transport if transport is not None else os.environ.get("ATTNSEL_SP_TRANSPORT", "auto")
    if value not in TRANSPORTS:
        raise ValueError(f"attnsel.distributed.{where}: transport must be one of {', '.join(TRANSPORTS)} (or the "
                         f"ATTNSEL_SP_TRANSPORT environment variable, default auto); got {value!r}")
    return value


class _PeerMemory:
    """One symmetric buffer per (group, GPU), grown on demand, and the streams the copy-engine paths use.

    `view(rank, offset, shape, dtype)` is a tensor over `rank`'s buffer (this rank's own or a peer's, mapped here);
    `barrier()` waits, on the current stream, until every rank of the group has reached its barrier.
    """

    def __init__(self, group, device: torch.device):
        from torch.distributed import _symmetric_memory as symm

        self._symm, self.group, self.device = symm, group, device
        self.rank = dist.get_rank(group)
        self.comm_stream = torch.cuda.Stream(device, priority=-1)  # its barriers and copies get SMs/CEs first
        self.copy_stream = torch.cuda.Stream(device, priority=-1)  # copies within this GPU, beside the pushes
        self.compute_stream = torch.cuda.Stream(device)  # every other chunk's attention: fills the last wave of one
        self.compute_stream2 = torch.cuda.Stream(device)  # with compute_stream: the ring's last block in chunks
        self.merge_stream = torch.cuda.Stream(device, priority=-1)  # the ring's merges of those chunks
        self.nbytes, self.buffer, self.handle = 0, None, None
        self.reserve(1 << 20)

    def reserve(self, nbytes: int) -> None:
        """Make the buffer at least nbytes (collective: every rank asks for the same size)."""
        if nbytes <= self.nbytes:
            return
        nbytes = -(-nbytes // (64 << 20)) * (64 << 20)
        if self.buffer is not None:  # nobody may still be copying into the old buffer: drain every GPU first
            torch.cuda.synchronize(self.device)
            flag = torch.ones(1, device=self.device)
            dist.all_reduce(flag, group=self.group)
            torch.cuda.synchronize(self.device)
        self.buffer = self.handle = None
        with warnings.catch_warnings():  # deprecated (and unneeded) in newer torch, needed in some older ones
            warnings.simplefilter("ignore")
            enable = getattr(self._symm, "enable_symm_mem_for_group", None)
            if enable is not None:
                enable(self.group.group_name)
        buffer = self._symm.empty(nbytes, dtype=torch.uint8, device=self.device)
        self.handle = self._symm.rendezvous(buffer, self.group)
        self.buffer, self.nbytes = buffer, nbytes

    def view(self, rank: int, offset: int, shape, dtype) -> torch.Tensor:
        return self.handle.get_buffer(rank, list(shape), dtype, offset // _itemsize(dtype))

    def barrier(self) -> None:
        self.handle.barrier(channel=0)


_PEER: dict = {}
_PEER_REASON: dict = {}


def _itemsize(dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _peer_memory(group, like: torch.Tensor, transport: str, where: str) -> "_PeerMemory | None":
    """The group's copy-engine transport, or None for NCCL/gloo collectives.

    `auto` takes the copy engines where they work (CUDA tensors, an NCCL group of one host, symmetric memory that
    allocates and maps); `copy_engine` insists (ValueError with the reason otherwise); `nccl` never takes them.
    Deciding is collective the first time per (group, GPU): every rank tries, and all take it only if all could.
    """
    if transport == "nccl":
        return None
    reason = None
    if not like.is_cuda or dist.get_backend(group) != "nccl":
        reason = "needs CUDA tensors and an NCCL group"
    else:
        key = (group.group_name, like.device.index)
        if key not in _PEER and key not in _PEER_REASON:
            mem, why = None, None
            hosts = [None] * _group_size(group)
            dist.all_gather_object(hosts, socket.gethostname(), group=group)
            if len(set(hosts)) > 1:
                why = "the group spans several hosts (symmetric memory maps peers of one host)"
            else:
                try:
                    mem = _PeerMemory(group, like.device)
                except Exception as err:  # noqa: BLE001 - any failure means: not here; NCCL serves instead
                    why = f"symmetric memory unavailable ({type(err).__name__}: {err})"
            ok = torch.tensor([mem is not None], dtype=torch.int32, device=like.device)
            dist.all_reduce(ok, op=dist.ReduceOp.MIN, group=group)
            if ok.item():
                _PEER[key] = mem
            else:
                _PEER_REASON[key] = why or "symmetric memory unavailable on another rank"
        if key in _PEER:
            return _PEER[key]
        reason = _PEER_REASON[key]
    if transport == "copy_engine":
        raise ValueError(f"attnsel.distributed.{where}: transport='copy_engine' is not available here: {reason}; "
                         f"use transport='auto' (falls back to NCCL) or 'nccl'")
    return None


def transport_in_use(group=None, device=None) -> str:
    """Which transport `auto` took for the group on this GPU: 'copy_engine', 'nccl (why)' or 'undecided'."""
    group = group or dist.group.WORLD
    index = torch.cuda.current_device() if device is None else torch.device(device).index
    key = (group.group_name, index)
    if key in _PEER:
        return "copy_engine"
    return f"nccl ({_PEER_REASON[key]})" if key in _PEER_REASON else "undecided"


def _on(stream):
    return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()


def _record(stream):
    if stream is None:
        return None
    event = torch.cuda.Event()
    event.record(stream)
    return event


def _wait(stream, event) -> None:
    if stream is not None and event is not None:
        stream.wait_event(event)


class _Layout:
    """Byte offsets of named regions in every rank's buffer (the same on every rank: sizes from global shapes)."""

    def __init__(self, regions):
        self.offsets, end = {}, 0
        for name, shape, dtype in regions:
            self.offsets[name] = (end, tuple(shape), dtype)
            end += -(-math.prod(shape) * _itemsize(dtype) // 256) * 256
        self.nbytes = end

    def view(self, mem, rank: int, name: str, shape=None) -> torch.Tensor:
        offset, full, dtype = self.offsets[name]
        return mem.view(rank, offset, shape or full, dtype)


class _Memcpy2D(ctypes.Structure):
    """The CUDA driver's CUDA_MEMCPY2D."""

    _fields_ = [("srcXInBytes", ctypes.c_size_t), ("srcY", ctypes.c_size_t), ("srcMemoryType", ctypes.c_int),
                ("srcHost", ctypes.c_void_p), ("srcDevice", ctypes.c_uint64), ("srcArray", ctypes.c_void_p),
                ("srcPitch", ctypes.c_size_t), ("dstXInBytes", ctypes.c_size_t), ("dstY", ctypes.c_size_t),
                ("dstMemoryType", ctypes.c_int), ("dstHost", ctypes.c_void_p), ("dstDevice", ctypes.c_uint64),
                ("dstArray", ctypes.c_void_p), ("dstPitch", ctypes.c_size_t), ("WidthInBytes", ctypes.c_size_t),
                ("Height", ctypes.c_size_t)]


_MEMCPY_2D: list = []  # [cuMemcpy2DAsync or None], looked up once
_MAX_PITCH = (1 << 31) - 1  # cudaDevAttrMaxPitch on current GPUs: wider pitches go row by row
_COPY_2D = True  # False: one copy per row (what the benchmark compares against)


def _memcpy_2d():
    if not _MEMCPY_2D:
        fn = None
        try:
            fn = ctypes.CDLL("libcuda.so.1").cuMemcpy2DAsync_v2
            fn.argtypes, fn.restype = [ctypes.POINTER(_Memcpy2D), ctypes.c_void_p], ctypes.c_int
        except (OSError, AttributeError):
            fn = None
        _MEMCPY_2D.append(fn)
    return _MEMCPY_2D[0]


def _rows_contiguous(x: torch.Tensor) -> torch.Tensor:
    """x with every (S, D) matrix contiguous (what `_copy_rows` moves in one piece): x itself when it is."""
    return x if x.stride(-1) == 1 and x.stride(-2) == x.shape[-1] else x.contiguous()


def _copy_rows(dst: torch.Tensor, src: torch.Tensor) -> None:
    """dst.copy_(src) for (rows, ...) tensors whose rows are each contiguous, on the current stream.

    On CUDA that is one 2-d copy (cuMemcpy2DAsync, a copy-engine transfer with a row pitch on each side) instead of
    one per row: at a Ulysses chunk of many heads, one transfer per peer and tensor rather than one per head.
    """
    rows = src.shape[0]
    if not src.is_cuda or rows == 1 or (dst.is_contiguous() and src.is_contiguous()):
        dst.copy_(src)
        return
    width = src[0].numel() * src.element_size()
    fn = _memcpy_2d() if _COPY_2D else None
    if (fn is None or not (src[0].is_contiguous() and dst[0].is_contiguous()) or src.dtype != dst.dtype
            or max(src.stride(0), dst.stride(0)) * src.element_size() > _MAX_PITCH):
        for i in range(rows):
            dst[i].copy_(src[i])
        return
    desc = _Memcpy2D(srcMemoryType=2, srcDevice=src.data_ptr(), srcPitch=src.stride(0) * src.element_size(),
                     dstMemoryType=2, dstDevice=dst.data_ptr(), dstPitch=dst.stride(0) * dst.element_size(),
                     WidthInBytes=width, Height=rows)  # 2 = CU_MEMORYTYPE_DEVICE
    err = fn(ctypes.byref(desc), ctypes.c_void_p(torch.cuda.current_stream(src.device).cuda_stream))
    if err:
        raise RuntimeError(f"attnsel.distributed: cuMemcpy2DAsync failed (CUDA driver error {err})")


def _chunk_bounds(heads: int, chunks: int) -> list[tuple[int, int]]:
    """Head chunks for the copy-engine pipeline: the first and last one head each (what is not overlapped: the
    first chunk's inputs arrive before any compute, the last chunk's output leaves after it), the rest even."""
    n = max(1, min(chunks, heads))
    if n <= 2:
        return [(heads * i // n, heads * (i + 1) // n) for i in range(n)]
    inner = heads - 2
    cuts = [0, 1] + [1 + inner * i // (n - 2) for i in range(1, n - 2)] + [heads - 1, heads]
    return list(zip(cuts[:-1], cuts[1:]))


def _ulysses_copy_engine(q, k, v, full_mask, mem, rank, q_lens, k_lens, local: LocalFn, chunks: int):
    """Ulysses over peer memory: chunk c's inputs are pushed while chunk c-1 computes, chunk c's output while
    chunk c+1 computes; consecutive chunks compute on two streams so one chunk's last wave overlaps the next's first.

    Every rank's buffer holds qh (B, H/U, S, D), kh and vh (B, Hkv/U, Sk, D/Dv) and out (B, H, max S_local, Dv).
    A chunk's heads for one peer are one 2-d transfer per tensor and batch entry (`_copy_rows`).
    """
    size = len(q_lens)
    b, h, nq, d = q.shape
    hkv, nk, dv = k.shape[1], k.shape[2], v.shape[3]
    hu, hkv_u, group_size = h // size, hkv // size, h // hkv
    s_q, s_k = sum(q_lens), sum(k_lens)
    q_off, k_off = sum(q_lens[:rank]), sum(k_lens[:rank])
    layout = _Layout([("q", (b, hu, s_q, d), q.dtype), ("k", (b, hkv_u, s_k, d), k.dtype),
                      ("v", (b, hkv_u, s_k, dv), v.dtype), ("out", (b, h, max(q_lens), dv), q.dtype)])
    mem.reserve(layout.nbytes)
    q, k, v = _rows_contiguous(q), _rows_contiguous(k), _rows_contiguous(v)
    current = torch.cuda.current_stream() if q.is_cuda else None
    comm, local_copy = mem.comm_stream, mem.copy_stream
    compute = [current, mem.compute_stream]
    peers = [{name: layout.view(mem, p, name) for name in ("q", "k", "v")} for p in range(size)]
    outs = [layout.view(mem, p, "out", (b, h, q_lens[p], dv)) for p in range(size)]
    mine = peers[rank]
    result = q.new_empty(b, h, nq, dv)
    bounds = _chunk_bounds(hkv_u, chunks)

    start = _record(current)
    for stream in (comm, local_copy, compute[1]):  # the caller's work on q, k, v and the mask comes first
        _wait(stream, start)
    with _on(comm):
        mem.barrier()  # every rank is done with its buffer from the previous call
    arrived = []
    for k0, k1 in bounds:  # chunk (k0, k1): heads p*hu + [k0*g, k1*g) of q, p*hkv_u + [k0, k1) of k/v to rank p
        h0, h1 = k0 * group_size, k1 * group_size
        for p in range(size):  # the own part on its own stream: beside the pushes (another copy engine)
            with _on(comm if p != rank else local_copy):
                for bi in range(b):
                    _copy_rows(peers[p]["q"][bi, h0:h1, q_off:q_off + nq], q[bi, p * hu + h0:p * hu + h1])
                    _copy_rows(peers[p]["k"][bi, k0:k1, k_off:k_off + nk], k[bi, p * hkv_u + k0:p * hkv_u + k1])
                    _copy_rows(peers[p]["v"][bi, k0:k1, k_off:k_off + nk], v[bi, p * hkv_u + k0:p * hkv_u + k1])
        _wait(comm, _record(local_copy))
        with _on(comm):
            mem.barrier()
            arrived.append(_record(comm))
    done = []
    for c, ((k0, k1), event) in enumerate(zip(bounds, arrived)):
        stream = compute[c % 2]
        _wait(stream, event)
        with _on(stream):
            y = local(mine["q"][:, k0 * group_size:k1 * group_size], mine["k"][:, k0:k1], mine["v"][:, k0:k1],
                      full_mask)
            for other in (comm, local_copy):
                if other is not None:
                    y.record_stream(other)
            done.append((y, _record(stream)))
    mine_out = outs[rank]
    for (k0, k1), (y, event) in zip(bounds, done):
        h0, h1 = k0 * group_size, k1 * group_size
        for p in range(size):  # this rank's heads rank*hu + [h0, h1) of rank p's tokens, into p's output
            stream = comm if p != rank else local_copy
            _wait(stream, event)
            lo = sum(q_lens[:p])
            dst = outs[p] if p != rank else result  # its own tokens straight into the result
            with _on(stream):
                for bi in range(b):
                    _copy_rows(dst[bi, rank * hu + h0:rank * hu + h1], y[bi, :, lo:lo + q_lens[p]])
        with _on(comm):
            mem.barrier()
            for r in range(size):  # the peers' heads, out of the shared buffer before the next call reuses it
                if r != rank:
                    for bi in range(b):
                        _copy_rows(result[bi, r * hu + h0:r * hu + h1], mine_out[bi, r * hu + h0:r * hu + h1])
    _wait(current, _record(comm))
    _wait(current, _record(local_copy))
    return result


RING_LAST_CHUNKS = 4  # the last block's head chunks: each merged while the next chunk's attention runs


def _ring_copy_engine(q, k, v, pad, mem, rank, q_lens, k_lens, is_causal, scale, backend):
    """The ring over peer memory: each step pushes the block a rank holds into the next rank's other slot (two
    slots, alternating) while the current block computes; block attentions alternate between two streams.

    The last block's attention runs in RING_LAST_CHUNKS head chunks (first and last of one k/v head, alternating
    between two side streams) and each chunk is merged into the result while the next computes, on a high-priority
    stream (at equal priority the running chunk's queued blocks go first and the merges wait for its end): only the
    last chunk's merge is left after the last attention (Wan-14B on an H200: the whole merge alone 0.27-0.29 ms).
    """
    size = len(q_lens)
    b, hkv, nk, d = k.shape
    dv = v.shape[3]
    g = q.shape[1] // hkv
    kmax = max(k_lens)
    pad_dtype = None if pad is None else (torch.uint8 if pad.dtype == torch.bool else pad.dtype)
    regions = []
    for slot in (0, 1):
        regions += [(f"k{slot}", (b, hkv, kmax, d), k.dtype), (f"v{slot}", (b, hkv, kmax, dv), v.dtype)]
        if pad is not None:
            regions.append((f"pad{slot}", (pad.shape[0], kmax), pad_dtype))
    layout = _Layout(regions)
    mem.reserve(layout.nbytes)

    def block(p, slot, n):  # the (k, v, pad) views of slot `slot` of rank p holding a block of n keys
        views = [layout.view(mem, p, f"k{slot}", (b, hkv, n, d)), layout.view(mem, p, f"v{slot}", (b, hkv, n, dv))]
        if pad is not None:
            views.append(layout.view(mem, p, f"pad{slot}", (pad.shape[0], n)))
        return views

    def attend(heads, kind, stream):  # one block's attention on k/v heads [k0, k1) (all q heads they serve)
        k0, k1 = heads
        block_pad = None if pad is None else (held[2].bool() if pad.dtype == torch.bool else held[2])
        mask = _block_mask(block_pad, kind if isinstance(kind, torch.Tensor) else None)
        with _on(stream):
            out, lse = _attend(q[:, k0 * g:k1 * g], held[0][:, k0:k1], held[1][:, k0:k1], attn_mask=mask,
                               is_causal=isinstance(kind, str) and kind == "local", scale=scale, backend=backend,
                               return_lse=True)
            if mask is not None:  # a row that saw no key here may hold anything: its weight is 0, make it 0 too
                out = out.masked_fill((lse == float("-inf")).unsqueeze(-1), 0)
            for other in (current, merge):  # merged on `current` or on `merge`
                if stream is not None and other is not stream:
                    out.record_stream(other)
                    lse.record_stream(other)
            return out, lse, _record(stream)

    nxt = (rank + 1) % size
    q_off, k_offs = sum(q_lens[:rank]), [sum(k_lens[:j]) for j in range(size)]
    held = [k.contiguous(), v.contiguous()]
    if pad is not None:
        held.append((pad.to(torch.uint8) if pad.dtype == torch.bool else pad).contiguous())
    kinds = [_causal_block(q_off, q_lens[rank], k_offs[(rank - i) % size], k_lens[(rank - i) % size], q.device)
             if is_causal else "full" for i in range(size)]
    last = max(i for i, kind in enumerate(kinds) if kind is not None)
    current = torch.cuda.current_stream() if q.is_cuda else None
    comm = mem.comm_stream
    compute = [current, mem.compute_stream]
    side = [mem.compute_stream, mem.compute_stream2]  # the chunks of the last block
    merge = mem.merge_stream  # their merges: high priority, so they get SMs as the running chunk's blocks retire
    start = _record(current)
    for stream in (comm, *side):
        _wait(stream, start)
    with _on(comm):
        mem.barrier()  # every rank is done with its slots from the previous call
    acc = lse_acc = None
    pending = None  # (event, out, lse, dtype) of the last attention: merged once the next one is queued
    computed = []  # the events after the previous step's attention (its slot may then be overwritten)
    arrived = None  # the event after the push of the block this rank computes next
    for step in range(size):
        src = (rank - step) % size
        block_arrived = arrived
        if step < size - 1:  # push the held block into the next rank's slot step % 2 (the block it needs next)
            for event in computed:
                _wait(comm, event)
            with _on(comm):
                if step > 0:
                    mem.barrier()  # the next rank is done with that slot (its step - 1)
                for dst, t in zip(block(nxt, step % 2, k_lens[src]), held):
                    dst.copy_(t)
                mem.barrier()
                arrived = _record(comm)
        kind = kinds[step]
        if kind is not None and step == last and (acc is not None or pending is not None):
            parts = []
            for c, heads in enumerate(_chunk_bounds(hkv, RING_LAST_CHUNKS)):
                _wait(side[c % 2], block_arrived)
                parts.append((heads, *attend(heads, kind, side[c % 2])))
            if pending is not None:
                _wait(current, pending[0])
                acc, lse_acc = _merge(acc, lse_acc, *pending[1:3])
                pending = None
            result = q.new_empty(b, q.shape[1], q.shape[2], dv)
            _wait(merge, _record(current))
            for (k0, k1), out, lse, event in parts:  # each merge behind its own chunk only
                _wait(merge, event)
                with _on(merge):
                    _merge(acc[:, k0 * g:k1 * g], lse_acc[:, k0 * g:k1 * g], out, lse, q.dtype,
                           into=result[:, k0 * g:k1 * g])
            _wait(current, _record(merge))
            acc, computed = result, [part[3] for part in parts]
        else:
            stream = compute[step % 2]
            if kind is not None:
                out, lse, event = attend((0, hkv), kind, stream)
            else:
                event = _record(stream)
            computed = [event]
            if pending is not None:  # the previous block's merge, queued behind this block's attention
                _wait(current, pending[0])
                acc, lse_acc = _merge(acc, lse_acc, *pending[1:])
                pending = None
            if kind is not None:
                pending = (event, out, lse, q.dtype if step == last else None)
        if step < size - 1:
            _wait(compute[(step + 1) % 2], arrived)
            held = block(rank, step % 2, k_lens[(src - 1) % size])
    if pending is not None:
        _wait(current, pending[0])
        acc, _ = _merge(acc, lse_acc, *pending[1:])
    _wait(current, _record(comm))
    return acc.to(q.dtype)


def ulysses_attention(q, k, v, group=None, attn_mask=None, is_causal=False, scale=None, backend=None, *,
                      shard_lengths=None, chunks: int | None = None, transport: str | None = None):
    """Ulysses sequence-parallel attention: (B, H, S_local, D) shards in, this rank's (B, H, S_local, Dv) out.

    group: the process group whose ranks hold the shards in order (None = the default group). attn_mask: a key-padding
    shard (B, S_local) or (B, 1, 1, S_local), all-gathered. shard_lengths: every rank's local length (self-attention),
    saves one all-gather. chunks: head chunks whose communication may overlap other chunks' compute (default
    copy_engine_chunks(S) on the copy engines, 1 over NCCL). transport: auto (copy engines where they work, else the
    group's collectives), copy_engine or nccl; None reads ATTNSEL_SP_TRANSPORT (default auto).
    Raises ValueError when the group size does not divide the q and k/v heads.
    """
    _check_qkv(q, k, v, "ulysses_attention")
    transport = _transport(transport, "ulysses_attention")
    group = group or dist.group.WORLD
    if _group_size(group) == 1:
        return _attend(q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale, backend=backend)
    mask = _key_padding(attn_mask, q.shape[0], k.shape[2], "ulysses_attention")
    q_lens, k_lens = _resolve_lengths(group, q, q.shape[2], k.shape[2], shard_lengths, "ulysses_attention")

    def local(qh, kh, vh, full_mask):
        return _attend(qh, kh, vh, attn_mask=full_mask, is_causal=is_causal, scale=scale, backend=backend)

    mem = _peer_memory(group, q, transport, "ulysses_attention")
    return _ulysses(q, k, v, mask, group, q_lens, k_lens, local, chunks, mem)


# -- ring ------------------------------------------------------------------------------------------------------------
_LSE_CHECKED: set = set()


def _lse_backend(backend, q: torch.Tensor, where: str):
    """`backend` if it returns the log-sum-exp for q's dtype and device, else a ValueError saying why not.

    Checked once per (backend, dtype, device, head size) on a one-token call, on every rank before any
    communication; `auto` plans for a call that needs the log-sum-exp, so it passes wherever some backend can.
    """
    key = (backend, q.dtype, q.device, q.shape[-1])
    if key not in _LSE_CHECKED:
        probe = q.new_zeros(1, 1, 1, q.shape[-1])
        try:
            _attend(probe, probe, probe, backend=backend, return_lse=True)
        except ValueError as err:
            name = {None: "this task's policy", AUTO: "auto"}.get(backend) or f"backend {to_backend(backend)}"
            raise ValueError(f"attnsel.distributed.{where}: ring attention merges partial results with their "
                             f"log-sum-exp, and {name} cannot return it for {q.dtype} on {q.device.type}: {err}") \
                from None
        _LSE_CHECKED.add(key)
    return backend


def _merge(acc, lse_acc, out, lse, final_dtype=None, into=None):
    """Fold one block's (out, lse) into the running (acc, lse_acc).

    Weights exp(lse_i - lse_total) and sums are fp32; acc is the first block's output as it came, fp32 after a
    merge, and with `final_dtype` the last merge writes the result in that dtype (one rounding). A row with lse -inf
    in a block gets weight 0 there (a row no block reached: both weights exp(-inf) = 0).
    Two blocks as they came, merged into their own dtype (the 2-rank ring): one lerp, acc + w * (out - acc) computed
    in fp32 with w rounded to that dtype, one pass instead of two through fp32 (Wan-14B on an H200: 0.29 ms instead of
    0.89; bf16 on CPU, 30 seeds: error against float64 1.62x the one-process error, median, max 3.3x; two passes:
    1.55x, max 3.3x).
    """
    if acc is None:
        return out, lse
    new = torch.logaddexp(lse_acc, lse)
    ref = new.masked_fill(new == float("-inf"), 0.0)
    if final_dtype is not None and acc.dtype == out.dtype == final_dtype:
        weight = torch.exp(lse - ref).unsqueeze(-1).to(out.dtype)
        return (torch.lerp(acc, out, weight) if into is None else torch.lerp(acc, out, weight, out=into)), new
    scaled = torch.mul(acc, torch.exp(lse_acc - ref).unsqueeze(-1))  # fp32 (the weights are)
    w = torch.exp(lse - ref).unsqueeze(-1)
    if final_dtype is None:
        return scaled.addcmul_(out, w), new
    into = torch.empty_like(out, dtype=final_dtype) if into is None else into
    return torch.addcmul(scaled, out, w, out=into), new


def _causal_block(q_off, nq, k_off, nk, device):
    """How queries [q_off, q_off+nq) see keys [k_off, k_off+nk) under global top-left causality.

    Returns None (no key visible: skip), "full", "local" (the block's own top-left causal), or a (nq, nk) bool mask.
    """
    if k_off > q_off + nq - 1:
        return None
    if k_off + nk - 1 <= q_off:
        return "full"
    if k_off == q_off:
        return "local"
    rows = torch.arange(q_off, q_off + nq, device=device)[:, None]
    return torch.arange(k_off, k_off + nk, device=device)[None, :] <= rows


def _block_mask(pad: torch.Tensor | None, causal_mask: torch.Tensor | None):
    """Key-padding (B', S_k) and a causal (nq, nk) bool mask combined into one attention mask, or None."""
    if pad is None:
        return None if causal_mask is None else causal_mask[None, None]
    pad = pad[:, None, None, :]
    if causal_mask is None:
        return pad
    if pad.dtype == torch.bool:
        return pad & causal_mask
    return pad.masked_fill(~causal_mask, float("-inf"))


def _ring(q, k, v, pad, group, q_lens, k_lens, is_causal, scale, backend, mem=None):
    """q: this rank's queries; k, v, pad: this rank's key block; all blocks visit every rank once."""
    size, rank = len(q_lens), dist.get_rank(group)
    if mem is not None:
        return _ring_copy_engine(q, k, v, pad, mem, rank, q_lens, k_lens, is_causal, scale, backend)
    nxt, prv = dist.get_global_rank(group, (rank + 1) % size), dist.get_global_rank(group, (rank - 1) % size)
    q_off, k_offs = sum(q_lens[:rank]), [sum(k_lens[:j]) for j in range(size)]
    wire = [k.contiguous(), v.contiguous()]
    bool_pad = pad is not None and pad.dtype == torch.bool
    if pad is not None:
        wire.append((pad.to(torch.uint8) if bool_pad else pad).contiguous())
    kinds = [_causal_block(q_off, q_lens[rank], k_offs[(rank - i) % size], k_lens[(rank - i) % size], q.device)
             if is_causal else "full" for i in range(size)]
    last = max(i for i, kind in enumerate(kinds) if kind is not None)  # block 0 is never wholly in the future
    acc = lse_acc = None
    for step in range(size):
        src = (rank - step) % size
        pending = None
        if step < size - 1:  # start passing this block on (and receiving the next) before computing on it
            nsrc_len = k_lens[(src - 1) % size]
            recv = [t.new_empty(t.shape[:-2] + (nsrc_len, t.shape[-1])) if i < 2 else
                    t.new_empty(t.shape[0], nsrc_len) for i, t in enumerate(wire)]
            ops = [dist.P2POp(dist.isend, t, nxt, group) for t in wire]
            ops += [dist.P2POp(dist.irecv, t, prv, group) for t in recv]
            pending = dist.batch_isend_irecv(ops)
        kind = kinds[step]
        if kind is not None:
            block_pad = None if pad is None else (wire[2].bool() if bool_pad else wire[2])
            causal_mask = kind if isinstance(kind, torch.Tensor) else None
            mask = _block_mask(block_pad, causal_mask)
            out, lse = _attend(q, wire[0], wire[1], attn_mask=mask, is_causal=isinstance(kind, str) and kind == "local",
                               scale=scale, backend=backend, return_lse=True)
            if mask is not None:  # a row that saw no key here may hold anything: its weight is 0, make it 0 too
                out = out.masked_fill((lse == float("-inf")).unsqueeze(-1), 0)
            acc, lse_acc = _merge(acc, lse_acc, out, lse, q.dtype if step == last else None)
        if pending is not None:
            for work in pending:
                work.wait()
            wire = recv
    return acc.to(q.dtype)  # already q's dtype unless the last block merged was not the last computed


def ring_attention(q, k, v, group=None, attn_mask=None, is_causal=False, scale=None, backend=None, *,
                   shard_lengths=None, transport: str | None = None):
    """Ring sequence-parallel attention: (B, H, S_local, D) shards in, this rank's (B, H, S_local, Dv) out.

    Each rank's K/V block (and key-padding mask shard) travels around `group`; partial results are merged with their
    log-sum-exp in fp32. The backend must return the log-sum-exp (refused up front otherwise). Forward-only.
    transport: as for ulysses_attention.
    """
    _check_qkv(q, k, v, "ring_attention")
    transport = _transport(transport, "ring_attention")
    group = group or dist.group.WORLD
    if _group_size(group) == 1:
        return _attend(q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale, backend=backend)
    _forward_only("ring_attention", q, k, v)
    backend = _lse_backend(backend, q, "ring_attention")
    pad = _key_padding(attn_mask, q.shape[0], k.shape[2], "ring_attention")
    q_lens, k_lens = _resolve_lengths(group, q, q.shape[2], k.shape[2], shard_lengths, "ring_attention")
    return _ring(q, k, v, pad, group, q_lens, k_lens, is_causal, scale, backend,
                 _peer_memory(group, q, transport, "ring_attention"))


# -- USP -------------------------------------------------------------------------------------------------------------
def usp_attention(q, k, v, ulysses_group, ring_group, attn_mask=None, is_causal=False, scale=None, backend=None, *,
                  chunks: int | None = None, transport: str | None = None):
    """Ulysses inside `ulysses_group`, ring across `ring_group` (either may be None or of size 1).

    This rank holds shard ring_rank * U + ulysses_rank of the sequence (U = the Ulysses group's size): after the
    all-to-all it holds H/U heads of ring chunk ring_rank, whose K/V then travel around the ring group.
    transport: as for ulysses_attention (for both groups).
    """
    _check_qkv(q, k, v, "usp_attention")
    transport = _transport(transport, "usp_attention")
    u = 1 if ulysses_group is None else _group_size(ulysses_group)
    r = 1 if ring_group is None else _group_size(ring_group)
    if r == 1:
        return ulysses_attention(q, k, v, ulysses_group, attn_mask, is_causal, scale, backend, chunks=chunks,
                                 transport=transport)
    if u == 1:
        return ring_attention(q, k, v, ring_group, attn_mask, is_causal, scale, backend, transport=transport)
    _forward_only("usp_attention (ring_degree > 1)", q, k, v)
    ring_backend = _lse_backend(backend, q, "usp_attention")
    mask = _key_padding(attn_mask, q.shape[0], k.shape[2], "usp_attention")
    q_lens, k_lens = _gather_lengths(ulysses_group, q, q.shape[2], k.shape[2])
    ring_q, ring_k = _gather_lengths(ring_group, q, sum(q_lens), sum(k_lens))  # the ring chunks' lengths
    ring_mem = _peer_memory(ring_group, q, transport, "usp_attention")

    def local(qh, kh, vh, full_mask):
        pad = None if full_mask is None else full_mask[:, 0, 0, :]
        return _ring(qh, kh, vh, pad, ring_group, ring_q, ring_k, is_causal, scale, ring_backend, ring_mem)

    mem = _peer_memory(ulysses_group, q, transport, "usp_attention")
    return _ulysses(q, k, v, mask, ulysses_group, q_lens, k_lens, local, chunks, mem)


# -- the scope for attnsel.nn.Attention --------------------------------------------------------------------------
class SequenceParallel:
    """Process groups for Ulysses x ring over the world and a scope for attnsel.nn.Attention.

    The world of U*R ranks: rank w is Ulysses rank w % U in group {ring_rank*U .. ring_rank*U + U-1} and ring rank
    w // U in group {w % U, w % U + U, ...}; it holds shard w of the sequence (`scatter` cuts it, `gather` joins).
    Building one is collective (every process of the world, same degrees, same order). Used as a context manager,
    every attnsel.nn.Attention call inside treats q, k, v as sequence shards, except layers of role "cross", whose
    K/V (the text context) every rank holds whole: their local queries attend to them locally.
    """

    def __init__(self, ulysses_degree: int = 1, ring_degree: int = 1):
        for name, value in (("ulysses_degree", ulysses_degree), ("ring_degree", ring_degree)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"attnsel.distributed: {name} must be a positive int, got {value!r}")
        if not dist.is_available() or not dist.is_initialized():
            raise ValueError("attnsel.distributed: torch.distributed is not initialized (launch with torchrun and "
                             "call torch.distributed.init_process_group first)")
        self.group = dist.group.WORLD
        self.ulysses_degree, self.ring_degree = ulysses_degree, ring_degree
        self.world_size, self.rank = _group_size(self.group), dist.get_rank(self.group)
        if self.world_size != ulysses_degree * ring_degree:
            raise ValueError(f"attnsel.distributed: ulysses_degree * ring_degree = {ulysses_degree * ring_degree} "
                             f"must equal the number of processes ({self.world_size})")
        u, r = ulysses_degree, ring_degree
        self.ulysses_group = self._subgroup([[i * u + j for j in range(u)] for i in range(r)])
        self.ring_group = self._subgroup([[j + i * u for i in range(r)] for j in range(u)])
        self._local = threading.local()  # this thread's stack of ContextVar tokens (the scope nests and is shared)

    def _subgroup(self, layouts):
        if len(layouts) == 1:
            return self.group  # the whole world (no new communicator)
        mine = None
        for layout in layouts:  # every rank creates every subgroup, in the same order
            g = dist.new_group(layout) if len(layout) > 1 else None
            if self.rank in layout:
                mine = g
        return mine

    def __repr__(self) -> str:
        return f"SequenceParallel(ulysses_degree={self.ulysses_degree}, ring_degree={self.ring_degree})"

    def __enter__(self) -> "SequenceParallel":
        global _ENTERED
        with _ENTERED_LOCK:
            _ENTERED += 1
        self._local.__dict__.setdefault("tokens", []).append(_ACTIVE.set(self))
        return self

    def __exit__(self, *exc) -> None:
        global _ENTERED
        _ACTIVE.reset(self._local.tokens.pop())
        with _ENTERED_LOCK:
            _ENTERED -= 1

    def attention(self, q, k, v, attn_mask=None, is_causal=False, scale=None, backend=None):
        """USP attention of this rank's shards over the scope's groups."""
        return usp_attention(q, k, v, self.ulysses_group, self.ring_group, attn_mask, is_causal, scale, backend)

    def layer_attention(self, layer, q, k, v, attn_mask=None, is_causal=False):
        """What attnsel.nn.Attention.forward runs inside the scope, on the layer's policy and scale.

        A layer of role "cross" attends its local queries to K/V that every rank holds whole (the text context):
        locally, no communication. Any other layer takes q, k, v as sequence shards.
        """
        backend = AUTO if layer.policy is None else layer.policy
        if layer.role == "cross":
            return _attend(q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=layer.scale, backend=backend)
        return self.attention(q, k, v, attn_mask, is_causal, layer.scale, backend)

    def scatter(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """This rank's shard of a sequence every rank holds whole (no communication)."""
        lens = shard_lengths(x.shape[dim], self.world_size)
        return x.narrow(dim, sum(lens[:self.rank]), lens[self.rank])

    def gather(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """The whole sequence on every rank from each rank's shard (as `scatter` cut it). Forward-only."""
        if _needs_grad(x):
            raise ValueError("attnsel.distributed.SequenceParallel.gather is forward-only: run under torch.no_grad()")
        dim = dim % x.dim()
        q_lens, _ = _gather_lengths(self.group, x, x.shape[dim], x.shape[dim])
        longest = max(q_lens)
        wire = x.movedim(dim, 0)
        if wire.shape[0] < longest:
            wire = torch.cat([wire, wire.new_zeros((longest - wire.shape[0],) + wire.shape[1:])])
        wire = wire.contiguous()
        parts = [torch.empty_like(wire) for _ in q_lens]
        dist.all_gather(parts, wire, group=self.group)
        return torch.cat([p[:n] for p, n in zip(parts, q_lens)]).movedim(0, dim)


_SCOPES: dict = {}


def sequence_parallel(ulysses_degree: int = 1, ring_degree: int = 1) -> SequenceParallel:
    """The `SequenceParallel` for these degrees (built once, collectively, on the first call), to use as `with ...:`.

    Inside the scope attnsel.nn.Attention layers run sequence-parallel on their own backends; the model cuts its
    tokens with `.scatter` before and joins them with `.gather` after (see attnsel.models.transformer).
    """
    key = (ulysses_degree, ring_degree, dist.group.WORLD)
    if key not in _SCOPES:
        _SCOPES[key] = SequenceParallel(ulysses_degree, ring_degree)
    return _SCOPES[key]


def init_from_env(ulysses_degree: int, ring_degree: int, device: torch.device) -> SequenceParallel:
    """Join the process group torchrun describes (gloo on CPU, NCCL on CUDA) and build the sequence-parallel groups.

    On CUDA each process takes the GPU of its LOCAL_RANK. Raises ValueError when not launched with
    ulysses_degree * ring_degree processes.
    """
    want = ulysses_degree * ring_degree
    world = os.environ.get("WORLD_SIZE")
    if world is None or int(world) != want:
        raise ValueError(f"--ulysses-degree {ulysses_degree} --ring-degree {ring_degree} needs {want} processes: "
                         f"launch with torchrun --nproc-per-node {want} -m attnsel run ... (WORLD_SIZE="
                         f"{world or 'unset'})")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda: CUDA is not available here")
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return sequence_parallel(ulysses_degree, ring_degree)
