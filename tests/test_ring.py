"""Ring attention on spawned gloo processes against float64 attention over the whole sequence.

Each world size is spawned once: every rank runs the whole grid (layouts x causal x heads x
head dims x dtypes) and the parametrized tests below read their case from that run. For
every case the full-sequence reference is float64 attention on the same inputs; in bfloat16
the bar is the same reference attention run in bfloat16 on one process.
"""

from __future__ import annotations

import itertools
import math
import random

import pytest
import torch

from common import rel
from distributed import spawn
from ringflash import Striped, get_layout, reference, ring_attention

WORLD_SIZES = [1, 2, 3, 4, 8]
LAYOUTS = ["contiguous", "striped", "zigzag"]
HEADS = [(4, 4), (8, 2)]  # (query heads, key/value heads): MHA and GQA
HEAD_DIMS = [32, 80]
DTYPES = ["float32", "bfloat16"]
BATCH = 2
LOCAL_SEQLEN = 6  # per rank; a multiple of 2 so zigzag splits
GROWTH_SEQLEN = 96  # divisible by 2P for every P in WORLD_SIZES: same data for every world size

CASES = list(itertools.product(LAYOUTS, [False, True], HEADS, HEAD_DIMS, DTYPES))


def _inputs(seed, seqlen, heads, heads_kv, head_dim):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(BATCH, seqlen, heads, head_dim, generator=g, dtype=torch.float64)
    k = torch.randn(BATCH, seqlen, heads_kv, head_dim, generator=g, dtype=torch.float64)
    v = torch.randn(BATCH, seqlen, heads_kv, head_dim, generator=g, dtype=torch.float64)
    dout = torch.randn(BATCH, seqlen, heads, head_dim, generator=g, dtype=torch.float64)
    return q, k, v, dout


def _single(q, k, v, dout, causal, dtype):
    """Whole-sequence attention on one process, its output and gradients (float64 results)."""
    q, k, v = (t.detach().to(dtype).requires_grad_() for t in (q, k, v))
    out, _ = reference.attention(q, k, v, causal=causal)
    out.backward(dout.to(dtype))
    return [out.detach(), q.grad, k.grad, v.grad]


def _ring(rank, world_size, q, k, v, dout, causal, layout, dtype):
    """This rank's shards through ring_attention, gathered back to full tensors."""
    shard = lambda t: layout.shard(t, rank=rank, world_size=world_size)  # noqa: E731
    ql, kl, vl = (shard(t).to(dtype).requires_grad_() for t in (q, k, v))
    out, lse = ring_attention(ql, kl, vl, causal=causal, layout=layout, return_lse=True)
    assert out.dtype == dtype and lse.dtype == torch.float32
    out.backward(shard(dout).to(dtype))
    return [layout.unshard(t) for t in (out.detach(), ql.grad, kl.grad, vl.grad)], layout.unshard(lse, dim=2)


def _grid(rank, world_size, seed):
    results = {}
    for i, (layout_name, causal, (h, hkv), d, dtype_name) in enumerate(CASES):
        dtype = getattr(torch, dtype_name)
        layout = get_layout(layout_name)
        q, k, v, dout = _inputs(seed + i, LOCAL_SEQLEN * world_size, h, hkv, d)
        ref = _single(q, k, v, dout, causal, torch.float64)
        ring, lse = _ring(rank, world_size, q, k, v, dout, causal, layout, dtype)
        # The LSE is float32 whatever the input dtype: compare with float64 attention on the
        # inputs as this dtype rounds them.
        _, ref_lse = reference.attention(*(t.to(dtype).double() for t in (q, k, v)), causal=causal)
        entry = {"ring": [rel(x, r) for x, r in zip(ring, ref)], "lse": rel(lse, ref_lse)}
        if dtype == torch.bfloat16:
            entry["single"] = [rel(x, r) for x, r in zip(_single(q, k, v, dout, causal, dtype), ref)]
        results[(layout_name, causal, h, hkv, d, dtype_name)] = entry
    # The same data for every world size: does the bfloat16 error grow with P?
    q, k, v, dout = _inputs(seed + 10_000, GROWTH_SEQLEN, 8, 2, 32)
    ref = _single(q, k, v, dout, True, torch.float64)
    for layout_name in LAYOUTS:
        ring, _ = _ring(rank, world_size, q, k, v, dout, True, get_layout(layout_name), torch.bfloat16)
        results[("growth", layout_name)] = [rel(x, r) for x, r in zip(ring, ref)]
    # A stripe wider than one token.
    layout = Striped(stripe=2)
    q, k, v, dout = _inputs(seed + 20_000, 4 * world_size, 4, 2, 32)
    ref = _single(q, k, v, dout, True, torch.float64)
    ring, _ = _ring(rank, world_size, q, k, v, dout, True, layout, torch.float32)
    results[("stripe2",)] = [rel(x, r) for x, r in zip(ring, ref)]
    return results


_SEED = random.randrange(1 << 30)  # fresh inputs every run; printed on failure
_RUNS: dict[int, list] = {}


def grid(world_size: int) -> list[dict]:
    if world_size not in _RUNS:
        _RUNS[world_size] = spawn(_grid, world_size, _SEED, timeout=600)
    return _RUNS[world_size]


NAMES = ["out", "dq", "dk", "dv"]


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@pytest.mark.parametrize("layout,causal,heads,head_dim,dtype", [
    (l, c, hh, d, t) for (l, c, hh, d, t) in CASES
])
def test_ring_matches_float64(world_size, layout, causal, heads, head_dim, dtype):
    h, hkv = heads
    for rank, res in enumerate(grid(world_size)):
        entry = res[(layout, causal, h, hkv, head_dim, dtype)]
        errs = dict(zip(NAMES, entry["ring"]))
        ctx = f"rank {rank}, seed {_SEED}: {errs}"
        if dtype == "float32":
            assert all(e < 1e-5 for e in errs.values()), ctx
        else:
            single = dict(zip(NAMES, entry["single"]))
            for name in NAMES:
                assert errs[name] <= 2 * single[name], f"{name}: ring {errs[name]:.2e} vs single-process bf16 {single[name]:.2e}; {ctx}"
        assert entry["lse"] < 1e-5, ctx  # the LSE is merged in float32 in every layout


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_wider_stripes(world_size):
    for res in grid(world_size):
        assert all(e < 1e-5 for e in res[("stripe2",)]), (_SEED, res[("stripe2",)])


@pytest.mark.parametrize("layout", LAYOUTS)
def test_bf16_error_does_not_grow_with_world_size(layout):
    errors = {p: grid(p)[0][("growth", layout)] for p in WORLD_SIZES}
    base = errors[1]
    for p, errs in errors.items():
        for name, e, e1 in zip(NAMES, errs, base):
            # One rounding at the end whatever P is: the same error up to noise, not a trend.
            assert e <= 1.25 * e1 + 1e-4, f"{name} at P={p}: {e:.3e} vs P=1 {e1:.3e} (seed {_SEED})"


def _subgroups(rank, world_size, seed):
    """4 ranks as 2 context-parallel groups of 2 (a data-parallel x context-parallel mesh)."""
    import torch.distributed as dist

    cp = 2
    groups = [dist.new_group(list(range(i, i + cp))) for i in range(0, world_size, cp)]
    group, cp_rank, replica = groups[rank // cp], rank % cp, rank // cp
    layout = get_layout("striped")
    # Each data-parallel replica has its own batch.
    q, k, v, dout = _inputs(seed + replica, 8 * cp, 8, 2, 32)
    ref = _single(q, k, v, dout, True, torch.float64)
    shard = lambda x: layout.shard(x, rank=cp_rank, world_size=cp)  # noqa: E731
    ql, kl, vl = (shard(x).float().requires_grad_() for x in (q, k, v))
    out = ring_attention(ql, kl, vl, causal=True, layout=layout, group=group)
    out.backward(shard(dout).float())
    got = [layout.unshard(x, group=group) for x in (out.detach(), ql.grad, kl.grad, vl.grad)]
    return [rel(x, r) for x, r in zip(got, ref)]


def test_subgroups():
    for rank, errs in enumerate(spawn(_subgroups, 4, _SEED, timeout=120)):
        assert all(e < 1e-5 for e in errs), (rank, _SEED, errs)


def _ring_triton(rank, world_size, seed):
    """The ring with the Triton kernels as the local step, under Triton's CPU interpreter."""
    import os

    os.environ["TRITON_INTERPRET"] = "1"  # before ringflash.kernels is first imported
    out = {}
    # float32 at two ranks only: the interpreter's steps are the suite's slowest, and three ranks
    # add nothing float16 does not cover.
    dtypes = [torch.float32, torch.float16] if world_size == 2 else [torch.float16]
    for i, (layout_name, causal, dtype) in enumerate(itertools.product(LAYOUTS, [False, True], dtypes)):
        layout = get_layout(layout_name)
        q, k, v, dout = _inputs(seed + i, 18 * world_size, 4, 2, 32)
        ref = _single(q, k, v, dout, causal, torch.float64)
        shard = lambda x: layout.shard(x, rank=rank, world_size=world_size)  # noqa: E731
        ql, kl, vl = (shard(x).to(dtype).requires_grad_() for x in (q, k, v))
        o = ring_attention(ql, kl, vl, causal=causal, layout=layout, backend="triton")
        o.backward(shard(dout).to(dtype))
        got = [layout.unshard(x) for x in (o.detach(), ql.grad, kl.grad, vl.grad)]
        entry = {"ring": [rel(x, r) for x, r in zip(got, ref)]}
        if dtype == torch.float16:
            entry["single"] = [rel(x, r) for x, r in zip(_single(q, k, v, dout, causal, dtype), ref)]
        out[(layout_name, causal, str(dtype))] = entry
    return out


@pytest.mark.parametrize("world_size", [2, 3])
def test_ring_with_triton_kernels_interpreted(world_size):
    for rank, res in enumerate(spawn(_ring_triton, world_size, _SEED, timeout=600)):
        for case, entry in res.items():
            if "single" not in entry:  # float32: the kernels' dots may run as tf32 on a GPU, not here
                assert all(e < 1e-4 for e in entry["ring"]), (rank, case, entry, _SEED)
            else:
                for e, s in zip(entry["ring"], entry["single"]):
                    assert e <= 2 * s, (rank, case, entry, _SEED)


def test_workspace_bytes_counts_the_copy_engine_workspaces(monkeypatch):
    """What ``max_memory_allocated`` leaves out: the symmetric workspaces, per device or all."""
    from ringflash import comm

    class Space:
        def __init__(self, n):
            self.buf = torch.empty(n, dtype=torch.uint8)

    monkeypatch.setattr(comm, "_WORKSPACES", {("g0", 0): Space(1000), ("g1", 0): Space(24), ("g0", 1): Space(500)})
    assert comm.workspace_bytes() == 1524
    assert comm.workspace_bytes(0) == 1024 and comm.workspace_bytes(torch.device("cuda", 1)) == 500
    assert comm.workspace_bytes("cuda:2") == 0


def test_copy_engine_receive_buffers_sit_at_the_same_offset_on_every_rank():
    """The copy-engine ring's bump allocator: aligned buffers in allocation order, and a
    sender's view of the next rank's buffer at the same offset (here over CPU stand-ins for
    the symmetric workspaces of two ranks)."""
    from ringflash import comm

    workspaces = [torch.zeros(4096, dtype=torch.uint8) for _ in range(2)]

    class Handle:  # the part of PyTorch's symmetric-memory handle the allocator uses
        def get_buffer(self, rank, shape, dtype, storage_offset):
            return workspaces[rank].view(dtype)[storage_offset:storage_offset + math.prod(shape)].view(shape)

    ring = comm.CopyEngineRing.__new__(comm.CopyEngineRing)
    ring.workspace, ring.handle, ring.offset, ring.next_rank = workspaces[0], Handle(), 0, 1
    a = ring.empty((2, 3, 5), torch.bfloat16, "cpu")
    b = ring.empty((7,), torch.float32, "cpu")
    c = ring.empty((1, 4), torch.float64, "cpu")
    offsets = [t.data_ptr() - workspaces[0].data_ptr() for t in (a, b, c)]
    assert offsets == [0, 256, 512] and all(ring.owns(t) for t in (a, b, c))
    assert not ring.owns(torch.empty(3))
    for t in (a, b, c):
        t.copy_(torch.randn(t.shape))
        peer = ring._peer_view(t)
        assert peer.shape == t.shape and peer.dtype == t.dtype
        assert peer.data_ptr() - workspaces[1].data_ptr() == t.data_ptr() - workspaces[0].data_ptr()
        peer.copy_(t)
    assert torch.equal(workspaces[0][:544], workspaces[1][:544])
    with pytest.raises(AssertionError, match="exceed"):
        ring.empty((4096,), torch.uint8, "cpu")
