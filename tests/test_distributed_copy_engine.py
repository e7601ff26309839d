"""The copy-engine transport of attnsel.distributed: its index logic on CPU, its real run on 2 GPUs.

On CPU, one thread per simulated rank runs the copy-engine Ulysses / ring / USP code over a stand-in for symmetric
memory (every rank's buffer a CPU tensor all threads see, the barrier a threading.Barrier): each push lands where
the code says, so a wrong offset, head or slot shows up as a wrong output (the buffers start as random bytes). The
outputs joined over the ranks are checked like tests/test_distributed.py's: error against a float64 reference <= 2x
the one-process backend's. On 2 GPUs (NCCL) the same cases run through the public functions with
transport='copy_engine' (skipped where symmetric memory is unavailable, with the reason; a failure is a failure).
"""

from __future__ import annotations

import threading

import pytest
import torch

import attnsel
import attnsel.distributed as D
from test_distributed import CASES, FLOOR, _reference, _spawn, check_gpu_case


class FakePeerMemory:
    """What the copy-engine code needs of attnsel.distributed._PeerMemory, for threads of one process."""

    comm_stream = copy_stream = compute_stream = compute_stream2 = merge_stream = None

    def __init__(self, buffers: list, barrier: threading.Barrier, rank: int):
        self.buffers, self._barrier, self.rank = buffers, barrier, rank

    def reserve(self, nbytes: int) -> None:
        if self.buffers[self.rank] is None or self.buffers[self.rank].numel() < nbytes:
            self.buffers[self.rank] = torch.randint(0, 256, (nbytes,), dtype=torch.uint8)  # garbage until written
        self.barrier()

    def view(self, rank, offset, shape, dtype):
        n = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        return self.buffers[rank][offset:offset + n].view(dtype).view(shape)

    def barrier(self) -> None:
        self._barrier.wait(timeout=60)


def _fake_group(size):
    buffers, barrier = [None] * size, threading.Barrier(size)
    return [FakePeerMemory(buffers, barrier, r) for r in range(size)]


def _run_ranks(size, fn):
    """fn(rank) on `size` threads; the outputs in rank order (a failure aborts the barriers and is raised)."""
    outs, errors = [None] * size, []

    def body(rank):
        try:
            outs[rank] = fn(rank)
        except BaseException as err:  # noqa: BLE001 - re-raised below
            errors.append(err)

    threads = [threading.Thread(target=body, args=(r,)) for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    if errors:
        raise errors[0]
    assert all(o is not None for o in outs), "a simulated rank did not finish"
    return outs


def _inputs(seed, b, h, hkv, sq, sk, d, mask_kind):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, sq, d, generator=g)
    k, v = torch.randn(b, hkv, sk, d, generator=g), torch.randn(b, hkv, sk, d, generator=g)
    mask = None
    if mask_kind == "bool":
        mask = torch.rand(b, sk, generator=g) > 0.3
        mask[:, 0] = True
    elif mask_kind == "additive":
        mask = torch.randn(b, sk, generator=g)
    return q, k, v, mask


def _check(parts, q, k, v, mask, causal):
    full = torch.cat(parts, dim=2)
    ref = _reference(q, k, v, mask, causal)
    single = attnsel.attention(q, k, v, attn_mask=None if mask is None else mask[:, None, None, :], is_causal=causal)
    err_sp, err_single = (full.double() - ref).abs().max().item(), (single.double() - ref).abs().max().item()
    assert err_sp <= 2 * err_single + FLOOR, (err_sp, err_single)


def _shard(t, lens, rank, dim=2):
    return t.narrow(dim, sum(lens[:rank]), lens[rank])


# (world, B, H, Hkv, Sq, Sk, D, causal, mask, chunks)
ULYSSES = {
    "even": (2, 1, 4, 4, 32, 32, 16, False, None, 1),
    "chunks3_uneven_causal_bool": (2, 2, 6, 6, 37, 37, 16, True, "bool", 3),
    "gqa_chunks2_additive": (2, 1, 8, 4, 29, 29, 8, False, "additive", 2),
    "three_ranks_cross_chunks4": (3, 2, 12, 12, 25, 19, 8, False, None, 4),
    "four_ranks_gqa_chunks4": (4, 1, 8, 4, 41, 41, 8, True, None, 4),
}


@pytest.mark.parametrize("name", list(ULYSSES))
def test_ulysses_copy_engine_logic(name):
    world, b, h, hkv, sq, sk, d, causal, mask_kind, chunks = ULYSSES[name]
    q, k, v, mask = _inputs(1, b, h, hkv, sq, sk, d, mask_kind)
    ql, kl = D.shard_lengths(sq, world), D.shard_lengths(sk, world)
    mems = _fake_group(world)
    full_mask = None if mask is None else mask[:, None, None, :]

    def local(qh, kh, vh, m):
        return attnsel.attention(qh, kh, vh, attn_mask=m, is_causal=causal)

    def rank_fn(r):
        return D._ulysses_copy_engine(_shard(q, ql, r), _shard(k, kl, r), _shard(v, kl, r), full_mask, mems[r], r,
                                      ql, kl, local, chunks)

    _check(_run_ranks(world, rank_fn), q, k, v, mask, causal)


# (world, B, H, Hkv, Sq, Sk, D, causal, mask)
RING = {
    "two": (2, 1, 2, 2, 32, 32, 16, False, None),
    "two_causal_uneven_bool": (2, 2, 2, 1, 33, 33, 16, True, "bool"),
    "two_gqa_six_kv_heads": (2, 1, 12, 6, 30, 30, 8, False, "bool"),  # the last block in 4 chunks: 1, 2, 2, 1
    "three_six_kv_heads": (3, 2, 6, 6, 31, 31, 8, False, None),
    "three_additive_cross": (3, 1, 2, 2, 40, 23, 16, False, "additive"),
    "four_causal_uneven": (4, 1, 3, 3, 45, 45, 8, True, None),
    "five_causal_bool": (5, 2, 2, 2, 23, 23, 8, True, "bool"),
}


@pytest.mark.parametrize("name", list(RING))
def test_ring_copy_engine_logic(name):
    world, b, h, hkv, sq, sk, d, causal, mask_kind = RING[name]
    q, k, v, mask = _inputs(2, b, h, hkv, sq, sk, d, mask_kind)
    ql, kl = D.shard_lengths(sq, world), D.shard_lengths(sk, world)
    mems = _fake_group(world)

    def rank_fn(r):
        pad = None if mask is None else _shard(mask, kl, r, 1)
        return D._ring_copy_engine(_shard(q, ql, r), _shard(k, kl, r), _shard(v, kl, r), pad, mems[r], r, ql, kl,
                                   causal, None, None)

    _check(_run_ranks(world, rank_fn), q, k, v, mask, causal)


def test_usp_copy_engine_logic():
    """Ulysses (pairs of ranks) around a ring (across the pairs), both over the stand-in, 4 ranks, chunked."""
    u, r_deg, b, h, hkv, s, d = 2, 2, 1, 4, 2, 51, 16
    world = u * r_deg
    q, k, v, mask = _inputs(3, b, h, hkv, s, s, d, "bool")
    lens = D.shard_lengths(s, world)
    ulysses_mems = [m for i in range(r_deg) for m in _fake_group(u)]  # rank w: Ulysses group w // u
    ring_groups = [_fake_group(r_deg) for _ in range(u)]  # ring group w % u, ring rank w // u

    def rank_fn(w):
        ur, rr = w % u, w // u
        q_lens = lens[rr * u:(rr + 1) * u]
        ring_lens = [sum(lens[i * u:(i + 1) * u]) for i in range(r_deg)]
        gathered = torch.cat([_shard(mask, lens, rr * u + j, 1) for j in range(u)], 1)[:, None, None, :]

        def local(qh, kh, vh, m):
            return D._ring_copy_engine(qh, kh, vh, m[:, 0, 0, :], ring_groups[ur][rr], rr, ring_lens, ring_lens,
                                       True, None, None)

        return D._ulysses_copy_engine(_shard(q, lens, w), _shard(k, lens, w), _shard(v, lens, w), gathered,
                                      ulysses_mems[w], ur, q_lens, q_lens, local, 2)

    _check(_run_ranks(world, rank_fn), q, k, v, mask, True)


def test_chunk_bounds():
    assert D._chunk_bounds(20, 1) == [(0, 20)]
    assert D._chunk_bounds(20, 2) == [(0, 10), (10, 20)]
    assert D._chunk_bounds(20, 4) == [(0, 1), (1, 10), (10, 19), (19, 20)]
    assert D._chunk_bounds(3, 8) == [(0, 1), (1, 2), (2, 3)]
    assert D.copy_engine_chunks(32760) == 6 and D.copy_engine_chunks(118800) == 1
    for heads in range(1, 12):
        for n in range(1, 8):
            cuts = D._chunk_bounds(heads, n)
            assert cuts[0][0] == 0 and cuts[-1][1] == heads and all(a < b for a, b in cuts)
            assert all(x[1] == y[0] for x, y in zip(cuts, cuts[1:]))


def test_transport_choice_is_checked():
    with pytest.raises(ValueError, match="auto, nccl, copy_engine"):
        D._transport("shm", "ulysses_attention")


def test_transport_variable_is_checked(monkeypatch):
    monkeypatch.setenv("ATTNSEL_SP_TRANSPORT", "bogus")
    with pytest.raises(ValueError, match="ATTNSEL_SP_TRANSPORT"):
        D._transport(None, "ring_attention")


@pytest.fixture(scope="module")
def results_nccl_ce(tmp_path_factory):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 CUDA GPUs (NCCL)")
    return _spawn(2, tmp_path_factory, "cuda", transport="copy_engine")


@pytest.mark.parametrize("name", [n for n, c in CASES.items() if 2 in c[0]])
def test_two_gpus_copy_engine_match_one(results_nccl_ce, name):
    r = results_nccl_ce[name]
    if "refused" in r and "copy_engine' is not available" in r["refused"] \
            and not torch.cuda.can_device_access_peer(0, 1):
        pytest.skip(f"the GPUs cannot reach each other's memory: {r['refused']}")
    check_gpu_case(name, r)  # GPUs that reach each other's memory: the copy engines must run


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_copy_rows_on_gpu(dtype):
    """_copy_rows' 2-d copy (rows strided on both sides), its row-by-row fallback, and the contiguous case."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    g = torch.Generator(device="cuda").manual_seed(5)
    src = torch.randn(2, 7, 40, 24, device="cuda", generator=g).to(dtype)
    dst = torch.full((2, 7, 100, 24), float("nan"), device="cuda", dtype=dtype)
    for b in range(2):
        D._copy_rows(dst[b, 1:6, 30:70], src[b, 2:7])  # pitch 100*24 on one side, 40*24 on the other
    torch.cuda.synchronize()
    assert torch.equal(dst[:, 1:6, 30:70], src[:, 2:7])
    assert torch.isnan(dst[:, 1:6, :30]).all() and torch.isnan(dst[:, 1:6, 70:]).all() and torch.isnan(dst[:, 0]).all()
    odd = torch.zeros(5, 40, 12, device="cuda", dtype=dtype)
    D._copy_rows(odd, src[0, 2:7, :, ::2])  # rows not contiguous: the fallback
    D._copy_rows(dst[0, 0, :40], src[1, 0])  # a contiguous block: one plain copy
    torch.cuda.synchronize()
    assert torch.equal(odd, src[0, 2:7, :, ::2]) and torch.equal(dst[0, 0, :40], src[1, 0])
    assert D._memcpy_2d() is not None  # the driver entry point exists wherever a GPU does
