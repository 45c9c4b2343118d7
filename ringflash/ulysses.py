"""Ulysses x ring: an all-to-all over heads inside a Ulysses group, the ring across them.

With a :class:`~ringflash.comm.HybridGroup` of ``R`` ring positions x ``U`` Ulysses ranks
(``P = R * U``), every rank holds its shard of ``L = S / P`` tokens, cut by the layout over all
``P`` ranks exactly as for a plain group. One call:

1. one all-to-all in the Ulysses group (queries, keys and values together) gives each rank the
   ``U * L`` tokens of its Ulysses group for ``H / U`` of the query heads (and their K/V heads);
2. those tokens, put in increasing position order, are the shard of ``layout.grouped(U)`` over
   the ``R`` ring positions (striped over ``P`` ranks is ``Striped(U)`` over ``R``; zigzag stays
   zigzag; contiguous stays contiguous), and :func:`ringflash.ring_attention` runs over the
   ring group with it: ``R - 1`` hops of ``U``-times larger K/V blocks instead of ``P - 1``;
3. one all-to-all sends every rank its own tokens back, for all heads.

The backward runs the same steps in reverse (the all-to-all is its own adjoint). Masks
(causal, windows, documents) and block-sparse patterns are rules on global positions and need
nothing more. QK-dropping flags and hash-bucket ids (:mod:`ringflash.sparse`) are per token and
head: they take the same all-to-all as the queries and keys they belong to (one more small
exchange each), and the ring over the ring group sorts them per head as it does for a plain group.

With ``HybridGroup(..., chunks=C)`` the heads of each rank are cut into ``C`` chunks that
pipeline: every chunk's all-to-all is posted at once (asynchronously, on the Ulysses group's
communicator), the ring of chunk ``i`` starts as soon as its own all-to-all has landed, so it
runs beside the all-to-alls of the chunks after it, and its result is posted back before the
next chunk's ring starts. In the backward the autograd engine takes the chunks in reverse order
and the same overlap holds: the gradients of chunk ``i`` are posted before the ring's backward of
chunk ``i - 1`` runs, and only waited for after it.

Grouped-query attention: when ``U`` divides the K/V head count, each rank receives
``Hkv / U`` K/V heads; when the K/V head count divides ``U`` (fewer K/V heads than Ulysses
ranks), each K/V head is sent to the ``U / Hkv`` ranks whose query heads use it, so each rank
gets exactly one: the K/V all-to-all then carries ``U / Hkv`` times the K/V bytes (the ring
still moves one K/V head per rank). Other counts raise ``ValueError``.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.distributed as dist
from einops import rearrange

from .comm import HybridGroup, check_group_device, check_transport
from . import comm
from .layout import Layout
from .mask import make_mask
from .ops import check_mask_backend, check_qkv, check_sparsity_backend, get_backend, resolve_scale
from .sparse import HashSparse, QKDrop, bucket_range_problem, check_sparsity, is_token_sparsity

__all__ = ["hybrid_attention", "check_heads"]

_ORDERS: OrderedDict = OrderedDict()  # (layout, S, P, U, r, device) -> (order, inverse)


def check_heads(nheads: int, nheads_kv: int, ulysses_size: int) -> None:
    """Raise ``ValueError`` unless the heads can be split over ``ulysses_size`` ranks."""
    if nheads % ulysses_size:
        raise ValueError(
            f"a Ulysses group of {ulysses_size} ranks splits the query heads among its ranks: "
            f"{nheads} query heads are not a multiple of {ulysses_size}; choose a Ulysses size "
            f"that divides the number of heads"
        )
    if nheads_kv % ulysses_size and ulysses_size % nheads_kv:
        raise ValueError(
            f"{nheads_kv} key/value heads over a Ulysses group of {ulysses_size} ranks: the Ulysses "
            f"size must divide the number of K/V heads, or be a multiple of it (then each K/V "
            f"head is replicated to the ranks whose query heads use it)"
        )


def _orders(layout: Layout, seqlen: int, group: HybridGroup, device):
    key = (layout, seqlen, group.size, group.ulysses_size, group.ring_rank, device)
    try:
        hit = _ORDERS.get(key)
    except TypeError:  # a Layout with unhashable attributes: made on every call
        key, hit = None, None
    if hit is None:
        # Normal tensors even inside torch.inference_mode: they outlive the call, and the
        # backward of later calls saves them.
        with torch.inference_mode(False):
            order = layout.gather_order(seqlen, inner=group.ulysses_size, outer_rank=group.ring_rank,
                                        world_size=group.size, device=device)
            hit = (order, torch.argsort(order))
        if key is not None:
            _ORDERS[key] = hit
            while len(_ORDERS) > 16:
                _ORDERS.popitem(last=False)
    return hit


class _AllToAll(torch.autograd.Function):
    """``out[j] = x[me]`` of rank ``j``, along dim 0 (one slice per rank); its own adjoint."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        x = x.contiguous()
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
        dist.all_to_all_single(out, x, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        out = torch.empty_like(grad, memory_format=torch.contiguous_format)
        dist.all_to_all_single(out, grad, group=ctx.group)
        return out, None


class _Pending:
    """One asynchronous all-to-all in flight (the forward's, then its gradient's): its Work and
    the buffers it reads and writes, kept alive until it has completed."""

    __slots__ = ("work", "buffers", "grad_work", "grad_buffers")

    def __init__(self):
        self.work = self.buffers = self.grad_work = self.grad_buffers = None


class _AllToAllStart(torch.autograd.Function):
    """Posts ``_AllToAll``'s exchange and returns its (not yet filled) output; :class:`_AllToAllWait`
    waits for it. Backward: waits for the gradient's exchange that the wait's backward posted."""

    @staticmethod
    def forward(ctx, x, group, pending):
        x = x.contiguous()
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
        pending.work = dist.all_to_all_single(out, x, group=group, async_op=True)
        pending.buffers = (x, out)
        ctx.pending = pending
        return out

    @staticmethod
    def backward(ctx, grad):
        p = ctx.pending
        p.grad_work.wait()
        out = p.grad_buffers[1]
        p.grad_work = p.grad_buffers = None
        return out, None, None


class _AllToAllWait(torch.autograd.Function):
    """The output of :class:`_AllToAllStart`, once its exchange has completed. Backward: posts
    the gradient's exchange and returns at once (the start's backward waits for it)."""

    @staticmethod
    def forward(ctx, y, group, pending):
        pending.work.wait()
        pending.work = pending.buffers = None
        ctx.group, ctx.pending = group, pending
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad):
        p = ctx.pending
        grad = grad.contiguous()
        out = torch.empty_like(grad, memory_format=torch.contiguous_format)
        p.grad_work = dist.all_to_all_single(out, grad, group=ctx.group, async_op=True)
        p.grad_buffers = (grad, out)
        return out, None, None  # only a placeholder: _AllToAllStart.backward returns the result


def _post(x: torch.Tensor, group) -> tuple:
    """An all-to-all of ``x`` posted: (its output, not yet to be read; what :func:`_landed` takes)."""
    pending = _Pending()
    return _AllToAllStart.apply(x, group, pending), pending


def _landed(y: torch.Tensor, group, pending: _Pending) -> torch.Tensor:
    return _AllToAllWait.apply(y, group, pending)


def _chunk_count(requested: int, hq: int, hkv: int) -> int:
    """The largest count up to ``requested`` that divides both head counts per rank."""
    return max(c for c in range(1, requested + 1) if hq % c == 0 and hkv % c == 0)


def _to_heads(x: torch.Tensor, group: HybridGroup, order: torch.Tensor) -> torch.Tensor:
    """(B, L, U*h, D) on each rank -> (B, U*L, h, D): the Ulysses group's tokens, ``h`` heads."""
    x = rearrange(x, "b l (u h) d -> u b l h d", u=group.ulysses_size)
    x = _AllToAll.apply(x, group.ulysses)  # dim 0 now indexes the rank the tokens came from
    return rearrange(x, "u b l h d -> b (u l) h d").index_select(1, order)


def _to_tokens(x: torch.Tensor, group: HybridGroup, inverse: torch.Tensor, token_dim: int) -> torch.Tensor:
    """The inverse of :func:`_to_heads` for the output (token_dim 1) or the LSE (token_dim 2)."""
    x = x.index_select(token_dim, inverse)
    if token_dim == 1:  # (B, U*L, h, D) -> (B, L, U*h, D)
        x = _AllToAll.apply(rearrange(x, "b (u l) h d -> u b l h d", u=group.ulysses_size), group.ulysses)
        return rearrange(x, "u b l h d -> b l (u h) d")
    x = _AllToAll.apply(rearrange(x, "b h (u l) -> u b h l", u=group.ulysses_size), group.ulysses)  # LSE
    return rearrange(x, "u b h l -> b (u h) l")


def _bucket_range_everywhere(sparsity, group: HybridGroup, device) -> None:
    """``ValueError`` on every rank if any rank's bucket ids are out of range: one all-gather of a
    flag over the whole group (the Ulysses group, then the ring)."""
    problem = bucket_range_problem(sparsity)
    flags = comm.all_gather_tensor(torch.tensor([bool(problem)], device=device), group)
    bad = [r for r, f in enumerate(flags.flatten().tolist()) if f]
    if bad and not problem:
        problem = f"bucket ids out of [0, num_buckets) on rank(s) {bad} of the group"
    if problem:
        raise ValueError(problem)


def _attr_to_heads(t: torch.Tensor, group: HybridGroup, order: torch.Tensor, repeat: int) -> torch.Tensor:
    """A per-token, per-head attribute (B, L, U*h) -> (B, U*L, h), as :func:`_to_heads` moves the
    heads it belongs to (``repeat``: K/V heads replicated to ``repeat`` ranks each)."""
    if repeat > 1:
        t = t.repeat_interleave(repeat, dim=2)
    x = t.to(torch.int32) if t.dtype == torch.bool else t  # every backend's all-to-all takes integers
    x = _to_heads(x.unsqueeze(-1), group, order).squeeze(-1)
    return x.to(torch.bool) if t.dtype == torch.bool else x


def _sparsity_to_heads(sparsity, group: HybridGroup, order: torch.Tensor, kv_repeat: int):
    """The call's sparse mode for the ring over the ring group: block patterns as they are (rules
    on global positions), keep flags and bucket ids moved with their heads (see the module)."""
    if not is_token_sparsity(sparsity):
        return sparsity
    if isinstance(sparsity, QKDrop):
        return QKDrop(_attr_to_heads(sparsity.q_keep, group, order, 1),
                      _attr_to_heads(sparsity.k_keep, group, order, kv_repeat))
    return HashSparse(_attr_to_heads(sparsity.q_buckets, group, order, 1),
                      _attr_to_heads(sparsity.k_buckets, group, order, kv_repeat), sparsity.num_buckets, checked=True)


def _head_slice(sparsity, hq: slice, hkv: slice):
    """The sparse mode of a chunk of heads (:func:`_pipelined`)."""
    if isinstance(sparsity, QKDrop):
        return QKDrop(sparsity.q_keep[:, :, hq], sparsity.k_keep[:, :, hkv])
    if isinstance(sparsity, HashSparse):
        return HashSparse(sparsity.q_buckets[:, :, hq], sparsity.k_buckets[:, :, hkv], sparsity.num_buckets,
                          checked=True)
    return sparsity


@torch.compiler.disable
def hybrid_attention(q, k, v, *, causal, window, cu_seqlens, layout: Layout, softmax_scale, group: HybridGroup,
                     return_lse: bool, backend, sparsity=None):
    """:func:`ringflash.ring_attention` over a :class:`~ringflash.comm.HybridGroup` (see the module)."""
    from .ring import ring_attention  # ring imports this module

    # Every check that can fail runs here, on every rank, before the first all-to-all.
    check_qkv(q, k, v)
    B, L, H, D = q.shape
    Hkv = k.shape[2]
    U = group.ulysses_size
    if k.shape[1] != L:
        raise ValueError(
            f"ring attention needs q and k/v shards of the same tokens; got local lengths {L} (q) and "
            f"{k.shape[1]} (k, v)"
        )
    layout.check_local_seqlen(L, group.size)
    ring_layout = layout.grouped(U)
    check_heads(H, Hkv, U)
    check_group_device(group, q.device)
    check_transport(comm.TRANSPORT, group.ring, q.device)
    softmax_scale = resolve_scale(softmax_scale, D)
    mask = make_mask(causal, window, cu_seqlens, L * group.size)
    check_mask_backend(backend, mask)
    check_sparsity(sparsity, q, k, L * group.size, check_range=False)
    check_sparsity_backend(backend, sparsity)
    be = get_backend(backend, q.device)
    check_mask_backend(be, mask)
    if getattr(be, "check", None) is not None:
        be.check(q, k, v)
    check_layout = getattr(be, "check_layout", None)
    if check_layout is not None and group.ring_size > 1:  # what the ring over the ring group asks of it
        check_layout(ring_layout, L * U, group.ring_size, mask.causal)
    if U == 1:
        return ring_attention(q, k, v, causal=causal, window=window, cu_seqlens=cu_seqlens, layout=ring_layout,
                              softmax_scale=softmax_scale, group=group.ring, return_lse=return_lse, backend=backend,
                              sparsity=sparsity)
    if isinstance(sparsity, HashSparse) and not sparsity.checked:
        _bucket_range_everywhere(sparsity, group, q.device)

    order, inverse = _orders(layout, L * group.size, group, q.device)
    kv_repeat = U // Hkv if Hkv % U else 1
    if kv_repeat > 1:  # fewer K/V heads than Ulysses ranks: rank u gets the K/V head of its query heads
        k, v = (t.repeat_interleave(kv_repeat, dim=2) for t in (k, v))
    hq, hkv = H // U, k.shape[2] // U
    sparsity = _sparsity_to_heads(sparsity, group, order, kv_repeat)
    ring_kw = dict(causal=causal, window=window, cu_seqlens=cu_seqlens, layout=ring_layout, softmax_scale=softmax_scale,
                   group=group.ring, return_lse=return_lse, backend=backend)
    C = _chunk_count(group.chunks, hq, hkv)
    if C > 1:
        return _pipelined(q, k, v, group, order, inverse, hq, hkv, C, ring_kw, ring_attention, sparsity)
    # One all-to-all for q, k and v: per destination rank, its query heads then its K/V heads.
    qkv = torch.cat([rearrange(t, "b l (u h) d -> b l u h d", u=U) for t in (q, k, v)], dim=3)
    qkv = _to_heads(rearrange(qkv, "b l u h d -> b l (u h) d"), group, order)
    q_g, k_g, v_g = qkv.split([hq, hkv, hkv], dim=2)
    out = ring_attention(q_g, k_g, v_g, sparsity=sparsity, **ring_kw)
    if return_lse:
        out, lse = out
        return _to_tokens(out, group, inverse, 1), _to_tokens(lse, group, inverse, 2)
    return _to_tokens(out, group, inverse, 1)


def _pipelined(q, k, v, group: HybridGroup, order, inverse, hq: int, hkv: int, C: int, ring_kw: dict, ring_attention,
               sparsity=None):
    """:func:`hybrid_attention` with each rank's heads in ``C`` chunks (see the module): the
    all-to-all of a chunk runs beside the ring of another."""
    U = group.ulysses_size
    # Chunk c of destination rank u: its query heads [c hq/C, (c + 1) hq/C) and K/V heads likewise
    # (a query head keeps its K/V head: the chunks cut both in the same proportion).
    parts = [rearrange(t, "b l (u c h) d -> c u b l h d", u=U, c=C) for t in (q, k, v)]
    posted = [_post(torch.cat([p[c] for p in parts], dim=-2), group.ulysses) for c in range(C)]
    outs, lses = [], []
    for c, (y, pending) in enumerate(posted):
        y = rearrange(_landed(y, group.ulysses, pending), "u b l h d -> b (u l) h d").index_select(1, order)
        q_g, k_g, v_g = y.split([hq // C, hkv // C, hkv // C], dim=2)
        # This rank's heads of chunk c are [c hq/C, (c + 1) hq/C) of its hq (and likewise for K/V).
        sp = _head_slice(sparsity, slice(c * hq // C, (c + 1) * hq // C), slice(c * hkv // C, (c + 1) * hkv // C))
        res = ring_attention(q_g, k_g, v_g, sparsity=sp, **ring_kw)
        out, lse = res if ring_kw["return_lse"] else (res, None)
        # Back to the ranks the tokens came from, posted before the next chunk's ring.
        outs.append(_post(rearrange(out.index_select(1, inverse), "b (u l) h d -> u b l h d", u=U), group.ulysses))
        if lse is not None:
            lses.append(_post(rearrange(lse.index_select(2, inverse), "b h (u l) -> u b h l", u=U), group.ulysses))
    # Dim 0 of each landed chunk is now the Ulysses rank whose heads it holds.
    out = rearrange(torch.stack([_landed(y, group.ulysses, p) for y, p in outs]), "c u b l h d -> b l (u c h) d")
    if not lses:
        return out
    lse = rearrange(torch.stack([_landed(y, group.ulysses, p) for y, p in lses]), "c u b h l -> b (u c h) l")
    return out, lse
