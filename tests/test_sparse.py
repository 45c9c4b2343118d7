"""Sparse attention (:mod:`ringflash.sparse`): block patterns, QK-dropping and hash buckets, through
ring attention, ``flash_attention`` and ``MultiheadAttention``.

Every world size (gloo; P = 1, 2, 3, 4) runs in one spawn of 4 ranks (starting processes is most
of the cost): P = 4 on the default group, P = 3 and P = 1 side by side on subgroups, then P = 2
on a subgroup, where a rank's place in the ring is not its global rank (``GROUP_RANKS``). In
each, every rank runs the whole grid on its shards (sparse modes x layouts x causal, GQA,
float32; a few cases with packed documents and a window; every mode once more in bfloat16, over
one layout each) and returns its shards of the output, the gradients and the LSE. The
parametrized tests assemble them and compare with the float64 oracle over the whole sequence
(``reference.attention(..., sparsity=)``, autograd for the gradients), computed here from the same
seed. QK-dropping and hashing take this rank's shard of the keep flags or bucket ids, cut by the
layout like q; a block pattern is global, the same object on every rank. Bars: float32, relative
error below 1e-5 for out, dq, dk, dv and the LSE; bfloat16, within 2x of the oracle run in
bfloat16 on one process (the same bar as tests/test_masks.py; measured ratios stay below 1.4).
Queries that see no key (dropped, alone in their bucket, or in an empty pattern row) must come
out as O = 0, dQ = 0 and LSE = -inf exactly.

The same runs count ring transfers (P = 4: steps that no block of a pattern reaches are not
run, and a pattern may hide every key from a rank's queries); at P = 2 they check that bad sparse
input raises on every rank before any communication, run ``MultiheadAttention(sparsity=...)``
sharded against the same module on one process, and run each mode over the Triton kernels
(under Triton's CPU interpreter).

The single-process tests check the oracle against masks built here by hand, the ring's plan
(``mask.block_visible`` with a pattern) against the brute-force rule, ``flash_attention`` with each
mode, the pattern helpers, ``keep_random``, ``hash_buckets``, ``parse_sparsity`` and the input
checks. The Triton kernels with these masks: tests/test_sparse_kernels.py.
"""

from __future__ import annotations

import itertools
import math
import pickle
import random
import traceback

import pytest
import torch

from common import brute_force_rule as brute_force_rules
from common import CountExchanges, pack, rel, unpack
from distributed import spawn
from ringflash import MultiheadAttention, flash_attention, get_layout, reference, ring_attention
from ringflash import mask as mask_mod
from ringflash import sparse as sp
from ringflash.sparse import BlockSparse, HashSparse, QKDrop

WORLD_SIZES = [1, 2, 3, 4]
LAYOUTS = ["contiguous", "striped", "zigzag"]
BATCH, HEADS, KV_HEADS, HEAD_DIM = 2, 4, 2, 16  # GQA: two query heads per K/V head
LOCAL_SEQLEN = 8  # per rank; even, so that zigzag splits


def grid_seqlen(world_size: int) -> int:
    """The global length of the grid at ``world_size``: 8 tokens a rank, 16 at P = 1. On 8 tokens
    the sparse modes often leave most queries one key or none; the gradients then nearly cancel,
    and a relative error weighs the rounding of their terms against a tiny norm (measured: up to
    1.2e-5 in float32 and 2.04x the one-process error in bfloat16 over 6000 draws; on 16 tokens
    at most 9e-7 and 1.45x)."""
    return max(16, LOCAL_SEQLEN * world_size)

NAMES = ["out", "dq", "dk", "dv"]
FP32_TOL = 1e-5
BF16_FACTOR = 2.0
ZERO_ABS = 1e-5  # where float64 gives exactly 0 (see check_against_oracle)

# block: the helpers' union of a local window, a global block and a random block (blocks of 4
# tokens, 2 at P = 1; with the diagonal block kept, no row is empty). block-ragged: a raw random
# pattern (about a third of the blocks kept, so that some rows, more so with causal, keep
# nothing) over blocks that straddle shards where the length allows (3 tokens at P = 3).
# qkdrop: about 40% of queries and keys dropped. hash: 3 buckets.
MODES = ["block", "block-ragged", "qkdrop", "hash"]

# (mode, layout, causal, window, documents, dtype)
CASES = [(m, lay, c, None, False, "float32") for m, lay, c in itertools.product(MODES, LAYOUTS, [False, True])]
CASES += [(m, LAYOUTS[i % 3], True, None, True, "float32") for i, m in enumerate(MODES)]
CASES += [(m, LAYOUTS[(i + 1) % 3], False, (5, 2), True, "float32") for i, m in enumerate(MODES)]
CASES += [(m, LAYOUTS[(i + 2) % 3], True, (6, 0), False, "float32") for i, m in enumerate(MODES)]
CASES += [(m, LAYOUTS[i % 3], True, None, False, "bfloat16") for i, m in enumerate(MODES)]


def case_id(case) -> str:
    mode, layout, causal, window, docs, dtype = case
    parts = [mode, layout, "causal" if causal else "full"]
    if window is not None:
        parts.append(f"window{window[0]}-{window[1]}")
    if docs:
        parts.append("docs")
    return "-".join(parts + [dtype])


def _ragged_block_size(seqlen: int) -> int:
    return 3 if seqlen % 3 == 0 else 2


def make_data(seed: int, seqlen: int, mode: str, causal: bool, docs: bool):
    """Full-sequence float64 q, k, v, dout, the global sparse mode and ``cu_seqlens`` (the same
    on every rank and in the parent: they depend on the arguments only)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(BATCH, seqlen, HEADS, HEAD_DIM, generator=g, dtype=torch.float64)
    k = torch.randn(BATCH, seqlen, KV_HEADS, HEAD_DIM, generator=g, dtype=torch.float64)
    v = torch.randn(BATCH, seqlen, KV_HEADS, HEAD_DIM, generator=g, dtype=torch.float64)
    dout = torch.randn(BATCH, seqlen, HEADS, HEAD_DIM, generator=g, dtype=torch.float64)
    if mode == "block":
        bs = 4 if seqlen >= 16 else 2
        sparsity = sp.block_pattern(seqlen, bs, local=1, global_=1, random=1, seed=seed, causal=causal)
    elif mode == "block-ragged":
        bs = _ragged_block_size(seqlen)
        nb = seqlen // bs
        sparsity = BlockSparse(torch.rand(nb, nb, generator=g) < 0.35, bs)
    elif mode == "qkdrop":
        sparsity = QKDrop(torch.rand(BATCH, seqlen, HEADS, generator=g) > 0.4,
                          torch.rand(BATCH, seqlen, KV_HEADS, generator=g) > 0.4)
    elif mode == "hash":
        ids = torch.int32 if seed % 2 else torch.int64
        sparsity = HashSparse(torch.randint(0, 3, (BATCH, seqlen, HEADS), generator=g, dtype=ids),
                              torch.randint(0, 3, (BATCH, seqlen, KV_HEADS), generator=g, dtype=ids), 3)
    else:
        raise AssertionError(mode)
    cu = None
    if docs:
        r = random.Random(seed)
        cuts = set(r.sample(range(1, seqlen), k=max(1, seqlen // 6)))
        c = r.randrange(1, seqlen - 1)
        cu = [0, *sorted(cuts | {c, c + 1}), seqlen]  # with a one-token document
    return q, k, v, dout, sparsity, cu


def shard_sparsity(sparsity, layout, rank: int, world_size: int):
    """This rank's share of a sparse mode: the same pattern, or its shard of the flags / ids."""
    cut = lambda t: layout.shard(t, rank=rank, world_size=world_size)  # noqa: E731
    if isinstance(sparsity, QKDrop):
        return QKDrop(cut(sparsity.q_keep), cut(sparsity.k_keep))
    if isinstance(sparsity, HashSparse):
        return HashSparse(cut(sparsity.q_buckets), cut(sparsity.k_buckets), sparsity.num_buckets)
    return sparsity


def oracle(q, k, v, dout, sparsity, causal, window, cu, dtype=torch.float64):
    """``reference.attention`` over the whole sequence in ``dtype``: [out, dq, dk, dv], lse
    (``dout`` None: [out], lse)."""
    q, k, v = (t.detach().to(dtype).requires_grad_(dout is not None) for t in (q, k, v))
    out, lse = reference.attention(q, k, v, causal=causal, window=window, cu_seqlens=cu, sparsity=sparsity)
    if dout is None:
        return [out.detach()], lse.detach()
    out.backward(dout.to(dtype))
    return [out.detach(), q.grad, k.grad, v.grad], lse.detach()


def _ring_shards(rank, world_size, q, k, v, dout, sparsity, causal, window, cu, layout, dtype, backend=None,
                 group=None):
    """This rank's shards through ring_attention: [out, dq, dk, dv, lse] (all local shards)."""
    cut = lambda t: layout.shard(t, rank=rank, world_size=world_size)  # noqa: E731
    ql, kl, vl = (cut(t).to(dtype).requires_grad_() for t in (q, k, v))
    out, lse = ring_attention(ql, kl, vl, causal=causal, window=window, cu_seqlens=cu, layout=layout,
                              return_lse=True, backend=backend, group=group,
                              sparsity=shard_sparsity(sparsity, layout, rank, world_size))
    out.backward(cut(dout).to(dtype))
    return [out.detach(), ql.grad, kl.grad, vl.grad, lse]


def _guard(results, key, fn):
    """Run one case; an exception becomes that case's result (the other cases still run)."""
    try:
        results[key] = fn()
    except Exception:  # noqa: BLE001
        results[key] = {"error": traceback.format_exc()}


def case_seed(seed: int, i: int) -> int:
    return seed + 1000 * i


# -- the grid of every world size --------------------------------------------------------


def _case(rank, world_size, group, seed, i, case):
    mode, layout_name, causal, window, docs, dtype_name = case
    q, k, v, dout, sparsity, cu = make_data(case_seed(seed, i), grid_seqlen(world_size), mode, causal, docs)
    got = _ring_shards(rank, world_size, q, k, v, dout, sparsity, causal, window, cu, get_layout(layout_name),
                       getattr(torch, dtype_name), group=group)
    return pack(got)


# Ring transfers at P = 4, contiguous layout unless named (8 tokens a rank, S = 32): name ->
# (layout, causal, the pattern, forward hops, backward hops). As in tests/test_masks.py: the plan
# runs n steps, n - 1 past the last one any rank needs; the forward makes one K/V exchange before
# each step but the last (n - 1 calls of one hop); the backward one K/V exchange and one hop of
# the dK/dV sum per step but the last, then the sums go straight to their owners, P - n + 1 hops.
def _rank0_blind(S):
    p = sp.local_blocks(S, 8, 1).pattern.clone()
    p[0] = False  # rank 0's queries see nothing at all
    return BlockSparse(p, 8)


TRANSFERS = {
    # A block per shard, its own only: every rank needs only its own keys, n = 1.
    "own-block-causal": ("contiguous", True, lambda S: sp.block_pattern(S, 8, local=1), [], []),
    "own-block-full": ("contiguous", False, lambda S: sp.block_pattern(S, 8, local=1), [], []),
    # Blocks of half a shard, each seeing itself: still no transfer.
    "half-shard-blocks": ("contiguous", True, lambda S: sp.block_pattern(S, 4, local=1), [], []),
    # Zigzag: rank r holds chunks r and 7 - r of 4 tokens; one block per chunk, its own only.
    "zigzag-own-chunks": ("zigzag", False, lambda S: sp.block_pattern(S, 4, local=1), [], []),
    # The previous block too (causal): the previous rank, n = 2.
    "previous-block": ("contiguous", True, lambda S: sp.block_pattern(S, 8, local=2), [1], [1, 1, 3]),
    # Blocks of two shards: ranks 1 and 3 see ranks 0 and 2, n = 2.
    "two-shard-blocks": ("contiguous", True, lambda S: sp.block_pattern(S, 16, local=1), [1], [1, 1, 3]),
    # Without causal the next block is the next rank's: the ring moves one hop each way (forward,
    # then backward, hops P - 1, from the rank's own K/V); in the backward each direction's dK/dV
    # sums go home at its end.
    "neighbour-blocks-full": ("contiguous", False, lambda S: sp.block_pattern(S, 8, local=2), [1, 3],
                              [1, 1, 3, 3, 1]),
    # A global first block: rank 3 needs rank 0, three steps back: the whole ring.
    "global-block": ("contiguous", True, lambda S: sp.block_pattern(S, 8, local=1, global_=1), [1] * 3, [1] * 7),
    # Queries that see nothing: O = 0, LSE = -inf, no gradient, and no transfer.
    "rank-0-sees-nothing": ("contiguous", True, _rank0_blind, [], []),
    "nothing-visible": ("striped", False, lambda S: BlockSparse(torch.zeros(4, 4, dtype=torch.bool), S // 4), [], []),
}


def _transfers(rank, world_size, group, seed):
    results = {}
    with CountExchanges() as calls:
        for i, (name, (layout_name, causal, make_pattern, _, _)) in enumerate(TRANSFERS.items()):
            def run(i=i, layout_name=layout_name, causal=causal, make_pattern=make_pattern):
                layout = get_layout(layout_name)
                S = LOCAL_SEQLEN * world_size
                q, k, v, dout, _, _ = make_data(seed + 70_000 + i, S, "qkdrop", causal, False)
                cut = lambda t: layout.shard(t, rank=rank, world_size=world_size)  # noqa: E731
                ql, kl, vl = (cut(t).float().requires_grad_() for t in (q, k, v))
                calls.take()
                out, lse = ring_attention(ql, kl, vl, causal=causal, layout=layout, sparsity=make_pattern(S),
                                          group=group, return_lse=True)
                fwd = calls.take()
                out.backward(cut(dout).float())
                bwd = calls.take()
                shards = pack([out.detach(), ql.grad, kl.grad, vl.grad, lse])
                return {"forward": fwd, "backward": bwd, "shards": shards}
            _guard(results, name, run)
    return results


def bad_sparsity(local_seqlen: int, world_size: int) -> dict:
    """name -> (the sparsity, exception type, words its message must contain). Every rank passes
    the same bad input (shaped for its shard). Keep flags and bucket ids of a wrong shape or dtype,
    bucket counts, ids out of range and patterns that do not tile the sequence raise
    ``ValueError``; what is not a tensor or not a sparse mode at all, ``TypeError``."""
    B, L, H, Hkv = 2, local_seqlen, HEADS, KV_HEADS
    S = L * world_size
    keep_q, keep_k = torch.ones(B, L, H, dtype=torch.bool), torch.ones(B, L, Hkv, dtype=torch.bool)
    ids_q, ids_k = torch.zeros(B, L, H, dtype=torch.int64), torch.zeros(B, L, Hkv, dtype=torch.int64)
    cases = {
        "qkdrop-q-length": (QKDrop(torch.ones(B, L + 1, H, dtype=torch.bool), keep_k), ValueError,
                            "q_keep must have shape"),
        "qkdrop-q-heads": (QKDrop(torch.ones(B, L, 1, dtype=torch.bool), keep_k), ValueError, "q_keep must have shape"),
        "qkdrop-k-heads": (QKDrop(keep_q, torch.ones(B, L, H, dtype=torch.bool)), ValueError, "k_keep must have shape"),
        "qkdrop-k-2d": (QKDrop(keep_q, torch.ones(B, L, dtype=torch.bool)), ValueError, "k_keep must have shape"),
        "qkdrop-float": (QKDrop(keep_q.float(), keep_k), ValueError, "q_keep must be a boolean tensor"),
        "qkdrop-int": (QKDrop(keep_q, keep_k.long()), ValueError, "k_keep must be a boolean tensor"),
        "qkdrop-list": (QKDrop(keep_q.tolist(), keep_k), TypeError, "q_keep must be a torch.Tensor"),
        "hash-float": (HashSparse(ids_q.float(), ids_k, 4), ValueError, "q_buckets must be an integer tensor"),
        "hash-bool": (HashSparse(ids_q, ids_k.bool(), 4), ValueError, "k_buckets must be an integer tensor"),
        "hash-shape": (HashSparse(ids_q, torch.zeros(B, L, H, dtype=torch.int64), 4), ValueError,
                       "k_buckets must have shape"),
        "hash-zero-buckets": (HashSparse(ids_q, ids_k, 0), ValueError, "num_buckets must be an int >= 1"),
        "hash-float-buckets": (HashSparse(ids_q, ids_k, 2.0), ValueError, "num_buckets must be an int >= 1"),
        "hash-id-too-large": (HashSparse(ids_q, ids_k + 4, 4), ValueError, "k_buckets must lie in [0, num_buckets)"),
        "hash-id-negative": (HashSparse(ids_q - 1, ids_k, 4), ValueError, "q_buckets must lie in [0, num_buckets)"),
        "block-too-long": (sp.block_pattern(S + 4, 4), ValueError, f"the global sequence has {S}"),
        "block-other-size": (BlockSparse(torch.ones(S // 2 + 1, S // 2 + 1, dtype=torch.bool), 2), ValueError,
                             "tokens, but the global sequence has"),
        "not-a-mode": ("hash:4", TypeError, "sparsity must be a ringflash.sparse.BlockSparse, QKDrop or HashSparse"),
    }
    if world_size > 1:
        # Flags of the whole sequence where this rank's shard is wanted, a pattern of the local length.
        cases["qkdrop-global-flags"] = (QKDrop(torch.ones(B, S, H, dtype=torch.bool), keep_k), ValueError,
                                        "q_keep must have shape")
        cases["block-local-length"] = (sp.block_pattern(L, 2), ValueError, f"the global sequence has {S}")
    return cases


def _backend_cases(local_seqlen, world_size):
    """Sparse modes with PyTorch's fused engines: refused by name, before the device checks."""
    L, S = local_seqlen, local_seqlen * world_size
    modes = {
        "block": sp.block_pattern(S, 2),
        "qkdrop": QKDrop(torch.ones(2, L, HEADS, dtype=torch.bool), torch.ones(2, L, KV_HEADS, dtype=torch.bool)),
        "hash": HashSparse(torch.zeros(2, L, HEADS, dtype=torch.int32),
                           torch.zeros(2, L, KV_HEADS, dtype=torch.int32), 2),
    }
    return {f"{name}-{backend}": ({"sparsity": s, "backend": backend}, ValueError, 'needs backend="triton"')
            for name, s in modes.items() for backend in ("cudnn", "sdpa_flash")}


def _bad_on_every_rank(rank, world_size, group, hybrid):
    """Every rank passes the same bad input: the error names what to change and comes before any
    transfer or gather (none is posted), and the group still works afterwards."""
    import torch.distributed as dist

    from ringflash import comm

    posted = []
    real = (dist.batch_isend_irecv, dist.all_gather, comm.all_gather_tensor, dist.all_to_all_single)
    dist.batch_isend_irecv = lambda ops: posted.append("p2p") or real[0](ops)
    dist.all_gather = lambda *a, **kw: posted.append("all_gather") or real[1](*a, **kw)
    comm.all_gather_tensor = lambda *a, **kw: posted.append("all_gather_tensor") or real[2](*a, **kw)
    dist.all_to_all_single = lambda *a, **kw: posted.append("all_to_all") or real[3](*a, **kw)
    results = {}
    try:
        g = torch.Generator().manual_seed(1)
        q = torch.randn(2, LOCAL_SEQLEN, HEADS, HEAD_DIM, generator=g)
        k = torch.randn(2, LOCAL_SEQLEN, KV_HEADS, HEAD_DIM, generator=g)
        cases = {**bad_sparsity(LOCAL_SEQLEN, world_size), **_backend_cases(LOCAL_SEQLEN, world_size)}
        for name, (value, exc, words) in cases.items():
            kwargs = value if isinstance(value, dict) else {"sparsity": value}
            posted.clear()
            try:
                ring_attention(q, k, k, causal=True, group=group, **kwargs)
                results[name] = "no error"
            except exc as e:
                results[name] = "ok" if words in str(e) else f"message without {words!r}: {e}"
            except Exception as e:  # noqa: BLE001
                results[name] = f"{type(e).__name__} (expected {exc.__name__}): {e}"
            # Bucket ids out of range are found on the device: the ranks then share one flag
            # (an all-gather), so that a rank with good ids raises too; no transfer comes first.
            allowed = {"all_gather_tensor", "all_gather"} if name.startswith("hash-id") else set()
            if set(posted) - allowed:
                results[name] = f"{posted} posted before the error"
        # Ids out of range on one rank only: every rank raises, the others naming that rank.
        ids_q = torch.zeros(2, LOCAL_SEQLEN, HEADS, dtype=torch.int64)
        ids_k = torch.zeros(2, LOCAL_SEQLEN, KV_HEADS, dtype=torch.int64) + (4 if rank == 1 else 0)
        posted.clear()
        try:
            ring_attention(q, k, k, causal=True, group=group, sparsity=HashSparse(ids_q, ids_k, 4))
            results["hash-id-one-rank"] = "no error"
        except ValueError as e:
            want = "k_buckets must lie in" if rank == 1 else "rank(s) [1]"
            results["hash-id-one-rank"] = "ok" if want in str(e) else str(e)
        if "p2p" in posted:
            results["hash-id-one-rank"] = f"{posted} posted before the error"
        # A HybridGroup (Ulysses of one inside a ring of two): bad flags are refused before its all-to-all.
        posted.clear()
        bad_keep = torch.ones(2, LOCAL_SEQLEN, HEADS + 1, dtype=torch.bool)
        try:
            ring_attention(q, k, k, causal=True, group=hybrid,
                           sparsity=QKDrop(bad_keep, torch.ones(2, LOCAL_SEQLEN, KV_HEADS, dtype=torch.bool)))
            results["hybrid"] = "no error"
        except ValueError as e:
            results["hybrid"] = "ok" if "q_keep must have shape" in str(e) else str(e)
        if posted:
            results["hybrid"] = f"{posted} posted before the error"
        # A valid sparse call still runs, and the group is intact.
        keep = sp.keep_random(get_layout("striped").local_positions(LOCAL_SEQLEN, rank=rank, world_size=world_size),
                              2, HEADS, 0.3)
        kkeep = sp.keep_random(get_layout("striped").local_positions(LOCAL_SEQLEN, rank=rank, world_size=world_size),
                               2, KV_HEADS, 0.3, seed=1)
        out = ring_attention(q, k, k, causal=True, group=group, sparsity=QKDrop(keep, kkeep))
        results["valid_after"] = "ok" if torch.isfinite(out).all() else "non-finite output"
    finally:
        dist.batch_isend_irecv, dist.all_gather, comm.all_gather_tensor, dist.all_to_all_single = real
    x = torch.ones(1)
    dist.all_reduce(x, group=group)
    results["group_alive"] = "ok" if x.item() == world_size else f"all_reduce gave {x.item()}"
    return results


# MultiheadAttention(sparsity=...) sharded over P = 2 against the same module on one process.
MHA_DIM, MHA_HEADS, MHA_KV_HEADS = 32, 4, 2
MHA_SPECS = ["hash:3", "qkdrop:0.5", "block:size=4,local=1,global=1"]


def mha_module(seed: int, spec, layout: str, group=None):
    torch.manual_seed(seed)
    return MultiheadAttention(MHA_DIM, MHA_HEADS, num_kv_heads=MHA_KV_HEADS, layout=layout, sparsity=spec,
                              sparsity_seed=seed % 97, group=group).double()


def mha_data(seed: int, seqlen: int):
    g = torch.Generator().manual_seed(seed + 1)
    return (torch.randn(2, seqlen, MHA_DIM, generator=g, dtype=torch.float64),
            torch.randn(2, seqlen, MHA_DIM, generator=g, dtype=torch.float64))


def mha_run(module, x, dout, shard=lambda t: t):
    """One training forward and backward, then an eval forward: [y, dx, eval y, parameter grads...]."""
    xl = shard(x).clone().requires_grad_()
    y = module(xl)
    y.backward(shard(dout))
    module.eval()
    with torch.no_grad():
        y_eval = module(shard(x))
    module.train()
    return [y.detach(), xl.grad, y_eval] + [p.grad for _, p in module.named_parameters()]


def _mha(rank, world_size, group, seed):
    results = {}
    for i, (spec, layout_name) in enumerate(itertools.product(MHA_SPECS, LAYOUTS)):
        def run(i=i, spec=spec, layout_name=layout_name):
            s = seed + 80_000 + 100 * i
            layout = get_layout(layout_name)
            x, dout = mha_data(s, LOCAL_SEQLEN * world_size)
            cut = lambda t: layout.shard(t, rank=rank, world_size=world_size)  # noqa: E731
            return pack(mha_run(mha_module(s, spec, layout_name, group), x, dout, cut))
        _guard(results, (spec, layout_name), run)
    return results


# The ring over the Triton kernels (Triton's CPU interpreter), P = 2: each mode reaches the kernels
# through the ring's plumbing (tile lists of a pattern, per-head attributes of every rank's keys).
TRITON_LOCAL = 20  # crosses the interpreter's 16- and 32-row tiles, with ragged ends
# name -> (mode, layout, causal, documents)
TRITON_CASES = {
    "block-contiguous-causal": ("block", "contiguous", True, False),
    "block-ragged-striped-docs": ("block-ragged", "striped", False, True),
    "qkdrop-zigzag-causal-docs": ("qkdrop", "zigzag", True, True),
    "hash-striped-full": ("hash", "striped", False, False),
}


def triton_data(seed, name):
    mode, _, causal, docs = TRITON_CASES[name]
    return make_data(seed + 90_000 + list(TRITON_CASES).index(name), TRITON_LOCAL * 2, mode, causal, docs)


def _ring_triton(rank, world_size, group, seed):
    import os

    if not os.environ.get("TRITON_INTERPRET") or torch.cuda.is_available():
        return None  # CPU tensors reach the kernels only under the interpreter
    results = {}
    for name, (_, layout_name, causal, _) in TRITON_CASES.items():
        def run(name=name, layout_name=layout_name, causal=causal):
            q, k, v, dout, sparsity, cu = triton_data(seed, name)
            return pack(_ring_shards(rank, world_size, q, k, v, dout, sparsity, causal, None, cu,
                                     get_layout(layout_name), torch.float32, backend="triton", group=group))
        _guard(results, name, run)
    return results


# One spawn of 4 ranks runs every world size (starting processes is most of the cost): P = 4 on
# the default group (group=None), then P = 3 on global ranks 1-3 while rank 0 runs P = 1 alone,
# then P = 2 on ranks 1 and 3. In the subgroups a rank's place in the ring (its group rank, which
# cuts its shards) is not its global rank.
GROUP_RANKS = {4: None, 3: [1, 2, 3], 1: [0], 2: [1, 3]}


def _world(rank, world_size, group, seed):
    """The grid of one world size, on this rank (``rank`` its rank in ``group``)."""
    results = {}
    for i, case in enumerate(CASES):
        _guard(results, case, lambda: _case(rank, world_size, group, seed, i, case))
    if world_size == 4:
        results["transfers"] = _transfers(rank, world_size, group, seed)
    return results


def _grid(global_rank, spawned, seed):
    import torch.distributed as dist

    from ringflash import HybridGroup

    # Every rank makes every group, in the same order (new_group is a collective of the world).
    groups = {P: None if ranks is None else dist.new_group(ranks) for P, ranks in GROUP_RANKS.items()}
    singles = [dist.new_group([r]) for r in range(spawned)]
    out = {}
    for P, ranks in GROUP_RANKS.items():
        if ranks is not None and global_rank not in ranks:
            continue
        rank, group = (global_rank if ranks is None else ranks.index(global_rank)), groups[P]
        res = _world(rank, P, group, seed)
        if P == 2:
            res["bad"] = _bad_on_every_rank(rank, P, group, HybridGroup(group, singles[global_rank]))
            res["mha"] = _mha(rank, P, group, seed)
            res["triton"] = _ring_triton(rank, P, group, seed)
        out[P] = (rank, res)
    return out


_SEED = random.randrange(1 << 30)  # fresh inputs every run; printed on failure
_RUN: list = []


def grid(world_size: int) -> list[dict]:
    """Every rank's results of the ``world_size`` grid, in the order of the ranks in its group."""
    if not _RUN:
        _RUN.append(spawn(_grid, 4, _SEED, timeout=600))
    mine = sorted(r[world_size] for r in _RUN[0] if world_size in r)
    assert [rank for rank, _ in mine] == list(range(world_size))
    return [res for _, res in mine]


def _entry(res, key):
    entry = res[key]
    assert not (isinstance(entry, dict) and "error" in entry), entry.get("error")
    return entry


def _assemble(per_rank: list, layout) -> list:
    """Full tensors from every rank's [out, dq, dk, dv, lse] shards."""
    n = len(per_rank[0])
    return [layout.assemble([r[i] for r in per_rank], dim=2 if i == 4 else 1) for i in range(n)]


def check_against_oracle(got, ref, ref_lse, ctx, single=None, lse=None, lse_ref=None):
    """float32: each of out, dq, dk, dv within FP32_TOL of float64; with ``single`` (the oracle
    run in bfloat16), within BF16_FACTOR of its error. Rows the oracle leaves empty (LSE = -inf)
    come out as O = 0 and dQ = 0 exactly; ``lse`` against ``lse_ref``, -inf on exactly those rows."""
    for i, name in enumerate(NAMES):
        assert not torch.isnan(got[i]).any(), f"{name} has NaN; {ctx}"
        if ref[i].norm() == 0:
            # Exactly zero in float64 (nothing visible, or dQ where every query sees one key: a
            # softmax over one key): an absolute bound. What is left there is rounding of
            # rowsum(dO * O) against dO . v (~1e-7 here).
            biggest = got[i].double().abs().max().item()
            assert biggest < ZERO_ABS, f"{name}: |x| up to {biggest:.2e} where float64 gives 0; {ctx}"
            continue
        err = rel(got[i], ref[i])
        if single is None:
            assert err < FP32_TOL, f"{name}: relative error {err:.2e}; {ctx}"
        else:
            bar = rel(single[i], ref[i])
            assert err <= BF16_FACTOR * bar, f"{name}: ring bf16 {err:.2e} vs one-process bf16 {bar:.2e}; {ctx}"
    empty = torch.isneginf(ref_lse).transpose(1, 2)  # (B, S, H)
    assert torch.all(got[0][empty] == 0), f"queries that see no key have nonzero output; {ctx}"
    assert torch.all(got[1][empty] == 0), f"queries that see no key have nonzero dq; {ctx}"
    if lse is not None:
        assert torch.equal(torch.isneginf(lse), torch.isneginf(lse_ref)), f"LSE = -inf on other rows; {ctx}"
        finite = ~torch.isneginf(lse_ref)
        if finite.any():
            err = rel(lse[finite], lse_ref[finite])
            assert err < 1e-5, f"LSE: relative error {err:.2e}; {ctx}"


# -- ring attention against float64 ------------------------------------------------------


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@pytest.mark.parametrize("case", CASES, ids=[case_id(c) for c in CASES])
def test_ring_sparse_matches_float64(world_size, case):
    mode, layout_name, causal, window, docs, dtype_name = case
    i = CASES.index(case)
    layout = get_layout(layout_name)
    per_rank = [unpack(_entry(res, case)) for res in grid(world_size)]
    got = _assemble(per_rank, layout)
    q, k, v, dout, sparsity, cu = make_data(case_seed(_SEED, i), grid_seqlen(world_size), mode, causal, docs)
    ref, ref_lse = oracle(q, k, v, dout, sparsity, causal, window, cu)
    dtype = getattr(torch, dtype_name)
    assert got[0].dtype == dtype and got[4].dtype == torch.float32
    ctx = f"P={world_size}, seed {_SEED}"
    if dtype == torch.float32:
        check_against_oracle(got, ref, ref_lse, ctx, lse=got[4], lse_ref=ref_lse)
    else:
        # The LSE is float32 whatever the input dtype: against float64 attention on the inputs
        # as this dtype rounds them.
        _, lse_ref = oracle(*(t.to(dtype) for t in (q, k, v)), None, sparsity, causal, window, cu)
        single, _ = oracle(q, k, v, dout, sparsity, causal, window, cu, dtype)
        check_against_oracle(got, ref, ref_lse, ctx, single=single, lse=got[4], lse_ref=lse_ref)
    if mode == "qkdrop":  # a dropped query: O = 0 and no gradient, exactly
        dropped = ~sparsity.q_keep
        assert dropped.any() and torch.all(got[0][dropped] == 0) and torch.all(got[1][dropped] == 0), ctx
    # The mode is not a no-op: where it hides pairs the other rules let through, dense attention
    # with those rules gives another output.
    pos = torch.arange(q.shape[1])
    if (brute_force_rules(pos, pos, causal, window, cu) & ~dense_sparse_mask(sparsity, KV_HEADS)).any():
        dense, _ = oracle(q, k, v, None, None, causal, window, cu)
        assert rel(got[0], dense[0]) > 1e-3, ctx


# -- ring transfers: steps no kept block reaches are not run -------------------------------


@pytest.mark.parametrize("case", list(TRANSFERS))
def test_ring_skips_steps_the_pattern_hides(case):
    layout_name, causal, make_pattern, fwd, bwd = TRANSFERS[case]
    res = grid(4)
    for rank, r in enumerate(res):
        entry = _entry(r["transfers"], case)
        assert entry["forward"] == fwd, f"rank {rank}: forward hops {entry['forward']}, expected {fwd}"
        assert entry["backward"] == bwd, f"rank {rank}: backward hops {entry['backward']}, expected {bwd}"
    # And still exact.
    layout = get_layout(layout_name)
    S = LOCAL_SEQLEN * 4
    got = _assemble([unpack(_entry(r["transfers"], case)["shards"]) for r in res], layout)
    q, k, v, dout, _, _ = make_data(_SEED + 70_000 + list(TRANSFERS).index(case), S, "qkdrop", causal, False)
    ref, ref_lse = oracle(q, k, v, dout, make_pattern(S), causal, None, None)
    check_against_oracle(got, ref, ref_lse, f"seed {_SEED}", lse=got[4], lse_ref=ref_lse)


# -- bad input --------------------------------------------------------------------------


def test_bad_sparsity_raises_on_every_rank():
    for rank, res in enumerate(grid(2)):
        bad = {k: v for k, v in res["bad"].items() if v != "ok"}
        assert not bad, f"rank {rank}: {bad}"
        assert set(bad_sparsity(LOCAL_SEQLEN, 2)) <= set(res["bad"])


@pytest.mark.quick
@pytest.mark.parametrize("api", ["flash_attention", "ring_attention"])
@pytest.mark.parametrize("name", list(bad_sparsity(8, 1)) + list(_backend_cases(8, 1)))
def test_bad_sparsity_single_process(api, name):
    value, exc, words = {**bad_sparsity(8, 1), **_backend_cases(8, 1)}[name]
    kwargs = value if isinstance(value, dict) else {"sparsity": value}
    q, k = torch.randn(2, 8, HEADS, HEAD_DIM), torch.randn(2, 8, KV_HEADS, HEAD_DIM)
    attn = flash_attention if api == "flash_attention" else ring_attention
    with pytest.raises(exc) as info:
        attn(q, k, k, causal=True, **kwargs)
    assert words in str(info.value), str(info.value)


# -- the Triton kernels in the ring ------------------------------------------------------


@pytest.mark.parametrize("name", list(TRITON_CASES))
def test_ring_sparse_with_triton_kernels_interpreted(name):
    res = grid(2)
    if any(r["triton"] is None for r in res):
        pytest.skip("the Triton kernels run on CPU tensors only under TRITON_INTERPRET=1")
    mode, layout, causal, _ = TRITON_CASES[name]
    got = _assemble([unpack(_entry(r["triton"], name)) for r in res], get_layout(layout))
    q, k, v, dout, sparsity, cu = triton_data(_SEED, name)
    ref, ref_lse = oracle(q, k, v, dout, sparsity, causal, None, cu)
    check_against_oracle(got, ref, ref_lse, f"seed {_SEED}", lse=got[4], lse_ref=ref_lse)


# -- MultiheadAttention(sparsity=) ----------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("spec", MHA_SPECS)
def test_mha_sparse_sharded_matches_one_process(spec, layout):
    """The same weights and input on 2 ranks and on one: the same output, input gradient, eval
    output and parameter gradients (float64). Hash buckets come from each token's q and k, the
    QK-dropping draws from global positions, the block pattern from the global length: none
    depends on the sharding."""
    i = list(itertools.product(MHA_SPECS, LAYOUTS)).index((spec, layout))
    s = _SEED + 80_000 + 100 * i
    x, dout = mha_data(s, LOCAL_SEQLEN * 2)
    ref = mha_run(mha_module(s, spec, layout), x, dout)
    per_rank = [unpack(_entry(res["mha"], (spec, layout))) for res in grid(2)]
    lay = get_layout(layout)
    got = [lay.assemble([r[j] for r in per_rank]) for j in range(3)]
    got += [sum(r[j] for r in per_rank) for j in range(3, len(ref))]  # each rank's share of the grads
    names = ["y", "dx", "y_eval"] + [n for n, _ in mha_module(s, spec, layout).named_parameters()]
    assert len(got) == len(ref) == len(names)
    errs = {n: rel(a, b) for n, a, b in zip(names, got, ref)}
    assert all(e < 1e-10 for e in errs.values()), f"seed {_SEED}: {errs}"
    # Sparse for real: the dense module with the same weights gives another output.
    dense = mha_run(mha_module(s, None, layout), x, dout)
    assert rel(ref[0], dense[0]) > 1e-3, f"{spec} changed nothing; seed {_SEED}"


def test_mha_qkdrop_draws():
    """Each training forward draws new flags; eval forwards reuse one fixed draw; the same draws
    for every seeded module, and another sparsity_seed draws others."""
    x, _ = mha_data(3, 16)
    m = mha_module(3, "qkdrop:0.5", "striped")
    with torch.no_grad():
        a, b = m(x), m(x)
        m.eval()
        c, d = m(x), m(x)
    assert rel(a, b) > 1e-3  # two training forwards: two draws
    assert torch.equal(c, d)  # eval: the fixed draw
    m2 = mha_module(3, "qkdrop:0.5", "striped")
    with torch.no_grad():
        assert torch.equal(m2(x), a)
    m3 = mha_module(3, "qkdrop:0.5", "striped")
    m3.sparsity_seed += 1
    with torch.no_grad():
        assert rel(m3(x), a) > 1e-3


def test_mha_sparsity_in_repr_and_hash_projection_buffer():
    m = mha_module(0, "hash:5", "zigzag")
    assert "sparsity=hash:5" in repr(m)
    assert tuple(m.hash_projection.shape) == (MHA_KV_HEADS, MHA_DIM // MHA_HEADS, 3)
    assert "hash_projection" not in m.state_dict()  # fixed by the seed, not saved
    with pytest.raises(ValueError, match="hash:BUCKETS"):
        MultiheadAttention(MHA_DIM, MHA_HEADS, sparsity="hash:0")


@pytest.mark.parametrize("where", ["constructor", "forward"])
@pytest.mark.parametrize("mode", ["block", "qkdrop", "hash"])
def test_mha_caller_given_modes(mode, where):
    """Keep-sets, bucket ids and block patterns given by the caller, to the constructor (used at
    every forward) or to one forward: the module's output is its projections around the float64
    reference of that mask; ``sparsity=None`` in forward is dense; a string there is a TypeError."""
    B, S = 2, 24
    g = torch.Generator().manual_seed(_SEED + 7)
    heads = (B, S, MHA_HEADS)
    kv = (B, S, MHA_KV_HEADS)
    given = {
        "block": sp.block_pattern(S, 4, local=2, global_=1, causal=True),
        "qkdrop": QKDrop(torch.rand(heads, generator=g) > 0.4, torch.rand(kv, generator=g) > 0.4),
        "hash": HashSparse(torch.randint(0, 3, heads, generator=g), torch.randint(0, 3, kv, generator=g), 3),
    }[mode]
    torch.manual_seed(_SEED)
    m = MultiheadAttention(MHA_DIM, MHA_HEADS, num_kv_heads=MHA_KV_HEADS, rope=False, backend="reference",
                           sparsity=given if where == "constructor" else None).double()
    x = torch.randn(B, S, MHA_DIM, generator=g, dtype=torch.float64)
    y = m(x) if where == "constructor" else m(x, sparsity=given)
    D = MHA_DIM // MHA_HEADS
    q, k, v = m.qkv(x).split([MHA_HEADS * D, MHA_KV_HEADS * D, MHA_KV_HEADS * D], dim=-1)
    o, _ = reference.attention(q.reshape(B, S, MHA_HEADS, D), k.reshape(B, S, MHA_KV_HEADS, D),
                               v.reshape(B, S, MHA_KV_HEADS, D), causal=True, sparsity=given)
    want = m.out(o.reshape(B, S, MHA_DIM))
    assert rel(y, want) < 1e-12, f"seed {_SEED}: {rel(y, want):.2e}"
    dense = m(x, sparsity=None)
    assert rel(dense, y) > 1e-3, f"{mode} changed nothing; seed {_SEED}"
    with pytest.raises(TypeError, match="constructor"):
        m(x, sparsity="hash:8")


@pytest.mark.quick
def test_integer_sizes_of_any_kind_and_the_reference_checks():
    """Block sizes, widths and bucket counts as NumPy integers become ints; the float64
    reference rejects a pattern that does not tile the sequence and out-of-range bucket ids."""
    np = pytest.importorskip("numpy")
    p = sp.local_blocks(np.int64(16), np.int64(4), np.int64(2))
    assert p.block_size == 4 and type(p.block_size) is int
    ids = torch.zeros(1, 4, 2, dtype=torch.int32)
    assert type(HashSparse(ids, ids, np.int64(3)).num_buckets) is int
    with pytest.raises(ValueError, match="block_size"):
        BlockSparse(torch.ones(2, 2, dtype=torch.bool), np.float64(4))
    q = torch.randn(1, 16, 2, 8, dtype=torch.float64)
    for pattern in (BlockSparse(torch.ones(3, 3, dtype=torch.bool), 4), BlockSparse(torch.ones(5, 5, dtype=torch.bool), 4)):
        with pytest.raises(ValueError, match="global sequence has 16"):
            reference.attention(q, q, q, causal=True, sparsity=pattern)
    with pytest.raises(ValueError, match="num_buckets"):
        reference.attention(q, q, q, sparsity=HashSparse(torch.full((1, 16, 2), 5), torch.zeros(1, 16, 2, dtype=torch.long), 4))


# -- one device -------------------------------------------------------------------------


def dense_sparse_mask(sparsity, heads_kv):
    """The sparse mode's own rule as a dense mask, built by hand: (S, S) for a block pattern
    (whole blocks of the pattern), (B, H, Sq, Sk) for keep flags (both kept) and buckets (equal
    ids; query head h against K/V head h // G)."""
    if isinstance(sparsity, BlockSparse):
        bs = sparsity.block_size
        return sparsity.pattern.repeat_interleave(bs, 0).repeat_interleave(bs, 1)
    if isinstance(sparsity, QKDrop):
        q, k = sparsity.q_keep, sparsity.k_keep
    else:
        q, k = sparsity.q_buckets, sparsity.k_buckets
    G = q.shape[2] // heads_kv
    k = k.repeat_interleave(G, dim=2)  # (B, Sk, H): each query head's K/V head
    q, k = q.permute(0, 2, 1)[..., :, None], k.permute(0, 2, 1)[..., None, :]
    return (q & k) if q.dtype == torch.bool else (q == k)


def naive_attention(q, k, v, vis):
    """float64 softmax attention under a boolean mask broadcasting to (B, H, Sq, Sk), GQA by
    repeating K/V heads; rows that see nothing give 0."""
    G = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(G, dim=2), v.repeat_interleave(G, dim=2)
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
    s = s.masked_fill(~vis, -math.inf)
    return torch.einsum("bhqk,bkhd->bqhd", torch.softmax(s, dim=-1).nan_to_num(0.0), v)


ORACLE_CASES = [
    pytest.param(mode, causal, window, docs, id=f"{mode}-{'causal' if causal else 'full'}"
                 + ("-window" if window else "") + ("-docs" if docs else ""))
    for mode in MODES for causal, window, docs in [(True, None, False), (False, None, False), (False, (4, 3), True)]
]


@pytest.mark.quick
@pytest.mark.parametrize("mode,causal,window,docs", ORACLE_CASES)
def test_oracle_is_the_rule(mode, causal, window, docs):
    """``reference.attention(sparsity=)`` against softmax under a mask built here by hand, with
    the other rules combined; and the sparse mode hides something the other rules let through."""
    S = 24
    q, k, v, _, sparsity, cu = make_data(11 + len(mode), S, mode, causal, docs)
    pos = torch.arange(S)
    rules = brute_force_rules(pos, pos, causal, window, cu)
    vis = rules & dense_sparse_mask(sparsity, KV_HEADS)
    assert (rules & ~vis).any()  # the mode takes pairs away
    ref, lse = reference.attention(q, k, v, causal=causal, window=window, cu_seqlens=cu, sparsity=sparsity)
    expected = naive_attention(q, k, v, vis.expand(BATCH, HEADS, S, S))
    assert rel(ref, expected) < 1e-12
    empty = ~vis.expand(BATCH, HEADS, S, S).any(-1)  # (B, H, S)
    assert torch.equal(torch.isneginf(lse), empty)
    assert torch.all(ref.transpose(1, 2)[empty] == 0)


# flash_attention on one device (reference backend): each mode against the float64 oracle.
FLASH_CASES = [
    pytest.param(mode, causal, docs, id=f"{mode}-{'causal' if causal else 'full'}" + ("-docs" if docs else ""))
    for mode in MODES for causal, docs in [(True, False), (False, False), (True, True)]
]


@pytest.mark.quick
@pytest.mark.parametrize("mode,causal,docs", FLASH_CASES)
def test_flash_attention_sparse_matches_float64(mode, causal, docs):
    S = 36
    q, k, v, dout, sparsity, cu = make_data(21 + S, S, mode, causal, docs)
    q32, k32, v32 = (t.float().requires_grad_() for t in (q, k, v))
    out, lse = flash_attention(q32, k32, v32, causal=causal, cu_seqlens=cu, sparsity=sparsity, return_lse=True)
    out.backward(dout.float())
    ref, ref_lse = oracle(q, k, v, dout, sparsity, causal, None, cu)
    got = [out.detach(), q32.grad, k32.grad, v32.grad]
    check_against_oracle(got, ref, ref_lse, mode, lse=lse, lse_ref=ref_lse)


@pytest.mark.parametrize("mode", ["qkdrop", "hash"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_flash_attention_token_sparsity_fewer_queries(mode, causal):
    """Fewer queries than keys (the queries are the last ones): flags and ids per query and per key."""
    Sq, Sk = 10, 26
    g = torch.Generator().manual_seed(5)
    q, dout = (torch.randn(BATCH, Sq, HEADS, HEAD_DIM, generator=g, dtype=torch.float64) for _ in range(2))
    k, v = (torch.randn(BATCH, Sk, KV_HEADS, HEAD_DIM, generator=g, dtype=torch.float64) for _ in range(2))
    if mode == "qkdrop":
        sparsity = QKDrop(torch.rand(BATCH, Sq, HEADS, generator=g) > 0.3,
                          torch.rand(BATCH, Sk, KV_HEADS, generator=g) > 0.3)
    else:
        sparsity = HashSparse(torch.randint(0, 2, (BATCH, Sq, HEADS), generator=g),
                              torch.randint(0, 2, (BATCH, Sk, KV_HEADS), generator=g), 2)
    q32, k32, v32 = (t.float().requires_grad_() for t in (q, k, v))
    out = flash_attention(q32, k32, v32, causal=causal, sparsity=sparsity)
    out.backward(dout.float())
    ref, ref_lse = oracle(q, k, v, dout, sparsity, causal, None, None)
    check_against_oracle([out.detach(), q32.grad, k32.grad, v32.grad], ref, ref_lse, mode)
    rules = brute_force_rules(torch.arange(Sk - Sq, Sk), torch.arange(Sk), causal, None, None)
    assert rel(ref[0], naive_attention(q, k, v, rules & dense_sparse_mask(sparsity, KV_HEADS))) < 1e-12


@pytest.mark.parametrize("layout", LAYOUTS)
def test_ring_attention_without_process_group(layout):
    """A world of one without torch.distributed: plain attention with the sparse mode."""
    q, k, v, dout, sparsity, cu = make_data(5, 16, "hash", True, True)
    ref, ref_lse = oracle(q, k, v, dout, sparsity, True, (6, 0), cu)
    got = _ring_shards(0, 1, q, k, v, dout, sparsity, True, (6, 0), cu, get_layout(layout), torch.float32)
    check_against_oracle(got, ref, ref_lse, layout, lse=got[4], lse_ref=ref_lse)


@pytest.mark.parametrize("api", ["flash_attention", "ring_attention"])
def test_pattern_that_hides_everything(api):
    """A pattern that keeps no block (or none at or before the diagonal, with causal): every query
    gets O = 0 and LSE = -inf, and no gradient flows; no error."""
    q, k, v, dout, _, _ = make_data(8, 16, "qkdrop", True, False)
    q, k, v = (t.float().requires_grad_() for t in (q, k, v))
    attn = flash_attention if api == "flash_attention" else ring_attention
    upper = BlockSparse(torch.ones(4, 4, dtype=torch.bool).triu(1), 4)
    for causal, pattern in ((False, BlockSparse(torch.zeros(4, 4, dtype=torch.bool), 4)), (True, upper)):
        out, lse = attn(q, k, v, causal=causal, sparsity=pattern, return_lse=True)
        out.backward(dout.float())
        assert torch.all(out == 0) and torch.all(torch.isneginf(lse)), causal
        assert all(torch.all(t.grad == 0) for t in (q, k, v)), causal


# -- the ring's plan with a block pattern ---------------------------------------------------


@pytest.mark.quick
@pytest.mark.parametrize("seed", range(3))
def test_block_visible_with_patterns_is_exact(seed):
    """The ring's skip decision with a block pattern against the brute-force rule, on random
    increasing position sets and patterns, with and without causal (exact: a step is skipped
    if and only if no pair is visible); with documents too it may keep an empty step, never
    drop a visible one."""
    g = random.Random(seed)
    for _ in range(150):
        bs = g.choice([1, 2, 3, 5])
        nb = g.randint(1, 12)
        S = bs * nb
        pattern = BlockSparse(torch.tensor([[g.random() < 0.3 for _ in range(nb)] for _ in range(nb)]), bs)
        q_pos = torch.tensor(sorted(g.sample(range(S), g.randint(1, min(S, 10)))))
        k_pos = torch.tensor(sorted(g.sample(range(S), g.randint(1, min(S, 10)))))
        causal = g.random() < 0.5
        cu = g.choice([None, None, [0, *sorted(g.sample(range(1, S), min(S - 1, g.randint(1, 4)))), S]])
        if cu is not None and len(cu) == 2:
            cu = None
        m = mask_mod.make_mask(causal, None, cu, S, blocks=pattern)
        truth = brute_force_rules(q_pos, k_pos, causal, None, m.cu_seqlens)
        truth = bool((truth & dense_sparse_mask(pattern, 1)[q_pos][:, k_pos]).any())
        got = mask_mod.block_visible(m, q_pos, k_pos)
        ctx = (q_pos.tolist(), k_pos.tolist(), causal, cu, pattern.pattern.int().tolist(), bs)
        if cu is None:
            assert got == truth, ctx
        else:
            assert got or not truth, ctx


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_plan_needs_exactly_the_visible_steps(layout, causal):
    """``ring._plan(...).need[r][src]``: whether rank r's queries see any key of rank src under a
    pattern, for every rank pair at P = 4, against the brute-force rule over the layout's positions."""
    from ringflash import ring as ring_mod

    P, L = 4, 8
    lay = get_layout(layout)
    for pattern in (sp.block_pattern(P * L, 4, local=2), sp.block_pattern(P * L, 8, local=1, global_=1),
                    sp.random_blocks(P * L, 2, 2, seed=3, causal=causal), sp.local_blocks(P * L, 16, 1)):
        mask = mask_mod.make_mask(causal, None, None, P * L, blocks=pattern)
        plan = ring_mod._plan(lay, mask, L, P, torch.device("cpu"), False)
        full = dense_sparse_mask(pattern, 1) & brute_force_rules(torch.arange(P * L), torch.arange(P * L), causal,
                                                                 None, None)
        pos = [lay.local_positions(L, rank=r, world_size=P) for r in range(P)]
        truth = [[bool(full[pos[r]][:, pos[s]].any()) for s in range(P)] for r in range(P)]
        assert plan.need == truth, (layout, causal, pattern.pattern.int().tolist())


# -- the sparse modes' helpers -------------------------------------------------------------


@pytest.mark.quick
def test_local_and_global_blocks():
    p = sp.local_blocks(40, 4, 3).pattern
    i = torch.arange(10)
    assert torch.equal(p, (i[:, None] - i[None, :]).abs() <= 2)
    assert torch.equal(sp.local_blocks(12, 4, 1).pattern, torch.eye(3, dtype=torch.bool))
    g = sp.global_blocks(40, 4, 2).pattern
    assert g[:2].all() and g[:, :2].all() and not g[2:, 2:].any()
    assert not sp.global_blocks(8, 4, 0).pattern.any()
    assert sp.global_blocks(8, 4, 2).pattern.all()
    assert sp.local_blocks(40, 4, 3).seqlen == 40 and sp.local_blocks(40, 4, 3).num_blocks == 10


@pytest.mark.quick
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_random_blocks(causal):
    n, count = 16, 3
    a = sp.random_blocks(n * 2, 2, count, seed=7, causal=causal)
    assert a == sp.random_blocks(n * 2, 2, count, seed=7, causal=causal)  # reproducible
    assert a != sp.random_blocks(n * 2, 2, count, seed=8, causal=causal)  # and seeded
    per_row = a.pattern.sum(1)
    if causal:
        assert not torch.triu(a.pattern, 1).any()  # no pick after the row's own block
        assert torch.equal(per_row, torch.clamp(torch.arange(1, n + 1), max=count))  # none wasted
    else:
        assert torch.all(per_row == count)
        assert torch.triu(a.pattern, 1).any()
    assert not sp.random_blocks(8, 2, 0).pattern.any()
    assert sp.random_blocks(8, 2, 10, causal=False).pattern.all()  # more than there are: all of them


def test_block_pattern_is_the_union():
    S, bs = 48, 4
    p = sp.block_pattern(S, bs, local=2, global_=1, random=2, seed=5, causal=True)
    expected = (sp.local_blocks(S, bs, 2).pattern | sp.global_blocks(S, bs, 1).pattern
                | sp.random_blocks(S, bs, 2, seed=5, causal=True).pattern)
    assert torch.equal(p.pattern, expected) and p.block_size == bs
    assert not sp.block_pattern(S, bs, local=0, global_=1).pattern[1:, 1:].any()
    spec = sp.parse_sparsity("block:size=4,local=2,global=1,random=2,seed=5")
    assert spec.pattern(S, causal=True) == p


@pytest.mark.quick
def test_block_sparse_equality_hash_and_pickle():
    g = torch.Generator().manual_seed(0)
    m = torch.rand(6, 6, generator=g) < 0.5
    a = BlockSparse(m, 4)
    assert a == BlockSparse(m.clone(), 4) and hash(a) == hash(BlockSparse(m.clone(), 4))
    assert a == BlockSparse(m.int(), 4) == BlockSparse(m.tolist(), 4)  # 0/1 ints, nested lists
    assert a != BlockSparse(m, 2)  # another block size
    flipped = m.clone()
    flipped[2, 3] = ~flipped[2, 3]
    assert a != BlockSparse(flipped, 4)
    assert a != "not a pattern"
    assert len({a, BlockSparse(m.clone(), 4), BlockSparse(flipped, 4)}) == 2
    b = pickle.loads(pickle.dumps(a))
    assert b == a and torch.equal(b.pattern, a.pattern)
    assert torch.equal((a | BlockSparse(flipped, 4)).pattern, a.pattern | flipped)
    assert torch.equal((a & BlockSparse(flipped, 4)).pattern, a.pattern & flipped)
    assert "6 x 6 blocks of 4" in repr(a)


@pytest.mark.quick
@pytest.mark.parametrize("bs", [1, 3, 4])
def test_block_sparse_density(bs):
    """Visible pairs over the pairs of the dense mask, against counting them."""
    g = torch.Generator().manual_seed(bs)
    nb = 7
    p = BlockSparse(torch.rand(nb, nb, generator=g) < 0.4, bs)
    S = nb * bs
    full = dense_sparse_mask(p, 1)
    causal = torch.ones(S, S, dtype=torch.bool).tril()
    assert p.density(causal=False) == pytest.approx(full.sum().item() / S**2)
    assert p.density(causal=True) == pytest.approx((full & causal).sum().item() / causal.sum().item())
    assert BlockSparse(torch.ones(nb, nb, dtype=torch.bool), bs).density(True) == pytest.approx(1.0)
    assert BlockSparse(torch.eye(nb, dtype=torch.bool), bs).density(False) == pytest.approx(1 / nb)


@pytest.mark.quick
def test_keep_random_depends_only_on_the_token():
    """The flag of (batch row, global position, head) is the same whatever set of positions it
    is drawn with (every layout and world size draws the same flags), about ``fraction`` dropped,
    and other seeds draw others."""
    S, B, H = 4096, 2, 3
    full = sp.keep_random(torch.arange(S), B, H, 0.3, seed=4)
    assert full.shape == (B, S, H) and full.dtype == torch.bool
    assert abs((~full).float().mean().item() - 0.3) < 0.02
    for layout, P in (("striped", 4), ("zigzag", 2), ("contiguous", 8)):
        lay = get_layout(layout)
        for r in range(P):
            pos = lay.positions(S, rank=r, world_size=P)
            assert torch.equal(sp.keep_random(pos, B, H, 0.3, seed=4), full[:, pos]), (layout, r)
    shuffled = torch.randperm(S, generator=torch.Generator().manual_seed(0))[:100]
    assert torch.equal(sp.keep_random(shuffled, B, H, 0.3, seed=4), full[:, shuffled])
    assert not torch.equal(sp.keep_random(torch.arange(S), B, H, 0.3, seed=5), full)
    assert not torch.equal(full[0], full[1]) and not torch.equal(full[..., 0], full[..., 1])
    assert sp.keep_random(torch.arange(S), B, H, 0.0).all()
    assert abs((~sp.keep_random(torch.arange(S), B, H, 0.9)).float().mean().item() - 0.9) < 0.02


@pytest.mark.quick
@pytest.mark.parametrize("nb", [1, 2, 5, 8])
def test_hash_buckets(nb):
    g = torch.Generator().manual_seed(nb)
    x = torch.randn(2, 300, 3, 16, generator=g)
    proj = sp.hash_projection(3, 16, nb, seed=2)
    assert proj.shape == (3, 16, (nb + 1) // 2)
    assert torch.equal(proj, sp.hash_projection(3, 16, nb, seed=2))
    b = sp.hash_buckets(x, proj, nb)
    assert b.shape == (2, 300, 3) and b.dtype == torch.int32
    assert int(b.min()) >= 0 and int(b.max()) < nb
    assert set(b.unique().tolist()) == set(range(nb))  # every bucket in use on 1800 random vectors
    # Angular hashing: a positive multiple of x shares its bucket; with an even count, -x lands
    # in the bucket opposite.
    assert torch.equal(sp.hash_buckets(3.0 * x, proj, nb), b)
    if nb % 2 == 0:
        assert torch.equal(sp.hash_buckets(-x, proj, nb), (b + nb // 2) % nb)
    # Per token: hashing a slice gives the slice of the buckets.
    assert torch.equal(sp.hash_buckets(x[:, 100:140], proj, nb), b[:, 100:140])


@pytest.mark.quick
def test_parse_sparsity():
    assert sp.parse_sparsity(None) is None
    assert sp.parse_sparsity("") is None and sp.parse_sparsity("none") is None and sp.parse_sparsity("dense") is None
    h = sp.parse_sparsity("hash:8")
    assert (h.kind, h.buckets) == ("hash", 8)
    d = sp.parse_sparsity(" qkdrop:0.25 ")
    assert (d.kind, d.fraction) == ("qkdrop", 0.25)
    b = sp.parse_sparsity("block:size=128,local=4,global=1,random=2,seed=3")
    assert (b.kind, b.block_size, b.local, b.global_, b.random, b.seed) == ("block", 128, 4, 1, 2, 3)
    assert sp.parse_sparsity("block:global=1").local == 1  # defaults: size 128, one local block
    for spec in (h, d, b):
        assert sp.parse_sparsity(str(spec)) == spec and sp.parse_sparsity(spec) is spec


@pytest.mark.quick
@pytest.mark.parametrize("bad", ["hash:0", "hash:", "hash:x", "hash:-2", "hash:2.5", "qkdrop:1", "qkdrop:1.5",
                                 "qkdrop:-0.1", "qkdrop:abc", "qkdrop:", "qkdrop:nan", "block:size=0,local=1",
                                 "block:local=0", "block:size=4,local=0,global=0,random=0", "block:foo=1",
                                 "block:size=4,local", "block:size=a", "block:local=-1", "bogus:3", "hash"])
def test_parse_sparsity_rejects(bad):
    with pytest.raises(ValueError):
        sp.parse_sparsity(bad)


def test_parse_sparsity_rejects_non_strings():
    with pytest.raises(TypeError, match="string"):
        sp.parse_sparsity(8)


ONES = torch.ones(2, 2, dtype=torch.bool)


@pytest.mark.quick
@pytest.mark.parametrize(
    "make,exc,words",
    [
        pytest.param(lambda: BlockSparse(torch.ones(2, 3, dtype=torch.bool), 4), ValueError, "square", id="non-square"),
        pytest.param(lambda: BlockSparse(torch.ones(2, 2, 2, dtype=torch.bool), 4), ValueError, "square", id="3-d"),
        pytest.param(lambda: BlockSparse(torch.ones(4, dtype=torch.bool), 4), ValueError, "square", id="1-d"),
        pytest.param(lambda: BlockSparse(torch.ones(0, 0, dtype=torch.bool), 4), ValueError, "square", id="empty"),
        pytest.param(lambda: BlockSparse(torch.full((2, 2), 2), 4), ValueError, "0/1", id="twos"),
        pytest.param(lambda: BlockSparse(torch.ones(2, 2), 4), TypeError, "boolean", id="float"),
        pytest.param(lambda: BlockSparse(ONES, 0), ValueError, "block_size", id="bs-0"),
        pytest.param(lambda: BlockSparse(ONES, -2), ValueError, "block_size", id="bs-neg"),
        pytest.param(lambda: BlockSparse(ONES, 2.0), ValueError, "block_size", id="bs-float"),
        pytest.param(lambda: BlockSparse(ONES, True), ValueError, "block_size", id="bs-bool"),
        pytest.param(lambda: BlockSparse("pattern", 2), TypeError, "2-D boolean", id="string"),
        pytest.param(lambda: sp.local_blocks(10, 4, 1), ValueError, "must tile the sequence", id="local-not-tiling"),
        pytest.param(lambda: sp.local_blocks(8, 4, 0), ValueError, "local width", id="local-width-0"),
        pytest.param(lambda: sp.local_blocks(0, 4, 1), ValueError, "seqlen", id="seqlen-0"),
        pytest.param(lambda: sp.global_blocks(8, 4, 3), ValueError, "global blocks", id="global-too-many"),
        pytest.param(lambda: sp.global_blocks(8, 4, -1), ValueError, "global blocks", id="global-negative"),
        pytest.param(lambda: sp.random_blocks(8, 4, -1), ValueError, "random blocks", id="random-negative"),
        pytest.param(lambda: sp.random_blocks(9, 4, 1), ValueError, "must tile the sequence", id="random-not-tiling"),
        pytest.param(lambda: sp.block_pattern(10, 3), ValueError, "must tile the sequence", id="pattern-not-tiling"),
        pytest.param(lambda: sp.block_pattern(8, 0), ValueError, "block_size", id="pattern-bs-0"),
        pytest.param(lambda: sp.hash_projection(2, 8, 0), ValueError, "number of buckets", id="projection-0"),
        pytest.param(lambda: sp.keep_random(torch.arange(4), 1, 1, 1.0), ValueError, "drop fraction", id="keep-1"),
        pytest.param(lambda: sp.keep_random(torch.arange(4), 1, 1, -0.5), ValueError, "drop fraction", id="keep-neg"),
        pytest.param(lambda: sp.local_blocks(8, 4, 1) | sp.local_blocks(8, 2, 1), ValueError, "different grids",
                     id="union-other-grid"),
        pytest.param(lambda: sp.local_blocks(8, 4, 1) & "x", TypeError, "combine", id="and-not-a-pattern"),
    ],
)
def test_helper_arguments_are_checked(make, exc, words):
    with pytest.raises(exc) as info:
        make()
    assert words in str(info.value), str(info.value)
