"""Ulysses x ring (``HybridGroup``) on spawned gloo processes against float64 attention over the whole sequence.

Mesh shapes of ``R`` ring positions x ``U`` Ulysses ranks: 2x2, 2x3, 3x2, 2x4, 4x2. Each world
size is spawned once (starting the processes is most of the cost) and runs its shapes in turn.
For each shape the ranks build the groups of the split with ``dist.new_group`` (rank ``r * U + u``;
the ring group of a rank holds the ranks with its ``u``, its Ulysses group those with its ``r``),
then every rank runs the grid of :func:`cases` on its shards, cut by the layout over all ``R * U``
ranks, and returns its shards of the output, the gradients and the LSE. The parametrized tests
below assemble them and compare with ``reference.attention`` in float64 over the full sequence,
computed here from the same seed.

Bars. float32: relative error below 1e-5 for out, dq, dk, dv and the LSE. bfloat16 (the CPU
engine accumulates in float32 and rounds the results once): out, dq, dk and dv within 2x (plus
1e-4) of the error of plain ring attention over the flat group of all ``R * U`` ranks on the same
bfloat16 shards, run in the same spawn; the LSE (float32 whatever the input dtype) within 1e-5 of
float64 attention on the inputs as bfloat16 rounds them. (With fewer K/V heads than Ulysses
ranks, dk and dv come out somewhat above the flat ring's error: the partial gradients of a K/V head
from the Ulysses ranks that share it are summed after rounding to bfloat16.)

Every shape also checks that bad splits raise ``ValueError`` on every rank before any
communication (a rank that went on to the all-to-all would hang the spawn). The 2x2 shape also
runs a ring of one (1x4, Ulysses alone) and a Ulysses group of one (4x1, which must equal the
plain ring), the groups built the other way round (a rank's place ``r * U + u`` is then not its
global rank), a ``HybridGroup`` from a 2-D DeviceMesh (equal to the ``new_group`` one), first
calls of a shape in other contexts (``inference_mode``, a default device, an unhashable layout)
followed by training calls, and ``MultiheadAttention`` and the GPT fed by ``shard_batch``
against the same module on one process.
"""

from __future__ import annotations

import dataclasses
import random
import zlib

import pytest
import torch

from common import pack, rel, unpack
from distributed import spawn
from ringflash import (Contiguous, HybridGroup, Layout, MultiheadAttention, Striped, Zigzag, get_layout, reference,
                       ring_attention, shard_batch)
from ringflash.models import GPT, GPTConfig

MESHES = [(2, 2), (2, 3), (3, 2), (2, 4), (4, 2)]  # (R, U)
LAYOUTS = ["striped", "zigzag", "contiguous"]
# 48 tokens: a multiple of 2P (zigzag, and stripes of 2) for every P = R * U here.
SEQLEN, BATCH, HEAD_DIM = 48, 2, 8
# Per Ulysses size, (query heads, K/V heads): the first runs every layout x {causal, full}; the
# K/V heads divide U, equal U, or are fewer than U (each then goes to several Ulysses ranks).
HEADS = {
    2: [(4, 2), (4, 4), (4, 1)],
    3: [(6, 3), (6, 6), (6, 1)],
    4: [(8, 2), (8, 4), (8, 1)],
}
# name -> (window, packed documents)
MASKS = {
    "none": (None, False),
    "docs": (None, True),
    "window-left": ((5, 0), False),
    "window-two-sided": ((4, 3), False),
    "docs-window": ((6, 0), True),
}
NAMES = ["out", "dq", "dk", "dv", "lse"]
FP32_TOL = 1e-5
BF16_FACTOR, BF16_SLACK = 2.0, 1e-4


def cases(R: int, U: int) -> list[tuple]:
    """(layout, causal, heads, kv_heads, mask, dtype) of the grid a spawn of R x U ranks runs."""
    main, *others = HEADS[U]
    fewest = HEADS[U][2]
    grid = [(lay, c, *main, "none", "float32") for lay in LAYOUTS for c in (True, False)]
    for j, heads in enumerate(others):  # every layout, causal or full in turn
        grid += [(lay, (i + j) % 2 == 0, *heads, "none", "float32") for i, lay in enumerate(LAYOUTS)]
    masks = [("docs", True), ("docs", False), ("window-left", True), ("window-two-sided", False), ("docs-window", True)]
    grid += [(LAYOUTS[j % 3], c, *fewest, m, "float32") for j, (m, c) in enumerate(masks)]
    grid.append(("striped2", True, *main, "docs", "float32"))  # Striped(2): Striped(2U) over the ring
    grid += [
        ("striped", True, *fewest, "none", "bfloat16"),
        ("zigzag", False, *HEADS[U][1], "window-two-sided", "bfloat16"),
        ("contiguous", True, *main, "docs-window", "bfloat16"),
    ]
    return grid


def _layout(name) -> Layout:
    return Striped(2) if name == "striped2" else get_layout(name)


def _docs(seed: int) -> list[int]:
    """Random document boundaries over SEQLEN tokens, one document of a single token among them."""
    g = random.Random(seed)
    cuts = set(g.sample(range(1, SEQLEN), k=5))
    c = g.randrange(1, SEQLEN - 1)
    cuts |= {c, c + 1}
    return [0, *sorted(cuts), SEQLEN]


def _mask(name: str, seed: int):
    window, docs = MASKS[name]
    return window, (_docs(seed) if docs else None)


def _inputs(seed: int, heads: int, heads_kv: int):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(BATCH, SEQLEN, heads, HEAD_DIM, generator=g, dtype=torch.float64)
    k = torch.randn(BATCH, SEQLEN, heads_kv, HEAD_DIM, generator=g, dtype=torch.float64)
    v = torch.randn(BATCH, SEQLEN, heads_kv, HEAD_DIM, generator=g, dtype=torch.float64)
    dout = torch.randn(BATCH, SEQLEN, heads, HEAD_DIM, generator=g, dtype=torch.float64)
    return q, k, v, dout


def _case_seed(seed: int, case: tuple) -> int:
    """The inputs' seed of a case: the same in every process (crc32, not the salted hash())."""
    return seed + zlib.crc32(repr(case).encode()) % 1_000_000


# -- what the ranks run -----------------------------------------------------------------------


class _Blocks(Layout):
    """Contiguous blocks as a Layout of its own, which defines no grouped form."""

    name = "blocks"

    def multiple(self, world_size):
        return world_size

    def positions(self, seqlen, *, rank, world_size, device=None):
        self.check_rank(rank, world_size)
        self.check_seqlen(seqlen, world_size)
        local = seqlen // world_size
        return torch.arange(rank * local, (rank + 1) * local, device=device)


def _attend(group, place: int, world_size: int, case: tuple, seed: int):
    """This rank's shards of one case through ring_attention over ``group``: (place, [out, dq, dk, dv, lse])."""
    layout_name, causal, h, hkv, mask, dtype_name = case
    layout, dtype = _layout(layout_name), getattr(torch, dtype_name)
    window, cu = _mask(mask, seed)
    q, k, v, dout = _inputs(seed, h, hkv)
    shard = lambda t: layout.shard(t, rank=place, world_size=world_size)  # noqa: E731
    ql, kl, vl = (shard(t).to(dtype).requires_grad_() for t in (q, k, v))
    out, lse = ring_attention(ql, kl, vl, causal=causal, window=window, cu_seqlens=cu, layout=layout, group=group,
                              return_lse=True)
    out.backward(shard(dout).to(dtype))
    return place, [out.detach(), ql.grad, kl.grad, vl.grad, lse.detach()]


# Sparse modes through a HybridGroup: (mode, layout, causal, heads, kv_heads, mask, dtype, chunks).
# Keep flags and bucket ids are drawn over the whole sequence and sharded like q and k.
def sparse_cases(R: int, U: int) -> list[tuple]:
    h, hkv = HEADS[U][0]
    few = HEADS[U][2][1]  # fewer K/V heads than Ulysses ranks: each goes to several ranks
    grid = [
        ("block", "zigzag", True, h, hkv, "none", "float32", 1),
        ("qkdrop", "striped", True, h, few, "none", "float32", 1),
        ("hash", "contiguous", False, h, hkv, "docs", "float32", 1),
        ("hash", "striped", True, h, hkv, "docs-window", "bfloat16", 1),
    ]
    if (R, U) == (2, 2):
        grid += [("qkdrop", "zigzag", False, 8, 4, "window-two-sided", "float32", 2),  # pipelined chunks
                 ("hash", "striped", True, 8, 4, "none", "float32", 2)]
    return grid


SPARSE_BUCKETS = 3


def _sparsity(case: tuple, seed: int, shard=None):
    """The case's sparse mode over the whole sequence, or (``shard``) this rank's part of it."""
    mode, _, _, h, hkv = case[:5]
    g = torch.Generator().manual_seed(seed + 7)
    if mode == "block":  # 6 blocks of 8 tokens: local 2 + global 1 + 1 random
        from ringflash.sparse import block_pattern

        return block_pattern(SEQLEN, 8, local=2, global_=1, random=1, seed=seed % 1000, causal=case[2])
    shard = shard or (lambda t: t)  # noqa: E731
    if mode == "qkdrop":
        from ringflash.sparse import QKDrop

        q_keep = torch.rand(BATCH, SEQLEN, h, generator=g) < 0.7
        k_keep = torch.rand(BATCH, SEQLEN, hkv, generator=g) < 0.7
        return QKDrop(shard(q_keep), shard(k_keep))
    from ringflash.sparse import HashSparse

    qb = torch.randint(0, SPARSE_BUCKETS, (BATCH, SEQLEN, h), generator=g)
    kb = torch.randint(0, SPARSE_BUCKETS, (BATCH, SEQLEN, hkv), generator=g)
    return HashSparse(shard(qb), shard(kb), SPARSE_BUCKETS)


def _attend_sparse(group, place: int, world_size: int, case: tuple, seed: int):
    """:func:`_attend` with the case's sparse mode."""
    _, layout_name, causal, h, hkv, mask, dtype_name, _ = case
    layout, dtype = _layout(layout_name), getattr(torch, dtype_name)
    window, cu = _mask(mask, seed)
    q, k, v, dout = _inputs(seed, h, hkv)
    shard = lambda t: layout.shard(t, rank=place, world_size=world_size)  # noqa: E731
    sparsity = _sparsity(case, seed, shard)
    ql, kl, vl = (shard(t).to(dtype).requires_grad_() for t in (q, k, v))
    out, lse = ring_attention(ql, kl, vl, causal=causal, window=window, cu_seqlens=cu, layout=layout, group=group,
                              return_lse=True, sparsity=sparsity)
    out.backward(shard(dout).to(dtype))
    return place, [out.detach(), ql.grad, kl.grad, vl.grad, lse.detach()]


def _bad_sparsity(group, world_size: int) -> dict:
    """ValueErrors of bad sparse input through a HybridGroup (None where nothing was raised)."""
    from ringflash.sparse import HashSparse, QKDrop

    h, hkv = HEADS[group.ulysses_size][0]
    L = SEQLEN // world_size
    q = torch.randn(BATCH, L, h, HEAD_DIM)
    k = torch.randn(BATCH, L, hkv, HEAD_DIM)
    ids = torch.zeros(BATCH, L, h, dtype=torch.long)
    kids = torch.zeros(BATCH, L, hkv, dtype=torch.long)
    bad_on_last = ids.clone()
    if group.rank == world_size - 1:
        bad_on_last[0, 0, 0] = 5  # out of range on one rank only: every rank must raise
    tries = {
        "keep-shape": QKDrop(torch.ones(BATCH, L, h + 1, dtype=torch.bool), torch.ones(BATCH, L, hkv, dtype=torch.bool)),
        "buckets-dtype": HashSparse(ids.float(), kids, 2),
        "bucket-range": HashSparse(bad_on_last, kids, 2),
    }
    res = {}
    for name, sp in tries.items():
        try:
            ring_attention(q, k, k, causal=True, layout="striped", group=group, sparsity=sp)
            res[name] = None
        except (ValueError, TypeError) as e:
            res[name] = str(e)
    return res


def _bad_splits(group, U: int) -> dict:
    """Calls that must raise ValueError on every rank before any communication: name -> message."""
    calls = {  # name -> (heads, kv_heads, local_seqlen, layout)
        "query-heads": (U + 1, 1, 6, "striped"),  # query heads not a multiple of U
        "kv-heads": (U * (U + 1), U + 1, 6, "striped"),  # U neither divides the K/V heads nor is a multiple of them
        "zigzag-odd": (2 * U, U, 3, "zigzag"),  # a zigzag shard has two equal halves
        "no-grouped-form": (2 * U, U, 6, _Blocks()),  # a layout whose groups of U ranks form no layout
    }
    errors = {}
    for name, (h, hkv, local, layout) in calls.items():
        q = torch.randn(1, local, h, HEAD_DIM)
        k = v = torch.randn(1, local, hkv, HEAD_DIM)
        try:
            ring_attention(q, k, v, causal=True, layout=layout, group=group)
            errors[name] = None
        except ValueError as e:
            errors[name] = str(e)
    return errors


def _spawned(rank, world_size, meshes, seed):
    """Every mesh of this world size, one after the other, in the same processes."""
    return pack({mesh: _mesh_grid(rank, world_size, *mesh, seed) for mesh in meshes})


def _mesh_grid(rank, world_size, R, U, seed):
    import torch.distributed as dist

    # Every rank creates every group, in the same order.
    rings = [dist.new_group([r * U + u for r in range(R)]) for u in range(U)]
    ulysses = [dist.new_group([r * U + u for u in range(U)]) for r in range(R)]
    hybrid = HybridGroup(rings[rank % U], ulysses[rank // U])
    res = {"group": (hybrid.rank, hybrid.size, hybrid.ring_size, hybrid.ring_rank, hybrid.ulysses_size,
                     hybrid.ulysses_rank)}
    res["errors"] = _bad_splits(hybrid, U)
    for case in cases(R, U):
        s = _case_seed(seed, case)
        res[case] = _attend(hybrid, hybrid.rank, world_size, case, s)
        if case[-1] == "bfloat16":  # the bar: plain ring attention over the flat group, same shards
            res[("flat", case)] = _attend(None, rank, world_size, case, s)
    for case in sparse_cases(R, U):
        s = _case_seed(seed, case)
        chunked = HybridGroup(hybrid.ring, hybrid.ulysses, chunks=case[-1])
        res[case] = _attend_sparse(chunked, chunked.rank, world_size, case, s)
        if case[6] == "bfloat16":
            res[("flat", case)] = _attend_sparse(None, rank, world_size, case, s)
    res["sparse-errors"] = _bad_sparsity(hybrid, world_size)
    if (R, U) == (2, 2):
        res.update(_extras_2x2(rank, world_size, rings, ulysses, hybrid, seed))
    return res


# A case for the extra constructions on 2x2: K/V heads fewer than U, documents and a window.
EXTRA_CASE = ("zigzag", True, 4, 1, "docs-window", "float32")


def _extras_2x2(rank, world_size, rings, ulysses, hybrid, seed):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    res = {}
    s = _case_seed(seed, EXTRA_CASE)
    mine = _attend(hybrid, hybrid.rank, world_size, EXTRA_CASE, s)
    res["new_group"] = mine

    # A ring of one (Ulysses alone) and a Ulysses group of one (the ring alone).
    singles = [dist.new_group([i]) for i in range(world_size)]
    only_ulysses = HybridGroup(singles[rank], None)
    only_ring = HybridGroup(None, singles[rank])
    res["1x4"] = _attend(only_ulysses, only_ulysses.rank, world_size, EXTRA_CASE, s)
    res["4x1"] = _attend(only_ring, only_ring.rank, world_size, EXTRA_CASE, s)
    res["4x1-flat"] = _attend(None, rank, world_size, EXTRA_CASE, s)
    res["1x4-sizes"] = (only_ulysses.ring_size, only_ulysses.ulysses_size, only_ring.ring_size, only_ring.ulysses_size)

    # The other way round: ring groups of consecutive ranks, Ulysses groups strided. The place
    # r * U + u of rank g is then (g % 2) * 2 + g // 2, which cuts its shards.
    transposed = HybridGroup(ulysses[rank // 2], rings[rank % 2])
    res["transposed"] = _attend(transposed, transposed.rank, world_size, EXTRA_CASE, s)

    # From a 2-D DeviceMesh (ring, ulysses): the same groups as above, the same results.
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("ring", "ulysses"))
    from_mesh = HybridGroup.from_mesh(mesh["ring", "ulysses"])
    place, got = _attend(from_mesh, from_mesh.rank, world_size, EXTRA_CASE, s)
    res["mesh"] = (place, [torch.equal(a, b) for a, b in zip(got, mine[1])])
    try:
        HybridGroup.from_mesh(mesh["ring"])
        res["mesh-1d"] = None
    except ValueError as e:
        res["mesh-1d"] = str(e)

    res["chunks"] = _chunked(rings[rank % 2], ulysses[rank // 2], hybrid, world_size, seed)
    res["contexts"] = _contexts(hybrid, world_size, seed)
    res["mha"] = {i: _mha_sharded(hybrid, c, seed + 50_000 + i) for i, c in enumerate(MHA_CASES)}
    res["gpt"] = {i: _gpt_sharded(hybrid, c, seed + 60_000 + i) for i, c in enumerate(GPT_CASES)}
    return res


# For the pipelined heads: 8 query and 4 K/V heads on 2 x 2 (4 and 2 per Ulysses rank).
CHUNK_CASES = [("zigzag", True, 8, 4, "docs-window", "float32"), ("striped", False, 8, 4, "none", "bfloat16")]


def _chunked(ring, ulysses, hybrid, world_size, seed):
    """HybridGroup(chunks=...): this rank's shards of each case (outputs, gradients, LSE), of the
    same case without chunks (the bfloat16 bar) and of an output without the LSE; the chunk
    counts the calls took."""
    from ringflash import ulysses as ulysses_mod

    res = {"pipelined": []}
    real = ulysses_mod._pipelined

    def counted(*args, **kwargs):
        res["pipelined"].append(args[8])  # C
        return real(*args, **kwargs)

    ulysses_mod._pipelined = counted
    for requested in (2, 4, 3):  # each -> 2 chunks, the K/V heads per rank
        piped = HybridGroup(ring, ulysses, chunks=requested)
        for case in CHUNK_CASES:
            s = _case_seed(seed, case)
            res[(requested, case)] = _attend(piped, piped.rank, world_size, case, s)
        layout_name, causal, h, hkv, mask, _ = case = CHUNK_CASES[0]
        window, cu = _mask(mask, _case_seed(seed, case))
        q = _inputs(_case_seed(seed, case), h, hkv)[0]
        k, v = _inputs(_case_seed(seed, case), h, hkv)[1:3]
        layout = _layout(layout_name)
        q, k, v = (layout.shard(t, rank=hybrid.rank, world_size=world_size).float() for t in (q, k, v))
        out = ring_attention(q, k, v, causal=causal, window=window, cu_seqlens=cu, layout=layout, group=piped)
        res[(requested, "no-lse")] = (piped.rank, [out])
    for case in CHUNK_CASES:
        res[("plain", case)] = _attend(hybrid, hybrid.rank, world_size, case, _case_seed(seed, case))
    ulysses_mod._pipelined = real
    res["repr"] = repr(HybridGroup(ring, ulysses, chunks=2))
    for bad in (0, 1.5, True):
        try:
            HybridGroup(ring, ulysses, chunks=bad)
            res[("bad", bad)] = None
        except ValueError as e:
            res[("bad", bad)] = str(e)
    return res


class _TaggedStriped(Striped):
    """Striped with a list attribute: a Layout that cannot be hashed (its grouped form is a plain Striped)."""

    def __init__(self):
        super().__init__(1)
        self.tags = ["mine"]


CONTEXT_SEQLEN = 96  # a length no other call uses: the first call of each shape below makes its orders


def _in_context(group, world_size, layout, seed, context=None) -> list[float]:
    """Errors of this rank's shards against float64: of the output of a forward run in
    ``context``, or (``context`` None) of the output and gradients of a training call."""
    g = torch.Generator().manual_seed(seed)
    q, k, v, dout = (torch.randn(BATCH, CONTEXT_SEQLEN, h, HEAD_DIM, generator=g, dtype=torch.float64)
                     for h in (4, 1, 1, 4))
    qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
    ref, _ = reference.attention(qq, kk, vv, causal=True)
    ref.backward(dout)
    shard = lambda t: layout.shard(t, rank=group.rank, world_size=world_size)  # noqa: E731
    if context is not None:
        with context:
            out = ring_attention(*(shard(t).float() for t in (q, k, v)), causal=True, layout=layout, group=group)
        return [rel(out, shard(ref))]
    ql, kl, vl = (shard(t).float().requires_grad_() for t in (q, k, v))
    out = ring_attention(ql, kl, vl, causal=True, layout=layout, group=group)
    out.backward(shard(dout).float())
    return [rel(a, shard(b)) for a, b in zip((out, ql.grad, kl.grad, vl.grad), (ref, qq.grad, kk.grad, vv.grad))]


def _contexts(group, world_size, seed) -> dict:
    """What one call keeps for the next (the gather orders) must not depend on the call's context."""
    from ringflash import ulysses

    def attempt(fn):
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - reported to the test
            return f"{type(e).__name__}: {e}"

    striped, zigzag, tagged = get_layout("striped"), get_layout("zigzag"), _TaggedStriped()
    res = {}
    # Evaluation under inference_mode first, then training calls of the same shape.
    res["inference_mode"] = attempt(lambda: _in_context(group, world_size, striped, seed, torch.inference_mode()))
    res["after_inference_mode"] = attempt(lambda: _in_context(group, world_size, striped, seed + 1))
    res["orders_are_normal_tensors"] = [float(t.is_inference()) for pair in ulysses._ORDERS.values() for t in pair]
    # The first call of a shape under a default device (a model built under `with torch.device(...)`).
    res["default_device"] = attempt(lambda: _in_context(group, world_size, zigzag, seed + 2, torch.device("meta")))
    res["after_default_device"] = attempt(lambda: _in_context(group, world_size, zigzag, seed + 3))
    # A Layout of the user's own that cannot be hashed: orders made per call.
    res["unhashable_layout"] = attempt(lambda: _in_context(group, world_size, tagged, seed + 4))
    res["unhashable_layout_again"] = attempt(lambda: _in_context(group, world_size, tagged, seed + 5))
    return res


# -- modules and the GPT (2x2) ----------------------------------------------------------------

DIM, MHA_HEADS = 32, 4
MHA_CASES = [  # (layout, kv_heads, causal, window, packed documents, sparsity)
    ("striped", 2, True, None, False, None),
    ("zigzag", 1, True, (5, 0), False, None),
    ("contiguous", 4, False, None, True, None),
    ("striped", 2, True, None, True, "hash:3"),
    ("zigzag", 1, True, None, False, "qkdrop:0.5"),
    ("striped", 4, True, None, False, "block:size=8,local=2,global=1"),
]
GPT_CONFIG = GPTConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=1, rope_base=100.0)
GPT_CASES = [("zigzag", False), ("striped", True)]  # (layout, packed documents)
IGNORED = 5  # the first IGNORED targets of every row are ignored: the ranks' token counts differ


def _mha(seed, case, group=None) -> MultiheadAttention:
    layout, hkv, causal, window, _, sparsity = case
    torch.manual_seed(seed)  # the same weights on every rank and in the oracle
    return MultiheadAttention(DIM, MHA_HEADS, num_kv_heads=hkv, causal=causal, window=window, layout=layout,
                              bias=True, rope_base=100.0, group=group, sparsity=sparsity, sparsity_seed=seed % 97)


def _mha_data(seed):
    g = torch.Generator().manual_seed(seed + 1)
    return torch.randn(BATCH, SEQLEN, DIM, generator=g), torch.randn(BATCH, SEQLEN, DIM, generator=g)


def _mha_sharded(group, case, seed):
    from ringflash.comm import all_reduce_sum

    cu = _docs(seed) if case[4] else None
    mha = _mha(seed, case, group)
    x, dout = _mha_data(seed)
    ids = torch.zeros(BATCH, SEQLEN, dtype=torch.int64)
    pos = shard_batch(ids, layout=case[0], group=group, cu_seqlens=cu)[2]
    xl = x.index_select(1, pos).requires_grad_()
    out = mha(xl, cu_seqlens=cu)
    out.backward(dout.index_select(1, pos))
    grads = [all_reduce_sum(p.grad, group) for p in mha.parameters()]  # each rank holds its tokens' share
    return group.rank, pos, [out.detach(), xl.grad], grads


def _tokens(seed):
    g = torch.Generator().manual_seed(seed + 1)
    ids = torch.randint(0, GPT_CONFIG.vocab_size, (BATCH, SEQLEN), generator=g)
    labels = ids.clone()
    labels[:, : IGNORED + 1] = -100  # after the shift: the first IGNORED targets
    return ids, labels


def _gpt(seed, layout, group=None) -> GPT:
    torch.manual_seed(seed)
    return GPT(dataclasses.replace(GPT_CONFIG, layout=layout), group=group)


def _gpt_sharded(group, case, seed):
    from ringflash.batch import average_gradients, unshard

    layout, docs = case
    cu = _docs(seed) if docs else None
    model = _gpt(seed, layout, group)
    ids, labels = _tokens(seed)
    ids_l, labels_l = shard_batch(ids, labels, layout=layout, group=group, cu_seqlens=cu)[:2]
    logits, loss = model(ids_l, labels_l, cu_seqlens=cu)
    loss.backward()
    average_gradients(model.parameters(), group=group)
    logits = unshard(logits.detach(), layout=layout, group=group)
    return loss.detach(), logits, {n: p.grad.clone() for n, p in model.named_parameters()}


# -- the tests --------------------------------------------------------------------------------

_SEED = random.randrange(1 << 30)  # fresh inputs every run; printed on failure
_RUNS: dict = {}
# One spawn per world size (starting processes is most of the cost): its meshes run in turn.
SPAWNS = {4: [(2, 2)], 6: [(2, 3), (3, 2)], 8: [(2, 4), (4, 2)]}


def grid(mesh: tuple[int, int]) -> list[dict]:
    """Every rank's results for ``mesh`` (its world size is spawned once; a failure is kept and re-raised)."""
    world_size = mesh[0] * mesh[1]
    if world_size not in _RUNS:
        try:
            _RUNS[world_size] = [unpack(r) for r in spawn(_spawned, world_size, SPAWNS[world_size], _SEED, timeout=240)]
        except RuntimeError as e:
            _RUNS[world_size] = e
    if isinstance(_RUNS[world_size], Exception):
        raise _RUNS[world_size]
    return [res[mesh] for res in _RUNS[world_size]]


def _assemble(entries, layout) -> list[torch.Tensor]:
    """Full tensors from every rank's (place, [shards]), the LSE along its own sequence dim."""
    entries = sorted(entries, key=lambda e: e[0])
    assert [p for p, _ in entries] == list(range(len(entries))), "every place of the group exactly once"
    tensors = list(zip(*(shards for _, shards in entries)))
    return [layout.assemble(list(ts), dim=2 if i == 4 else 1) for i, ts in enumerate(tensors)]


def _reference(case, seed, round_to=None) -> list[torch.Tensor]:
    """float64 attention over the full sequence: [out, dq, dk, dv, lse] (inputs rounded to ``round_to`` first)."""
    layout_name, causal, h, hkv, mask, _ = case
    window, cu = _mask(mask, seed)
    q, k, v, dout = _inputs(seed, h, hkv)
    if round_to is not None:
        q, k, v, dout = (t.to(round_to).double() for t in (q, k, v, dout))
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out, lse = reference.attention(q, k, v, causal=causal, window=window, cu_seqlens=cu)
    out.backward(dout)
    return [out.detach(), q.grad, k.grad, v.grad, lse.detach()]


def _errors(got, ref) -> dict:
    return {name: rel(g, r) for name, g, r in zip(NAMES, got, ref)}


def _case_id(case):
    layout, causal, h, hkv, mask, dtype = case
    return f"{layout}-{'causal' if causal else 'full'}-h{h}kv{hkv}-{mask}-{dtype}"


ALL_CASES = [(mesh, case) for mesh in MESHES for case in cases(*mesh)]


def test_every_feature_on_2x2_and_8_ranks():
    """The grid's coverage: every layout, causal and full, each head split, mask and dtype."""
    for mesh in [(2, 2), (2, 4), (4, 2)]:
        grid_cases = cases(*mesh)
        assert {(c[0], c[1]) for c in grid_cases} >= {(lay, c) for lay in LAYOUTS for c in (True, False)}
        assert {(c[2], c[3]) for c in grid_cases} == set(HEADS[mesh[1]])
        assert {c[4] for c in grid_cases} == set(MASKS)
        assert {c[5] for c in grid_cases} == {"float32", "bfloat16"}
        assert min(c[3] for c in grid_cases) < mesh[1], "K/V heads fewer than Ulysses ranks"
    seeds = [_case_seed(0, c) for c in cases(2, 4)]
    assert len(set(seeds)) == len(seeds)


@pytest.mark.parametrize("mesh", MESHES, ids=lambda m: f"{m[0]}x{m[1]}")
def test_hybrid_group_places(mesh):
    R, U = mesh
    for rank, res in enumerate(grid(mesh)):
        assert res["group"] == (rank, R * U, R, rank // U, U, rank % U), (rank, res["group"])


@pytest.mark.parametrize("mesh,case", ALL_CASES, ids=[f"{m[0]}x{m[1]}-{_case_id(c)}" for m, c in ALL_CASES])
def test_hybrid_matches_float64(mesh, case):
    results = grid(mesh)
    seed = _case_seed(_SEED, case)
    layout, dtype = _layout(case[0]), getattr(torch, case[5])
    got = _assemble([res[case] for res in results], layout)
    assert got[0].dtype == dtype and got[4].dtype == torch.float32
    errs = _errors(got, _reference(case, seed))
    ctx = f"seed {_SEED}: {errs}"
    if dtype == torch.float32:
        assert all(e < FP32_TOL for e in errs.values()), ctx
        return
    flat = _errors(_assemble([res[("flat", case)] for res in results], layout), _reference(case, seed))
    for name in NAMES[:4]:
        assert errs[name] <= BF16_FACTOR * flat[name] + BF16_SLACK, (
            f"{name}: hybrid {errs[name]:.2e} vs flat ring {flat[name]:.2e} in bfloat16; {ctx}")
    lse = rel(got[4], _reference(case, seed, round_to=dtype)[4])
    assert lse < FP32_TOL, f"lse {lse:.2e} against float64 on the rounded inputs; {ctx}"


def _reference_sparse(case, seed, round_to=None) -> list[torch.Tensor]:
    """float64 attention over the full sequence with the case's sparse mode: [out, dq, dk, dv, lse]."""
    _, layout_name, causal, h, hkv, mask, _, _ = case
    window, cu = _mask(mask, seed)
    q, k, v, dout = _inputs(seed, h, hkv)
    if round_to is not None:
        q, k, v, dout = (t.to(round_to).double() for t in (q, k, v, dout))
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out, lse = reference.attention(q, k, v, causal=causal, window=window, cu_seqlens=cu, sparsity=_sparsity(case, seed))
    out.backward(dout)
    return [out.detach(), q.grad, k.grad, v.grad, lse.detach()]


SPARSE_CASES = [(mesh, case) for mesh in MESHES for case in sparse_cases(*mesh)]


@pytest.mark.parametrize("mesh,case", SPARSE_CASES,
                         ids=[f"{m[0]}x{m[1]}-{c[0]}-{_case_id(c[1:7])}-chunks{c[7]}" for m, c in SPARSE_CASES])
def test_sparse_modes_match_float64(mesh, case):
    """Block patterns, QK-dropping and hash buckets through Ulysses x ring (keep flags and bucket
    ids sharded like q and k, then moved with their heads), with masks, GQA (K/V heads fewer than
    Ulysses ranks too) and pipelined head chunks, against float64 with the same mask over the full
    sequence: float32 < 1e-5; bfloat16 within 2x of the plain ring over the flat group."""
    results = grid(mesh)
    seed = _case_seed(_SEED, case)
    layout, dtype = _layout(case[1]), getattr(torch, case[6])
    got = _assemble([res[case] for res in results], layout)
    ref = _reference_sparse(case, seed)
    errs = _errors(got, ref)
    fin = torch.isfinite(ref[4])
    errs["lse"] = rel(got[4][fin], ref[4][fin])
    assert torch.equal(torch.isfinite(got[4]), fin), "the rows that see nothing"
    ctx = f"seed {_SEED}: {errs}"
    if dtype == torch.float32:
        assert all(e < FP32_TOL for e in errs.values()), ctx
        return
    flat = _errors(_assemble([res[("flat", case)] for res in results], layout), ref)
    for name in NAMES[:4]:
        assert errs[name] <= BF16_FACTOR * flat[name] + BF16_SLACK, (
            f"{name}: hybrid {errs[name]:.2e} vs flat ring {flat[name]:.2e} in bfloat16; {ctx}")


@pytest.mark.parametrize("mesh", MESHES, ids=lambda m: f"{m[0]}x{m[1]}")
def test_bad_sparse_input_raises_on_every_rank(mesh):
    expect = {"keep-shape": "q_keep must have shape", "buckets-dtype": "must be an integer tensor",
              "bucket-range": "[0, num_buckets)"}
    for rank, res in enumerate(grid(mesh)):
        for name, text in expect.items():
            msg = res["sparse-errors"][name]
            assert msg is not None and text in msg, (name, rank, msg)


@pytest.mark.parametrize("mesh", MESHES, ids=lambda m: f"{m[0]}x{m[1]}")
def test_bad_splits_raise_on_every_rank(mesh):
    expect = {
        "query-heads": "query heads are not a multiple",
        "kv-heads": "key/value heads over a Ulysses group",
        "zigzag-odd": "gives every rank a multiple of 2 tokens",
        "no-grouped-form": "has no grouped form",
    }
    for rank, res in enumerate(grid(mesh)):
        for name, text in expect.items():
            msg = res["errors"][name]
            assert msg is not None, f"{name}: no ValueError on rank {rank}"
            assert text in msg, (name, rank, msg)


def _extras():
    return grid((2, 2))


def test_ring_of_one_and_ulysses_group_of_one():
    results = _extras()
    seed = _case_seed(_SEED, EXTRA_CASE)
    layout, ref = _layout(EXTRA_CASE[0]), _reference(EXTRA_CASE, seed)
    assert all(res["1x4-sizes"] == (1, 4, 4, 1) for res in results)
    for key in ("1x4", "4x1"):
        errs = _errors(_assemble([res[key] for res in results], layout), ref)
        assert all(e < FP32_TOL for e in errs.values()), (key, _SEED, errs)
    # A Ulysses group of one is the plain ring, bit for bit.
    for res in results:
        assert res["4x1"][0] == res["4x1-flat"][0]
        assert all(torch.equal(a, b) for a, b in zip(res["4x1"][1], res["4x1-flat"][1]))


def test_groups_the_other_way_round():
    """Ring groups of consecutive ranks: each rank's shard is that of its place r * U + u, not of its global rank."""
    results = _extras()
    places = [res["transposed"][0] for res in results]
    assert places == [0, 2, 1, 3]
    got = _assemble([res["transposed"] for res in results], _layout(EXTRA_CASE[0]))
    errs = _errors(got, _reference(EXTRA_CASE, _case_seed(_SEED, EXTRA_CASE)))
    assert all(e < FP32_TOL for e in errs.values()), (_SEED, errs)


def test_from_device_mesh():
    results = _extras()
    for rank, res in enumerate(results):
        place, equal = res["mesh"]
        assert place == rank and all(equal), (rank, equal)
        assert res["mesh-1d"] is not None and "2-D DeviceMesh" in res["mesh-1d"], res["mesh-1d"]
    got = _assemble([res["new_group"] for res in results], _layout(EXTRA_CASE[0]))
    errs = _errors(got, _reference(EXTRA_CASE, _case_seed(_SEED, EXTRA_CASE)))
    assert all(e < FP32_TOL for e in errs.values()), (_SEED, errs)


def test_pipelined_head_chunks_match_float64():
    """HybridGroup(chunks=): the heads of each rank in chunks whose all-to-alls overlap the other
    chunks' rings, against float64 attention over the full sequence (float32: 1e-5; bfloat16:
    within 2x of the same group without chunks), with and without the LSE, through the
    backward; counts that do not divide the heads fall back to the largest that does; bad
    counts raise."""
    from ringflash.ulysses import _chunk_count

    assert (_chunk_count(2, 4, 2), _chunk_count(4, 4, 2), _chunk_count(3, 6, 3), _chunk_count(8, 4, 1)) == (2, 2, 3, 1)
    assert _chunk_count(4, 6, 3) == 3 and _chunk_count(2, 6, 3) == 1
    results = [res["chunks"] for res in _extras()]
    for chunks in results:
        assert chunks["repr"] == "HybridGroup(ring=2, ulysses=2, chunks=2)"
        assert chunks["pipelined"] == [2] * 9  # 3 counts x (2 cases + the call without the LSE)
        for bad in (0, 1.5, True):
            assert chunks[("bad", bad)] is not None and "chunks must be an int >= 1" in chunks[("bad", bad)]
    for case in CHUNK_CASES:
        layout, seed = _layout(case[0]), _case_seed(_SEED, case)
        ref = _reference(case, seed)
        plain = _errors(_assemble([c[("plain", case)] for c in results], layout), ref)
        for requested in (2, 4, 3):
            errs = _errors(_assemble([c[(requested, case)] for c in results], layout), ref)
            if case[-1] == "float32":
                assert all(e < FP32_TOL for e in errs.values()), (requested, case, errs)
            else:
                for name in NAMES[:4]:
                    assert errs[name] <= BF16_FACTOR * plain[name] + BF16_SLACK, (requested, case, name, errs, plain)
                assert errs["lse"] < FP32_TOL or errs["lse"] <= BF16_FACTOR * plain["lse"] + BF16_SLACK
    case = CHUNK_CASES[0]
    ref_out = _reference(case, _case_seed(_SEED, case))[0]
    for requested in (2, 4, 3):
        entries = sorted((c[(requested, "no-lse")] for c in results), key=lambda e: e[0])
        out = _layout(case[0]).assemble([e[1][0] for e in entries], dim=1)
        assert rel(out, ref_out) < FP32_TOL, requested


CONTEXTS = ["inference_mode", "after_inference_mode", "orders_are_normal_tensors", "default_device",
            "after_default_device", "unhashable_layout", "unhashable_layout_again"]


@pytest.mark.parametrize("name", CONTEXTS)
def test_calls_in_any_context_then_training(name):
    for rank, res in enumerate(_extras()):
        errs = res["contexts"][name]
        assert isinstance(errs, list) and errs, f"rank {rank}: {errs}"
        assert all(e < FP32_TOL for e in errs), (rank, errs, _SEED)  # orders: 1.0 for an inference tensor


@pytest.mark.parametrize("i", range(len(MHA_CASES)), ids=[f"{c[0]}-kv{c[1]}-{c[5] or 'dense'}" for c in MHA_CASES])
def test_multihead_attention_matches_one_process(i):
    case, seed = MHA_CASES[i], _SEED + 50_000 + i
    layout = get_layout(case[0])
    cu = _docs(seed) if case[4] else None
    mha = _mha(seed, case)
    x, dout = _mha_data(seed)
    x.requires_grad_()
    out = mha(x, cu_seqlens=cu)
    out.backward(dout)
    full = [out.detach(), x.grad]
    params = [p.grad for p in mha.parameters()]
    entries = []
    for res in _extras():
        place, pos, shards, grads = res["mha"][i]
        assert torch.equal(pos, layout.positions(SEQLEN, rank=place, world_size=4))
        entries.append((place, shards))
        for g, ref in zip(grads, params):  # summed over the hybrid group: the same on every rank
            assert rel(g, ref) < FP32_TOL, (place, rel(g, ref), _SEED)
    for name, g, ref in zip(["out", "dx"], _assemble_rows(entries, layout), full):
        assert rel(g, ref) < FP32_TOL, (name, rel(g, ref), _SEED)


def _assemble_rows(entries, layout):
    entries = sorted(entries, key=lambda e: e[0])
    return [layout.assemble(list(ts)) for ts in zip(*(s for _, s in entries))]


@pytest.mark.parametrize("i", range(len(GPT_CASES)), ids=[f"{c[0]}{'-docs' if c[1] else ''}" for c in GPT_CASES])
def test_gpt_matches_one_process(i):
    (layout, docs), seed = GPT_CASES[i], _SEED + 60_000 + i
    cu = _docs(seed) if docs else None
    model = _gpt(seed, layout)
    ids, labels = _tokens(seed)
    targets = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], dim=1)
    if cu is not None:  # the last token of a document predicts nothing
        targets[:, torch.tensor(cu[1:-1]) - 1] = -100
    logits, loss = model(ids, targets, cu_seqlens=cu)
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    for rank, res in enumerate(_extras()):
        loss_r, logits_r, grads_r = res["gpt"][i]
        assert abs(loss_r.item() - loss.item()) < FP32_TOL * abs(loss.item()), (rank, loss_r, loss, _SEED)
        assert rel(logits_r, logits.detach()) < FP32_TOL, (rank, rel(logits_r, logits), _SEED)
        assert grads_r.keys() == grads.keys()
        for n, g in grads.items():
            assert rel(grads_r[n], g) < FP32_TOL, (rank, n, rel(grads_r[n], g), _SEED)


# -- layouts grouped over Ulysses groups (no processes) ----------------------------------------


def _definition(layout: Layout, seqlen: int, rank: int, world_size: int) -> list[int]:
    """A layout's positions, written out token by token from its definition."""
    if isinstance(layout, Contiguous):
        n = seqlen // world_size
        return list(range(rank * n, (rank + 1) * n))
    if isinstance(layout, Striped):
        return [t for t in range(seqlen) if (t // layout.stripe) % world_size == rank]
    if isinstance(layout, Zigzag):
        c = seqlen // (2 * world_size)
        return [*range(rank * c, (rank + 1) * c), *range((2 * world_size - 1 - rank) * c, (2 * world_size - rank) * c)]
    raise AssertionError(layout)


SPLITS = [(2, 1), (2, 2), (4, 2), (4, 4), (6, 2), (6, 3), (8, 2), (8, 4), (12, 3)]  # (P, U)


@pytest.mark.parametrize("P,U", SPLITS, ids=[f"P{p}-U{u}" for p, u in SPLITS])
@pytest.mark.parametrize("layout", [Contiguous(), Striped(), Striped(3), Zigzag()], ids=repr)
def test_grouped_layout_and_gather_order(layout, P, U):
    expected = Striped(layout.stripe * U) if isinstance(layout, Striped) else type(layout)()
    grouped = layout.grouped(U)
    assert grouped == expected, (layout, U, grouped)
    R = P // U
    seqlen = layout.multiple(P) * 2
    for r in range(R):
        # The U shards of ranks r*U .. r*U+U-1, in that order, concatenated ...
        cat = [t for u in range(U) for t in _definition(layout, seqlen, r * U + u, P)]
        order = layout.gather_order(seqlen, inner=U, outer_rank=r, world_size=P)
        assert order.dtype == torch.int64 and sorted(order.tolist()) == list(range(len(cat)))
        # ... and put in order are the shard of the grouped layout over R ranks.
        assert [cat[i] for i in order.tolist()] == _definition(expected, seqlen, r, R)


def test_layout_without_grouped_form():
    blocks = _Blocks()
    assert blocks.grouped(1) is blocks
    with pytest.raises(ValueError, match="no grouped form"):
        blocks.grouped(2)
