"""Masks beyond causal: sliding windows and packed documents, through ring attention and on one device.

Each world size (gloo; P = 1, 2, 3, 4, 8) is spawned once: every rank runs the whole grid
(layouts x causal x masks in float32; every mask once more in bfloat16, over one layout each;
at P = 8 a lighter grid, see ``cases``) and the parametrized tests below read their case from
that run. The oracle is float64 attention over the whole sequence with the same window and
document boundaries (``reference.attention``, autograd for the gradients); in bfloat16 the bar
is that reference run in bfloat16 on one process. The same run also measures the bfloat16 error on data that is
the same for every P; the P = 4 run counts ring transfers; the P = 2 run checks that documents
do not leak into each other, that bad masks raise on every rank before any communication, that
the consistency check catches ranks passing different masks, and the ring over the Triton
kernels (under Triton's CPU interpreter).

The single-process tests check ``flash_attention`` against the same oracle, the oracle and
``mask.block_visible`` against a brute-force reading of the rule, and the input checks.
"""

from __future__ import annotations

import itertools
import math
import os
import random
import traceback

import pytest
import torch

from common import CountExchanges, rel
from distributed import spawn
from ringflash import flash_attention, get_layout, reference, ring_attention
from ringflash import mask as mask_mod

WORLD_SIZES = [1, 2, 3, 4, 8]
LAYOUTS = ["contiguous", "striped", "zigzag"]
BATCH = 2  # the same document boundaries for every row
HEADS, KV_HEADS, HEAD_DIM = 4, 2, 16  # GQA
LOCAL_SEQLEN = 8  # per rank; a multiple of 2 so zigzag splits
GROWTH_SEQLEN = 48  # divisible by 2P for every P in WORLD_SIZES: the same data for every world size
NAMES = ["out", "dq", "dk", "dv"]

# name -> (window, documents). Documents: "random" (random lengths, at least one 1-token
# document; a list), "random-tensor" (the same kind, as an int32 tensor), "span" (one document
# over every rank, between two 1-token ones).
MASKS = {
    "window-left": ((2, 0), None),
    "window-right": ((-1, 2), None),  # unbounded on the left
    "window-wider-than-shard": ((LOCAL_SEQLEN + 3, -1), None),
    "window-0-0": ((0, 0), None),
    "window-two-sided": ((3, 2), None),
    "docs": (None, "random"),
    "docs-window": ((4, 1), "random-tensor"),
    "doc-over-every-rank": (None, "span"),
}

# float32: every layout x causal x mask; bfloat16: every causal x mask, over one layout each.
# At P = 8 (eight processes on a small machine: the slowest spawn) float32 runs the two layouts
# that bfloat16 does not, so every (causal, mask) still meets every layout there.
_BF16_LAYOUT = {(c, m): LAYOUTS[i % 3] for i, (c, m) in enumerate(itertools.product([False, True], MASKS))}
CASES = [(lay, c, m, "float32") for lay, c, m in itertools.product(LAYOUTS, [False, True], MASKS)]
CASES += [(lay, c, m, "bfloat16") for (c, m), lay in _BF16_LAYOUT.items()]


def cases(world_size: int) -> list:
    if world_size < 8:
        return CASES
    return [x for x in CASES if x[3] == "bfloat16" or x[0] != _BF16_LAYOUT[(x[1], x[2])]]


# A reference that is exactly zero (dQ and dK under a (0, 0) window: a softmax over one key)
# has no relative error: the ring's deviation from zero is bounded in absolute terms instead.
# What the ring leaves there is rounding of rowsum(dO * O) against dO . v (~1e-7 here).
ZERO_ABS = {"float32": 1e-5, "bfloat16": 1e-5}
FP32_TOL = 1e-5


def _inputs(seed, seqlen, heads=HEADS, heads_kv=KV_HEADS, head_dim=HEAD_DIM, batch=BATCH):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, seqlen, heads, head_dim, generator=g, dtype=torch.float64)
    k = torch.randn(batch, seqlen, heads_kv, head_dim, generator=g, dtype=torch.float64)
    v = torch.randn(batch, seqlen, heads_kv, head_dim, generator=g, dtype=torch.float64)
    dout = torch.randn(batch, seqlen, heads, head_dim, generator=g, dtype=torch.float64)
    return q, k, v, dout


def doc_bounds(kind, seqlen, seed):
    """``cu_seqlens`` over ``seqlen`` tokens (the same on every rank: it depends on the seed only)."""
    if kind is None:
        return None
    if kind == "span":
        return [0, 1, seqlen - 1, seqlen]
    g = random.Random(seed)
    cuts = set(g.sample(range(1, seqlen), k=max(1, seqlen // 5)))
    c = g.randrange(1, seqlen - 1)
    cuts |= {c, c + 1}  # a one-token document
    cu = [0, *sorted(cuts), seqlen]
    return torch.tensor(cu, dtype=torch.int32) if kind == "random-tensor" else cu


def mask_args(name, seqlen, seed):
    window, docs = MASKS[name]
    return {"window": window, "cu_seqlens": doc_bounds(docs, seqlen, seed)}


def _single(q, k, v, dout, causal, masks, dtype):
    """Whole-sequence attention on one process: output and gradients (autograd)."""
    q, k, v = (t.detach().to(dtype).requires_grad_() for t in (q, k, v))
    out, _ = reference.attention(q, k, v, causal=causal, **masks)
    out.backward(dout.to(dtype))
    return [out.detach(), q.grad, k.grad, v.grad]


def _ring(rank, world_size, q, k, v, dout, causal, masks, layout, dtype, backend=None):
    """This rank's shards through ring_attention, gathered back to full tensors."""
    shard = lambda t: layout.shard(t, rank=rank, world_size=world_size)  # noqa: E731
    ql, kl, vl = (shard(t).to(dtype).requires_grad_() for t in (q, k, v))
    out, lse = ring_attention(ql, kl, vl, causal=causal, layout=layout, return_lse=True, backend=backend, **masks)
    assert out.dtype == dtype and lse.dtype == torch.float32
    out.backward(shard(dout).to(dtype))
    return [layout.unshard(t) for t in (out.detach(), ql.grad, kl.grad, vl.grad)], layout.unshard(lse, dim=2)


def _errs(got, ref):
    """Per tensor: (norm of the reference, relative error, largest absolute error)."""
    out = []
    for x, r in zip(got, ref):
        x, r = x.double(), r.double()
        norm = r.norm().item()
        diff = x - r
        out.append((norm, (diff.norm() / norm).item() if norm > 0 else math.inf, diff.abs().max().item()))
    return out


def _guard(results, key, fn):
    """Run one case; an exception becomes that case's result (the other cases still run)."""
    try:
        results[key] = fn()
    except Exception:  # noqa: BLE001
        results[key] = {"error": traceback.format_exc()}


# -- the grid of one world size ---------------------------------------------------------------


def _case(rank, world_size, seed, i, layout_name, causal, mask_name, dtype_name):
    dtype = getattr(torch, dtype_name)
    S = LOCAL_SEQLEN * world_size
    q, k, v, dout = _inputs(seed + i, S)
    masks = mask_args(mask_name, S, seed + i)
    ref = _single(q, k, v, dout, causal, masks, torch.float64)
    got, lse = _ring(rank, world_size, q, k, v, dout, causal, masks, get_layout(layout_name), dtype)
    # The LSE is float32 whatever the input dtype: against float64 attention on the inputs as
    # this dtype rounds them. Every query sees itself: no row is empty over the whole sequence.
    _, ref_lse = reference.attention(*(t.to(dtype).double() for t in (q, k, v)), causal=causal, **masks)
    entry = {"ring": _errs(got, ref), "lse": rel(lse, ref_lse), "lse_finite": bool(torch.isfinite(lse).all())}
    if dtype == torch.bfloat16:
        entry["single"] = _errs(_single(q, k, v, dout, causal, masks, dtype), ref)
    return entry


def _growth(rank, world_size, seed):
    """bfloat16 on the same data for every P: the error must not grow with P."""
    q, k, v, dout = _inputs(seed + 10_000, GROWTH_SEQLEN)
    out = {}
    for causal, mask_name in ((True, "docs-window"), (False, "window-two-sided")):
        masks = mask_args(mask_name, GROWTH_SEQLEN, seed + 10_000)
        ref = _single(q, k, v, dout, causal, masks, torch.float64)
        for layout_name in LAYOUTS:
            got, _ = _ring(rank, world_size, q, k, v, dout, causal, masks, get_layout(layout_name), torch.bfloat16)
            out[(layout_name, causal, mask_name)] = [e[1] for e in _errs(got, ref)]
    return out


# Ring transfers at P = 4 (contiguous layout unless named; L = LOCAL_SEQLEN = 8 tokens a rank).
# name -> (layout, causal, window, cu_seqlens over S = 32, forward hops, backward hops): the
# `hops` argument of every Ring.exchange call, in order. From ring.py: the plan runs
# n = 1 + (the last step any rank needs) steps. Forward: one K/V exchange before each step but
# the last (n - 1 calls). Backward (a transport with any-hop messages): per step but the last,
# one K/V exchange then one hop of the travelling dK/dV sum; after the last step the finished
# sums go straight to their owners, n - 1 ranks back: hops = P - n + 1 (1 after a full ring).
# n = 1: no exchange at all. Where the ranks need K/V from both sides, the ring moves both
# ways when that takes fewer hops: forward first, then backward (hops P - 1) from our own K/V
# again; in the backward each direction's sums go home at its end (hops 3 then 1 here).
L4 = LOCAL_SEQLEN
TRANSFERS = {
    # A causal window no longer than a shard reaches the previous rank only: n = 2.
    "causal-window-one-shard": ("contiguous", True, (L4, 0), None, [1], [1, 1, 3]),
    "causal-window-short": ("contiguous", True, (1, -1), None, [1], [1, 1, 3]),
    "full-window-left-one-shard": ("contiguous", False, (L4, 0), None, [1], [1, 1, 3]),
    # One token wider than a shard: two ranks back, n = 3.
    "causal-window-wider": ("contiguous", True, (L4 + 1, 0), None, [1, 1], [1, 1, 1, 1, 2]),
    # Each query sees only itself: every rank's own block, n = 1, whatever the layout.
    "window-0-0-contiguous": ("contiguous", False, (0, 0), None, [], []),
    "window-0-0-striped": ("striped", True, (0, 0), None, [], []),
    "window-0-0-zigzag": ("zigzag", False, (0, 0), None, [], []),
    # Documents that end at shard ends: n = 1. Causal, one document over ranks 0-1 and one over
    # ranks 2-3: ranks 1 and 3 need the previous rank, n = 2.
    "docs-at-shard-ends": ("contiguous", True, None, [0, L4, 2 * L4, 3 * L4, 4 * L4], [], []),
    "causal-docs-over-two-shards": ("contiguous", True, None, [0, L4 + 4, 2 * L4, 4 * L4], [1], [1, 1, 3]),
    # Without causal, rank 0 needs rank 1's keys, rank 1 rank 0's: one hop each way.
    "full-docs-over-two-shards": ("contiguous", False, None, [0, L4 + 4, 2 * L4, 4 * L4], [1, 3], [1, 1, 3, 3, 1]),
    # A two-sided window no wider than a shard: the neighbours on both sides, one hop each way.
    "two-sided-window-one-shard": ("contiguous", False, (L4, L4), None, [1, 3], [1, 1, 3, 3, 1]),
    # Zigzag (chunks r and 2P - 1 - r of 4 tokens): a causal window of a chunk needs the previous
    # rank for the first chunk and the next rank for the second.
    "zigzag-causal-window": ("zigzag", True, (L4 // 2, 0), None, [1, 3], [1, 1, 3, 3, 1]),
    # Only keys ahead: one hop backward, none forward.
    "window-ahead-one-shard": ("contiguous", False, (0, L4), None, [3], [3, 1]),
    # The dense causal ring: every step. Forward P - 1; backward 2 (P - 1) + 1, all one hop.
    "dense-causal": ("contiguous", True, None, None, [1] * 3, [1] * 7),
}


def _transfers(rank, world_size, seed):
    results = {}
    with CountExchanges() as calls:
        for i, (name, (layout_name, causal, window, cu, _, _)) in enumerate(TRANSFERS.items()):
            def run(i=i, layout_name=layout_name, causal=causal, window=window, cu=cu):
                layout = get_layout(layout_name)
                S = LOCAL_SEQLEN * world_size
                q, k, v, dout = _inputs(seed + 30_000 + i, S)
                masks = {"window": window, "cu_seqlens": cu}
                ref = _single(q, k, v, dout, causal, masks, torch.float64)
                shard = lambda t: layout.shard(t, rank=rank, world_size=world_size)  # noqa: E731
                ql, kl, vl = (shard(t).float().requires_grad_() for t in (q, k, v))
                calls.take()
                out = ring_attention(ql, kl, vl, causal=causal, layout=layout, **masks)
                fwd = calls.take()
                out.backward(shard(dout).float())
                bwd = calls.take()
                got = [layout.unshard(t) for t in (out.detach(), ql.grad, kl.grad, vl.grad)]
                return {"forward": fwd, "backward": bwd, "ring": _errs(got, ref)}
            _guard(results, name, run)
    return results


# Documents must not leak: P = 2, S = 16, the tokens of document [4, 9) replaced.
LEAK_CU = [0, 3, 4, 9, 16]
LEAK_DOC = (4, 9)


def _leak(rank, world_size, seed):
    results = {}
    S = LOCAL_SEQLEN * world_size
    other = torch.tensor([p for p in range(S) if not LEAK_DOC[0] <= p < LEAK_DOC[1]])
    for i, (layout_name, causal, window) in enumerate(itertools.product(LAYOUTS, [False, True], [None, (5, 2)])):
        def run(i=i, layout_name=layout_name, causal=causal, window=window):
            layout = get_layout(layout_name)
            base = _inputs(seed + 40_000 + i, S)
            fresh = _inputs(seed + 50_000 + i, S)
            changed = [t.clone() for t in base]
            for t, f in zip(changed[:3], fresh[:3]):  # q, k, v of the document; dout stays
                t[:, LEAK_DOC[0]:LEAK_DOC[1]] = f[:, LEAK_DOC[0]:LEAK_DOC[1]]
            entry = {}
            for docs in (True, False):
                masks = {"window": window, "cu_seqlens": LEAK_CU if docs else None}
                a, _ = _ring(rank, world_size, *base, causal, masks, layout, torch.float32)
                b, _ = _ring(rank, world_size, *changed, causal, masks, layout, torch.float32)
                entry[docs] = [torch.equal(x[:, other], y[:, other]) for x, y in zip(a, b)]
            return entry
        _guard(results, (layout_name, causal, window), run)
    return results


def bad_masks(local_seqlen: int, world_size: int) -> dict:
    """name -> (mask kwargs, words the ValueError must contain: what to change)."""
    S = local_seqlen * world_size
    return {
        "cu-start": ({"cu_seqlens": [1, 5, S]}, "must start at 0"),
        "cu-end-beyond": ({"cu_seqlens": [0, 5, S + 2]}, f"must end at the global sequence length {S}"),
        "cu-end-short": ({"cu_seqlens": [0, 5, S - 1]}, f"must end at the global sequence length {S}"),
        "cu-repeated": ({"cu_seqlens": [0, 5, 5, S]}, "must be strictly increasing"),
        "cu-decreasing": ({"cu_seqlens": torch.tensor([0, 6, 3, S])}, "must be strictly increasing"),
        "cu-float-tensor": ({"cu_seqlens": torch.tensor([0.0, 5.0, float(S)])}, "integer tensor"),
        "cu-2d": ({"cu_seqlens": torch.tensor([[0, 5, S], [0, 6, S]])}, "must be 1-D"),
        "cu-float-list": ({"cu_seqlens": [0, 5.0, S]}, "must hold ints"),
        "cu-one-boundary": ({"cu_seqlens": [0]}, "at least two boundaries"),
        "window-side": ({"window": (-2, 3)}, "must be >= 0, or -1 for unbounded"),
        "window-right-side": ({"window": (3, -5)}, "must be >= 0, or -1 for unbounded"),
        "window-one": ({"window": (3,)}, "must be a pair of ints (left, right)"),
        "window-int": ({"window": 3}, "must be a pair of ints (left, right)"),
        "window-three": ({"window": (1, 2, 3)}, "must be a pair of ints (left, right)"),
        "window-float": ({"window": (1.5, 2)}, "must be a pair of ints (left, right)"),
        "window-bool": ({"window": (True, 1)}, "must be a pair of ints (left, right)"),
        "window-cudnn": ({"window": (4, 0), "backend": "cudnn"}, 'backend="triton"'),
        "window-sdpa_flash": ({"window": (4, 0), "backend": "sdpa_flash"}, 'backend="triton"'),
        "docs-cudnn": ({"cu_seqlens": [0, 5, S], "backend": "cudnn"}, 'backend="triton"'),
        "docs-sdpa_flash": ({"cu_seqlens": [0, 5, S], "backend": "sdpa_flash"}, 'backend="triton"'),
    }


def _bad_masks_on_every_rank(rank, world_size):
    """Every rank passes the same bad mask: a ValueError naming what to change, raised before
    any transfer (none is posted), and the group still works afterwards."""
    import torch.distributed as dist

    posted = []
    real = dist.batch_isend_irecv
    dist.batch_isend_irecv = lambda ops: posted.append(len(ops)) or real(ops)
    results = {}
    try:
        g = torch.Generator().manual_seed(1)
        q = torch.randn(2, LOCAL_SEQLEN, 4, 16, generator=g)
        k = torch.randn(2, LOCAL_SEQLEN, 2, 16, generator=g)
        for name, (kwargs, words) in bad_masks(LOCAL_SEQLEN, world_size).items():
            posted.clear()
            try:
                ring_attention(q, k, k, causal=True, **kwargs)
                results[name] = "no error"
            except ValueError as e:
                results[name] = "ok" if words in str(e) else f"message without {words!r}: {e}"
            except Exception as e:  # noqa: BLE001
                results[name] = f"{type(e).__name__}: {e}"
            if posted:
                results[name] = f"{len(posted)} transfers posted before the error"
        # A valid mask still runs, and the group is intact.
        out = ring_attention(q, k, k, causal=True, window=(3, 0), cu_seqlens=[0, 5, LOCAL_SEQLEN * world_size])
        results["valid_after"] = "ok" if torch.isfinite(out).all() else "non-finite output"
    finally:
        dist.batch_isend_irecv = real
    x = torch.ones(1)
    dist.all_reduce(x)
    results["group_alive"] = "ok" if x.item() == world_size else f"all_reduce gave {x.item()}"
    return results


# name -> (mask of rank 0, mask of the other ranks, the field the error must name)
MISMATCHES = {
    "cu_seqlens": ({"cu_seqlens": [0, 5, 16]}, {"cu_seqlens": [0, 6, 16]}, "cu_seqlens"),
    "docs-on-one-rank": ({}, {"cu_seqlens": [0, 5, 16]}, "cu_seqlens"),
    "window": ({"window": (2, 0)}, {"window": (3, 0)}, "window"),
    "window-on-one-rank": ({"window": (2, 0)}, {}, "window"),
}


def _mismatched_masks(rank, world_size, seed):
    from ringflash import ring as ring_mod

    ring_mod.CHECK_CONSISTENCY = True
    results = {}
    try:
        g = torch.Generator().manual_seed(2)
        q = torch.randn(1, LOCAL_SEQLEN, 4, 8, generator=g)
        k = torch.randn(1, LOCAL_SEQLEN, 2, 8, generator=g)
        for name, (mine0, others, field) in MISMATCHES.items():
            try:
                ring_attention(q, k, k, causal=True, **(mine0 if rank == 0 else others))
                results[name] = "no error"
            except ValueError as e:
                ok = f"{field}: rank 0" in str(e) and "called differently" in str(e)
                results[name] = "ok" if ok else str(e)
        # Matching masks pass the check and stay exact.
        S = LOCAL_SEQLEN * world_size
        q, k, v, dout = _inputs(seed + 60_000, S)
        masks = {"window": (5, 1), "cu_seqlens": [0, 3, 11, S]}
        ref = _single(q, k, v, dout, True, masks, torch.float64)
        got, _ = _ring(rank, world_size, q, k, v, dout, True, masks, get_layout("zigzag"), torch.float32)
        results["matching"] = _errs(got, ref)
    finally:
        ring_mod.CHECK_CONSISTENCY = False
    return results


# The ring over the Triton kernels (Triton's CPU interpreter), P = 2: masks reach the kernels
# through the ring's plumbing (skipped steps, a ring cut short, the dK/dV hook and store).
TRITON_LOCAL = 20  # crosses the interpreter's 16- and 32-row tiles, with ragged ends
TRITON_CASES = {
    "contiguous-causal-window": ("contiguous", True, (TRITON_LOCAL - 2, 0), None),
    "striped-docs": ("striped", False, None, "random"),
    "zigzag-causal-docs-window": ("zigzag", True, (5, 3), "random-tensor"),
}

# P = 4: a ring that moves both ways (the neighbours on both sides), through the same plumbing.
TRITON_CASES_4 = {
    "contiguous-two-sided-window": ("contiguous", False, (TRITON_LOCAL - 3, TRITON_LOCAL - 5), None),
    "zigzag-causal-window": ("zigzag", True, (TRITON_LOCAL // 2 - 1, 0), None),
}


def _ring_triton(rank, world_size, seed):
    if not os.environ.get("TRITON_INTERPRET") or torch.cuda.is_available():
        return None  # CPU tensors reach the kernels only under the interpreter
    results = {}
    S = TRITON_LOCAL * world_size
    cases = TRITON_CASES if world_size == 2 else TRITON_CASES_4
    for i, (name, (layout_name, causal, window, docs)) in enumerate(cases.items()):
        def run(i=i, layout_name=layout_name, causal=causal, window=window, docs=docs):
            q, k, v, dout = _inputs(seed + 70_000 + i, S, heads=2, heads_kv=1, batch=1)
            masks = {"window": window, "cu_seqlens": doc_bounds(docs, S, seed + 70_000 + i)}
            ref = _single(q, k, v, dout, causal, masks, torch.float64)
            got, _ = _ring(rank, world_size, q, k, v, dout, causal, masks, get_layout(layout_name),
                           torch.float32, backend="triton")
            return _errs(got, ref)
        _guard(results, name, run)
    return results


def _grid(rank, world_size, seed):
    results = {}
    for i, (layout_name, causal, mask_name, dtype_name) in enumerate(CASES):
        if (layout_name, causal, mask_name, dtype_name) not in cases(world_size):
            continue
        _guard(results, (layout_name, causal, mask_name, dtype_name),
               lambda: _case(rank, world_size, seed, i, layout_name, causal, mask_name, dtype_name))
    _guard(results, "growth", lambda: _growth(rank, world_size, seed))
    if world_size == 4:
        results["transfers"] = _transfers(rank, world_size, seed)
        results["triton"] = _ring_triton(rank, world_size, seed)
    if world_size == 2:
        results["leak"] = _leak(rank, world_size, seed)
        results["bad"] = _bad_masks_on_every_rank(rank, world_size)
        results["mismatch"] = _mismatched_masks(rank, world_size, seed)
        results["triton"] = _ring_triton(rank, world_size, seed)
    return results


_SEED = random.randrange(1 << 30)  # fresh inputs every run; printed on failure
_RUNS: dict[int, list] = {}


def grid(world_size: int) -> list[dict]:
    if world_size not in _RUNS:
        _RUNS[world_size] = spawn(_grid, world_size, _SEED, timeout=600)
    return _RUNS[world_size]


def _entry(res, key):
    entry = res[key]
    assert not (isinstance(entry, dict) and "error" in entry), entry.get("error")
    return entry


def assert_matches(errs, ctx, single=None, dtype="float32", tol=FP32_TOL):
    for name, (norm, err, biggest) in zip(NAMES, errs):
        if norm == 0:
            # Exactly zero in float64 (a (0, 0) window's dQ and dK): an absolute bound.
            assert biggest < ZERO_ABS[dtype], f"{name}: |x| up to {biggest:.2e} where float64 gives 0; {ctx}"
        elif single is None:
            assert err < tol, f"{name}: relative error {err:.2e}; {ctx}"
        else:
            s = single[NAMES.index(name)][1]
            assert err <= 2 * s, f"{name}: ring {err:.2e} vs single-process bf16 {s:.2e}; {ctx}"


# -- ring attention against float64 --------------------------------------------------------


@pytest.mark.parametrize("world_size,layout,causal,mask,dtype", [(p, *c) for p in WORLD_SIZES for c in cases(p)])
def test_ring_masks_match_float64(world_size, layout, causal, mask, dtype):
    for rank, res in enumerate(grid(world_size)):
        entry = _entry(res, (layout, causal, mask, dtype))
        ctx = f"rank {rank}, P={world_size}, seed {_SEED}: {entry}"
        assert_matches(entry["ring"], ctx, single=entry.get("single"), dtype=dtype)
        assert entry["lse_finite"], ctx  # every query sees at least itself
        assert entry["lse"] < 1e-5, ctx  # merged in float32 in every layout


@pytest.mark.parametrize("layout", LAYOUTS)
def test_bf16_error_does_not_grow_with_world_size(layout):
    errors = {p: _entry(grid(p)[0], "growth") for p in WORLD_SIZES}
    for key in [k for k in errors[1] if k[0] == layout]:
        base = errors[1][key]
        for p, errs in errors.items():
            for name, e, e1 in zip(NAMES, errs[key], base):
                # One rounding at the end whatever P is: the same error up to noise, not a trend.
                assert e <= 1.25 * e1 + 1e-4, f"{key} {name} at P={p}: {e:.3e} vs P=1 {e1:.3e} (seed {_SEED})"


# -- ring transfers: steps no rank needs are not run -----------------------------------------


@pytest.mark.parametrize("case", list(TRANSFERS))
def test_ring_runs_only_the_steps_some_rank_needs(case):
    *_, fwd, bwd = TRANSFERS[case]
    for rank, res in enumerate(grid(4)):
        entry = _entry(res["transfers"], case)
        ctx = f"rank {rank}, seed {_SEED}: {entry}"
        assert entry["forward"] == fwd, ctx
        assert entry["backward"] == bwd, ctx
        assert_matches(entry["ring"], ctx)  # and still exact


def test_two_way_hops_take_the_fewest():
    """The plan's (forward, backward) hops against every split, by brute force."""
    from ringflash.ring import two_way_hops

    rng = random.Random(_SEED)
    for _ in range(300):
        P = rng.randrange(1, 10)
        offsets = sorted(rng.sample(range(1, P), k=rng.randrange(0, P))) if P > 1 else []
        fwd, bwd = two_way_hops(offsets, P)
        assert all(s <= fwd or P - s <= bwd for s in offsets), (P, offsets, fwd, bwd)
        fewest = min(max([s for s in offsets if s <= c], default=0) + max([P - s for s in offsets if s > c], default=0)
                     for c in range(P))
        assert fwd + bwd == fewest, (P, offsets, fwd, bwd)
        if bwd:
            assert fwd + bwd < max(offsets), (P, offsets)  # both ways only when strictly fewer
    assert two_way_hops([1, 3], 4) == (1, 1) and two_way_hops([3], 4) == (0, 1)
    assert two_way_hops([1, 2, 3], 4) == (3, 0) and two_way_hops([], 4) == (0, 0)


# -- documents do not leak ------------------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
def test_documents_do_not_leak(layout):
    """Replacing the q, k, v tokens of one document leaves every other document's output and
    gradients bitwise unchanged (float32, 2 ranks); without cu_seqlens the output changes."""
    for rank, res in enumerate(grid(2)):
        for (lay, causal, window), entry in res["leak"].items():
            if lay != layout:
                continue
            assert "error" not in entry, entry.get("error")
            ctx = f"rank {rank}, causal={causal}, window={window}, seed {_SEED}"
            assert all(entry[True]), f"{dict(zip(NAMES, entry[True]))}; {ctx}"
            assert not entry[False][0], f"the output did not change without cu_seqlens; {ctx}"


# -- bad input, and ranks that disagree ------------------------------------------------------


def test_bad_masks_raise_on_every_rank():
    for rank, res in enumerate(grid(2)):
        bad = {k: v for k, v in res["bad"].items() if v != "ok"}
        assert not bad, f"rank {rank}: {bad}"


def test_consistency_check_catches_different_masks():
    for rank, res in enumerate(grid(2)):
        verdicts = {k: v for k, v in res["mismatch"].items() if k != "matching"}
        assert verdicts == dict.fromkeys(MISMATCHES, "ok"), f"rank {rank}: {verdicts}"
        assert_matches(res["mismatch"]["matching"], f"rank {rank}, seed {_SEED}")


@pytest.mark.parametrize("world_size", [2, 4])
def test_ring_masks_with_triton_kernels_interpreted(world_size):
    for rank, res in enumerate(grid(world_size)):
        if res["triton"] is None:
            pytest.skip("the Triton kernels run on CPU tensors only under TRITON_INTERPRET=1")
        for name, entry in res["triton"].items():
            assert isinstance(entry, list), (name, entry.get("error"))
            assert_matches(entry, f"rank {rank}, {name}, seed {_SEED}")


# -- one device ---------------------------------------------------------------------------


def brute_force_visible(q_pos, k_pos, causal, window, cu):
    """The rule of the feature's request, read literally, one pair at a time."""
    def doc(p):
        return next(d for d in range(len(cu) - 1) if cu[d] <= p < cu[d + 1])

    vis = torch.zeros(len(q_pos), len(k_pos), dtype=torch.bool)
    for i, p in enumerate(q_pos.tolist()):
        for j, kp in enumerate(k_pos.tolist()):
            ok = not causal or kp <= p
            if window is not None:
                left, right = window
                ok = ok and (left == -1 or kp >= p - left) and (right == -1 or kp <= p + right)
            if cu is not None:
                ok = ok and doc(p) == doc(kp)
            vis[i, j] = ok
    return vis


def naive_attention(q, k, v, vis):
    """float64 softmax attention under a boolean (Sq, Sk) mask, GQA by repeating K/V heads."""
    G = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(G, dim=2), v.repeat_interleave(G, dim=2)
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
    s = s.masked_fill(~vis, -math.inf)
    return torch.einsum("bhqk,bkhd->bqhd", torch.softmax(s, dim=-1).nan_to_num(0.0), v)


# (Sq, Sk, causal, window, cu_seqlens); queries sit at the end (bottom-right), keys at 0..Sk-1.
SINGLE = [
    pytest.param(24, 24, True, (5, 0), None, id="causal-window"),
    pytest.param(24, 24, False, (3, 4), None, id="two-sided"),
    pytest.param(24, 24, False, (0, 0), None, id="window-0-0"),
    pytest.param(24, 24, False, (-1, 2), None, id="right-only"),
    pytest.param(24, 24, False, None, [0, 1, 7, 8, 19, 24], id="docs"),
    pytest.param(24, 24, True, None, [0, 1, 7, 8, 19, 24], id="causal-docs"),
    pytest.param(24, 24, True, (4, -1), torch.tensor([0, 5, 6, 24]), id="causal-docs-window"),
    pytest.param(10, 24, True, (6, 0), None, id="Sq<Sk-causal-window"),
    pytest.param(10, 24, False, (2, 3), None, id="Sq<Sk-two-sided"),
]


@pytest.mark.quick
@pytest.mark.parametrize("Sq,Sk,causal,window,cu", SINGLE)
def test_flash_attention_with_masks(Sq, Sk, causal, window, cu):
    """flash_attention (reference backend on the CPU) in float32 against float64 attention with
    the same mask, output and gradients; the oracle itself against the brute-force rule."""
    g = torch.Generator().manual_seed(Sq * 100 + Sk)
    q, dout = (torch.randn(2, Sq, 4, 16, generator=g, dtype=torch.float64) for _ in range(2))
    k, v = (torch.randn(2, Sk, 2, 16, generator=g, dtype=torch.float64) for _ in range(2))
    q32, k32, v32 = (t.float().requires_grad_() for t in (q, k, v))
    out, lse = flash_attention(q32, k32, v32, causal=causal, window=window, cu_seqlens=cu, return_lse=True)
    out.backward(dout.float())
    q64, k64, v64 = (t.clone().requires_grad_() for t in (q, k, v))
    ref, ref_lse = reference.attention(q64, k64, v64, causal=causal, window=window, cu_seqlens=cu)
    ref.backward(dout)
    errs = _errs([out.detach(), q32.grad, k32.grad, v32.grad], [ref.detach(), q64.grad, k64.grad, v64.grad])
    assert_matches(errs, f"{errs}")
    assert rel(lse, ref_lse) < 1e-6
    # The oracle is the rule of the request.
    q_pos, k_pos = torch.arange(Sk - Sq, Sk), torch.arange(Sk)
    vis = brute_force_visible(q_pos, k_pos, causal, window, None if cu is None else list(map(int, cu)))
    assert rel(ref, naive_attention(q, k, v, vis)) < 1e-12


def test_flash_attention_window_minus_one_is_no_window():
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 12, 2, 16, generator=g) for _ in range(3))
    a = flash_attention(q, k, v, causal=True)
    for window in ((-1, -1), [-1, -1], torch.tensor([-1, -1])):
        assert torch.equal(a, flash_attention(q, k, v, causal=True, window=window))
    assert torch.equal(flash_attention(q, k, v, window=(2, 1)), flash_attention(q, k, v, window=[2, 1]))


def test_flash_attention_cu_seqlens_needs_equal_lengths():
    q, k = torch.randn(1, 8, 2, 16), torch.randn(1, 12, 2, 16)
    with pytest.raises(ValueError, match="seqlen_q == seqlen_k"):
        flash_attention(q, k, k, cu_seqlens=[0, 4, 12])
    with pytest.raises(ValueError, match="seqlen_q == seqlen_k"):
        flash_attention(q, k, k, cu_seqlens=[0, 4, 8])


@pytest.mark.parametrize("layout", LAYOUTS)
def test_ring_attention_without_process_group(layout):
    """A world of one without torch.distributed: plain attention with the mask."""
    q, k, v, dout = _inputs(5, 12)
    masks = {"window": (3, 1), "cu_seqlens": [0, 1, 5, 12]}
    ref = _single(q, k, v, dout, True, masks, torch.float64)
    ql, kl, vl = (t.float().requires_grad_() for t in (q, k, v))
    out = ring_attention(ql, kl, vl, causal=True, layout=layout, **masks)
    out.backward(dout.float())
    assert_matches(_errs([out.detach(), ql.grad, kl.grad, vl.grad], ref), layout)


@pytest.mark.quick
@pytest.mark.parametrize("api", ["flash_attention", "ring_attention"])
@pytest.mark.parametrize("name", list(bad_masks(8, 1)))
def test_bad_masks_single_process(api, name):
    kwargs, words = bad_masks(8, 1)[name]
    q, k = torch.randn(1, 8, 4, 16), torch.randn(1, 8, 2, 16)
    attn = flash_attention if api == "flash_attention" else ring_attention
    with pytest.raises(ValueError) as info:
        attn(q, k, k, causal=True, **kwargs)
    assert words in str(info.value), str(info.value)


@pytest.mark.parametrize("seed", range(4))
def test_block_visible_is_exact_per_rule_and_never_drops_a_pair(seed):
    """The ring's skip decision against the brute-force rule, on random increasing positions:
    exact for causal, windows and documents alone; never False where a pair is visible."""
    g = random.Random(seed)
    S = 40
    for _ in range(150):
        q_pos = torch.tensor(sorted(g.sample(range(S), g.randint(1, 10))))
        k_pos = torch.tensor(sorted(g.sample(range(S), g.randint(1, 10))))
        causal = g.random() < 0.5
        window = g.choice([None, (g.randint(-1, 6), g.randint(-1, 6))])
        cu = g.choice([None, [0, *sorted(g.sample(range(1, S), g.randint(1, 8))), S]])
        m = mask_mod.make_mask(causal, window, cu, S)
        truth = bool(brute_force_visible(q_pos, k_pos, causal, m.window, m.cu_seqlens).any())
        got = mask_mod.block_visible(m, q_pos, k_pos)
        ctx = (q_pos.tolist(), k_pos.tolist(), causal, window, cu)
        if m.window is not None and m.cu_seqlens is not None:
            assert got or not truth, ctx  # may keep an empty step, never drops a visible one
        else:
            assert got == truth, ctx
