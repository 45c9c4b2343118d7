"""Reorder every head's tokens for QK-dropping and hash buckets: two launches to sort, one per move.

QK-dropping and hashing (:mod:`ringflash.sparse`) run the kernels on tokens reordered per head
so that tokens that may see each other sit together. The order is by *bucket* (the hash
bucket; kept before dropped for QK-dropping), and inside a bucket by the tokens' order in the
call, along which global positions and document ids already increase in every layout. So a
stable counting sort over the bucket ids gives it: no comparison sort is needed.

``sort_tokens`` does that for the queries and the keys of a call, one program per chunk of a
(batch row, head) row of either: the first launch counts each chunk's tokens per bucket; in the
second, each chunk's program sums the counts of its row into where its tokens of each bucket
start (the row's tokens of lower buckets, plus those of the same bucket in earlier chunks),
gives each token its place and writes the permutation, its inverse and, in sorted order, the
composite document (what the kernels compare as document ids: ``bucket * num_docs +
document`` for hashing; the document, or a drop value after every kept one, for QK-dropping)
and the composite position (``composite document << 31 | position``). Two launches instead of
two PyTorch sorts and about fifteen element-wise operations: the sorts alone took 170 us of
host time each on an H100 machine (cub's segmented sort is several launches). Up to
``MAX_BUCKETS`` buckets: the one-hot counts grow with the bucket count, and beyond it callers
sort with PyTorch.

``permute_tokens`` moves rows of (B, S, H, D) tensors by such permutations, in one launch for
up to two groups (Q by the queries' order with K and V by the keys'; the output with its LSE).
Its gradient is the same move by the inverse permutations: plain reads and writes, where
``torch.gather``'s gradient zero-fills and adds with atomics.

Bucket ids outside ``[0, num_buckets)`` are the caller's error (:class:`~ringflash.sparse.HashSparse`
checks them unless told not to); here they are clamped into range so that the permutation stays
one.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import FP_FUSION
from .attention import INTERPRETED

__all__ = ["sort_tokens", "permute_tokens", "MAX_BUCKETS"]

MAX_BUCKETS = 32  # more: the one-hot counts of a chunk and the prefix over chunks grow; PyTorch sorts
NUM_WARPS = 4


def _chunk(num_buckets: int) -> int:
    """Tokens per program of the sort: chunk x buckets one-hot entries stay at most 16k."""
    return max(256, min(1024, 16384 // triton.next_power_of_2(max(num_buckets, 2))))


@triton.jit
def _bucket(ids, num_buckets, DROP: tl.constexpr):
    """Bucket ids clamped into range; keep flags (``DROP``) to bucket 0 (kept) or 1 (dropped)."""
    if DROP:
        return (ids == 0).to(tl.int32)
    return tl.minimum(tl.maximum(ids, 0), num_buckets - 1)


@triton.jit
def _row(pid_r, q_rows, H, Hkv):
    """Program row ``pid_r`` -> (is a query row, batch row, head): queries first, then keys."""
    is_q = pid_r < q_rows
    r = tl.where(is_q, pid_r, pid_r - q_rows)
    heads = tl.where(is_q, H, Hkv)
    return is_q, (r // heads).to(tl.int64), (r % heads).to(tl.int64), heads


@triton.jit
def _chunk_hits(BKT, stride_bb, stride_bs, stride_bh, b, h, S, start, num_buckets,
                NB: tl.constexpr, BLOCK: tl.constexpr, DROP: tl.constexpr):
    """A chunk's tokens: their offsets, in-range flags, buckets and (BLOCK, NB) one-hot rows."""
    offs = start + tl.arange(0, BLOCK)
    ok = offs < S
    bk = tl.load(BKT + b * stride_bb + h * stride_bh + offs.to(tl.int64) * stride_bs, mask=ok, other=0)
    bk = _bucket(bk.to(tl.int32), num_buckets, DROP)
    hit = ((bk[:, None] == tl.arange(0, NB)[None, :]) & ok[:, None]).to(tl.int32)
    return offs, ok, bk, hit


@triton.jit
def _count_kernel(
    QB, stride_qbb, stride_qbs, stride_qbh,
    KB, stride_kbb, stride_kbs, stride_kbh,
    COUNTS, q_rows, H, Hkv, Sq, Sk, num_buckets,
    NB: tl.constexpr, BLOCK: tl.constexpr, DROP: tl.constexpr,
):
    """Pass 1, one program per (chunk, row): the chunk's tokens per bucket into COUNTS (rows,
    chunks, NB); zeros for chunks past a shorter row's end."""
    pid_c, pid_r = tl.program_id(0), tl.program_id(1)
    is_q, b, h, heads = _row(pid_r, q_rows, H, Hkv)
    if is_q:
        _, _, _, hit = _chunk_hits(QB, stride_qbb, stride_qbs, stride_qbh, b, h, Sq, pid_c * BLOCK, num_buckets,
                                   NB=NB, BLOCK=BLOCK, DROP=DROP)
    else:
        _, _, _, hit = _chunk_hits(KB, stride_kbb, stride_kbs, stride_kbh, b, h, Sk, pid_c * BLOCK, num_buckets,
                                   NB=NB, BLOCK=BLOCK, DROP=DROP)
    dst = COUNTS + (pid_r.to(tl.int64) * tl.num_programs(0) + pid_c) * NB + tl.arange(0, NB)
    tl.store(dst, tl.sum(hit, axis=0))


@triton.jit
def _place_chunk(
    BKT, stride_bb, stride_bs, stride_bh, POS, DOC, ORDER, INV, CPOS, CDOC, COUNTS,
    pid_c, pid_r, n_chunks, b, h, heads, S, num_buckets, num_docs, drop_value,
    NB: tl.constexpr, BLOCK: tl.constexpr, CB: tl.constexpr, DOCS: tl.constexpr, DROP: tl.constexpr,
):
    # Where this chunk's tokens of each bucket start: the row's tokens of lower buckets, plus
    # those of the same bucket in earlier chunks.
    total = tl.zeros([NB], dtype=tl.int32)
    earlier = tl.zeros([NB], dtype=tl.int32)
    row_counts = COUNTS + pid_r.to(tl.int64) * n_chunks * NB
    for c0 in range(0, n_chunks, CB):
        c = c0 + tl.arange(0, CB)
        n = tl.load(row_counts + c[:, None] * NB + tl.arange(0, NB)[None, :], mask=(c < n_chunks)[:, None], other=0)
        total += tl.sum(n, axis=0)
        earlier += tl.sum(tl.where((c < pid_c)[:, None], n, 0), axis=0)
    first = tl.cumsum(total, axis=0) - total + earlier
    offs, ok, bk, hit = _chunk_hits(BKT, stride_bb, stride_bs, stride_bh, b, h, S, pid_c * BLOCK, num_buckets,
                                    NB=NB, BLOCK=BLOCK, DROP=DROP)
    seen = tl.cumsum(hit, axis=0)  # per bucket, the chunk's tokens up to and including each
    place = tl.sum(hit * (seen - 1 + first[None, :]), axis=1)
    pos = tl.load(POS + offs, mask=ok, other=0).to(tl.int64)
    if DOCS:
        doc = tl.load(DOC + offs, mask=ok, other=0).to(tl.int64)
    else:
        doc = tl.zeros([BLOCK], dtype=tl.int64)
    if DROP:  # the ids are keep flags: bucket 0 = kept, 1 = dropped
        cdoc = tl.where(bk == 0, doc, drop_value)
    else:
        cdoc = bk.to(tl.int64) * num_docs + doc
    out_row = (b * heads + h) * S  # ORDER, INV, CPOS, CDOC: (B, heads, S), contiguous
    dst = out_row + place.to(tl.int64)
    tl.store(ORDER + dst, offs.to(tl.int64), mask=ok)
    tl.store(CPOS + dst, (cdoc << 31) | pos, mask=ok)
    tl.store(CDOC + dst, cdoc.to(tl.int32), mask=ok)
    tl.store(INV + out_row + offs, place.to(tl.int64), mask=ok)


@triton.jit
def _place_kernel(
    QB, stride_qbb, stride_qbs, stride_qbh,
    KB, stride_kbb, stride_kbs, stride_kbh,
    Q_POS, K_POS, Q_DOC, K_DOC,
    Q_ORDER, Q_INV, Q_CPOS, Q_CDOC,
    K_ORDER, K_INV, K_CPOS, K_CDOC,
    COUNTS, q_rows, H, Hkv, Sq, Sk, num_buckets, num_docs, q_drop, k_drop,
    NB: tl.constexpr, BLOCK: tl.constexpr, CB: tl.constexpr, DOCS: tl.constexpr, DROP: tl.constexpr,
):
    """Pass 2, one program per (chunk, row): each token's place in its row's sorted order."""
    pid_c, pid_r = tl.program_id(0), tl.program_id(1)
    n_chunks = tl.num_programs(0)
    is_q, b, h, heads = _row(pid_r, q_rows, H, Hkv)
    if is_q:
        if pid_c * BLOCK < Sq:
            _place_chunk(QB, stride_qbb, stride_qbs, stride_qbh, Q_POS, Q_DOC, Q_ORDER, Q_INV, Q_CPOS, Q_CDOC,
                         COUNTS, pid_c, pid_r, n_chunks, b, h, heads, Sq, num_buckets, num_docs, q_drop,
                         NB=NB, BLOCK=BLOCK, CB=CB, DOCS=DOCS, DROP=DROP)
    else:
        if pid_c * BLOCK < Sk:
            _place_chunk(KB, stride_kbb, stride_kbs, stride_kbh, K_POS, K_DOC, K_ORDER, K_INV, K_CPOS, K_CDOC,
                         COUNTS, pid_c, pid_r, n_chunks, b, h, heads, Sk, num_buckets, num_docs, k_drop,
                         NB=NB, BLOCK=BLOCK, CB=CB, DOCS=DOCS, DROP=DROP)


def sort_tokens(q_buckets: torch.Tensor, k_buckets: torch.Tensor, num_buckets: int, q_pos: torch.Tensor,
                k_pos: torch.Tensor, q_doc, k_doc, num_docs: int, drop: tuple | None = None):
    """Every head's tokens sorted by bucket, stably, for queries and keys in two launches.

    Args:
        q_buckets, k_buckets: (B, Sq, H) / (B, Sk, Hkv) integer (or boolean) bucket ids in
            ``[0, num_buckets)``, any strides.
        q_pos, k_pos: (Sq,) / (Sk,) global positions, increasing; ``q_doc``, ``k_doc``: (Sq,) /
            (Sk,) document ids, non-decreasing, or None.
        drop: None for hash buckets (composite document ``bucket * num_docs + document``). For
            QK-dropping, ``(q_drop, k_drop)``: the composite documents of dropped queries and
            keys; the ids are then keep flags (``num_buckets`` 2), kept tokens first, with their
            document.

    Returns ``(q_order, q_inverse, q_cpos, q_cdoc, k_order, k_inverse, k_cpos, k_cdoc)``: int64
    permutations (B, heads, S) from sorted place to token (the inverses the other way), the
    composite positions (int64) and documents (int32) in sorted order.
    """
    B, Sq, H = q_buckets.shape
    Sk, Hkv = k_buckets.shape[1], k_buckets.shape[2]
    dev = q_buckets.device
    if not 1 <= num_buckets <= MAX_BUCKETS:
        raise ValueError(f"sort_tokens takes 1 to {MAX_BUCKETS} buckets; got {num_buckets}")
    if q_buckets.dtype == torch.bool:  # Triton takes no pointer to bool
        q_buckets, k_buckets = q_buckets.view(torch.uint8), k_buckets.view(torch.uint8)
    q_order, q_inv, q_cpos = (torch.empty((B, H, Sq), dtype=torch.int64, device=dev) for _ in range(3))
    q_cdoc = torch.empty((B, H, Sq), dtype=torch.int32, device=dev)
    k_order, k_inv, k_cpos = (torch.empty((B, Hkv, Sk), dtype=torch.int64, device=dev) for _ in range(3))
    k_cdoc = torch.empty((B, Hkv, Sk), dtype=torch.int32, device=dev)
    docs = q_doc is not None
    nb = triton.next_power_of_2(max(num_buckets, 2))
    block = _chunk(num_buckets) if not INTERPRETED else 16  # small chunks: tests cross chunk edges
    grid = (triton.cdiv(max(Sq, Sk, 1), block), B * (H + Hkv))
    counts = torch.empty((grid[1], grid[0], nb), dtype=torch.int32, device=dev)
    buckets = (q_buckets, *q_buckets.stride(), k_buckets, *k_buckets.stride())
    _count_kernel[grid](*buckets, counts, B * H, H, Hkv, Sq, Sk, num_buckets,
                        NB=nb, BLOCK=block, DROP=drop is not None, num_warps=NUM_WARPS, **FP_FUSION)
    q_drop, k_drop = drop if drop is not None else (0, 0)
    chunks_at_once = max(1, 4096 // nb) if not INTERPRETED else 2  # of the counts summed per step
    _place_kernel[grid](
        *buckets, q_pos, k_pos, q_doc if docs else q_pos, k_doc if docs else k_pos,
        q_order, q_inv, q_cpos, q_cdoc, k_order, k_inv, k_cpos, k_cdoc,
        counts, B * H, H, Hkv, Sq, Sk, num_buckets, num_docs, q_drop, k_drop,
        NB=nb, BLOCK=block, CB=chunks_at_once, DOCS=docs, DROP=drop is not None, num_warps=NUM_WARPS,
        **FP_FUSION,
    )
    return q_order, q_inv, q_cpos, q_cdoc, k_order, k_inv, k_cpos, k_cdoc


@triton.jit
def _move_group(X0, X1, Y0, Y1, IDX, s0b, s0s, s0h, s0d, s1b, s1s, s1h, s1d, bh, S, H, D, pid_s,
                BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, TWO: tl.constexpr):
    """Rows ``pid_s`` of (batch x head) row ``bh`` of one group: Y[b, s, h, :] = X[b, IDX[b, h, s], h, :]
    for one or two tensors (Y contiguous). Returns the rows' sources and which rows exist."""
    b, h = bh // H, bh % H
    rows = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    ok = rows < S
    src = tl.load(IDX + bh * S + rows, mask=ok, other=0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    m = ok[:, None] & (cols[None, :] < D)
    dst = ((b * S + rows.to(tl.int64)) * H + h)[:, None] * D + cols[None, :]
    x = tl.load(X0 + b * s0b + h * s0h + src[:, None] * s0s + cols[None, :] * s0d, mask=m)
    tl.store(Y0 + dst, x, mask=m)
    if TWO:
        x = tl.load(X1 + b * s1b + h * s1h + src[:, None] * s1s + cols[None, :] * s1d, mask=m)
        tl.store(Y1 + dst, x, mask=m)
    return src, ok, rows


@triton.jit
def _permute_kernel(
    XA0, XA1, YA0, YA1, IDXA, XB0, XB1, YB0, YB1, IDXB, L, LY,
    sa0b, sa0s, sa0h, sa0d, sa1b, sa1s, sa1h, sa1d,
    sb0b, sb0s, sb0h, sb0d, sb1b, sb1s, sb1h, sb1d,
    stride_lb, stride_lh, stride_ls,
    rows_a, SA, HA, SB, HB, D,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, NA: tl.constexpr, NB: tl.constexpr, LSE: tl.constexpr,
):
    """Two groups of moves in one launch: program rows ``[0, rows_a)`` move group A (``NA``
    tensors by IDXA, (B, HA, SA)), the rest group B (``NB`` tensors, 0 for none, by IDXB); with
    ``LSE``, L (B, HA, SA) moves by IDXA into LY (contiguous)."""
    pid_s = tl.program_id(0)
    pid_r = tl.program_id(1).to(tl.int64)
    if pid_r < rows_a:
        src, ok, rows = _move_group(XA0, XA1, YA0, YA1, IDXA, sa0b, sa0s, sa0h, sa0d, sa1b, sa1s, sa1h, sa1d,
                                    pid_r, SA, HA, D, pid_s, BLOCK_S, BLOCK_D, NA == 2)
        if LSE:
            b, h = pid_r // HA, pid_r % HA
            lse = tl.load(L + b * stride_lb + h * stride_lh + src * stride_ls, mask=ok)
            tl.store(LY + pid_r * SA + rows, lse, mask=ok)
    elif NB > 0:
        _move_group(XB0, XB1, YB0, YB1, IDXB, sb0b, sb0s, sb0h, sb0d, sb1b, sb1s, sb1h, sb1d,
                    pid_r - rows_a, SB, HB, D, pid_s, BLOCK_S, BLOCK_D, NB == 2)


def permute_tokens(groups, lse: torch.Tensor | None = None):
    """Every head's tokens moved into a new order, one launch for everything given.

    ``groups``: one or two ``(xs, index)`` pairs: ``xs`` one or two (B, S, H, D) tensors of one
    shape (any strides), ``index`` (B, H, S); ``y[b, s, h] = x[b, index[b, h, s], h]``, as new
    contiguous tensors. Every tensor shares B, D and the dtype (the groups may differ in S and
    H: queries, and keys with values). With ``lse`` (B, H, S of the first group), also ``lse``
    moved by the first group's index. Returns the moved tensors in the order given, then the
    LSE's."""
    assert 1 <= len(groups) <= 2 and all(1 <= len(xs) <= 2 for xs, _ in groups)
    x0 = groups[0][0][0]
    B, D, dtype = x0.shape[0], x0.shape[3], x0.dtype
    slots, outs = [], []
    for xs, index in groups:
        _, S, H, _ = xs[0].shape
        assert all(x.shape == (B, S, H, D) and x.dtype == dtype for x in xs) and index.shape == (B, H, S)
        ys = [torch.empty((B, S, H, D), dtype=dtype, device=x0.device) for _ in xs]
        outs += ys
        pair = (xs[0], xs[-1], ys[0], ys[-1], index.contiguous())
        strides = (*xs[0].stride(), *(xs[1].stride() if len(xs) == 2 else (0,) * 4))
        slots.append((pair, strides, S, H, len(xs)))
    (pa, sa, SA, HA, NA) = slots[0]
    (pb, sb, SB, HB, NB) = slots[1] if len(slots) == 2 else ((pa[4],) * 5, (0,) * 8, 0, 0, 0)
    ly = torch.empty((B, HA, SA), dtype=lse.dtype, device=lse.device) if lse is not None else pa[4]
    block_d = triton.next_power_of_2(D)
    block_s = max(1, min(64, 4096 // block_d))
    grid = (triton.cdiv(max(SA, SB), block_s), B * (HA + HB))
    _permute_kernel[grid](
        *pa, *pb, lse if lse is not None else pa[4], ly,
        *sa, *sb, *(lse.stride() if lse is not None else (0, 0, 0)),
        B * HA, SA, HA, SB, HB, D,
        BLOCK_S=block_s, BLOCK_D=block_d, NA=NA, NB=NB, LSE=lse is not None, num_warps=NUM_WARPS,
        **FP_FUSION,
    )
    return (*outs, ly) if lse is not None else tuple(outs)
