"""Reorder every head's tokens for QK-dropping and hash buckets: one launch to sort, one per move.

QK-dropping and hashing (:mod:`ringflash.sparse`) run the kernels on tokens reordered per head
so that tokens that may see each other sit together. The order is by *bucket* (the hash
bucket; kept before dropped for QK-dropping), and inside a bucket by the tokens' order in the
call, along which global positions and document ids already increase in every layout. So a
stable counting sort over the bucket ids gives it: no comparison sort is needed.

``sort_tokens`` does that for the queries and the keys of a call in one launch, one program per
(batch row, head) of either: a first pass over the row counts each bucket, a second gives each
token its place (the tokens of lower buckets, plus those of its bucket earlier in the row) and
writes the permutation, its inverse and, in sorted order, the composite document (what the
kernels compare as document ids: ``bucket * num_docs + document`` for hashing; the document,
or a drop value after every kept one, for QK-dropping) and the composite position
(``composite document << 31 | position``). One launch instead of two PyTorch sorts and about
fifteen element-wise operations: the sorts alone took 170 us of host time each on an H100
machine (cub's segmented sort is several launches).

``permute_tokens`` moves rows of (B, S, H, D) tensors by such a permutation (K and V in one
launch; the output with its LSE). Its gradient is the same move by the inverse permutation:
plain reads and writes, where ``torch.gather``'s gradient zero-fills and adds with atomics.

Bucket ids outside ``[0, num_buckets)`` are the caller's error (:class:`~ringflash.sparse.HashSparse`
checks them unless told not to); here they are clamped into range so that the permutation stays
one.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["sort_tokens", "permute_tokens", "MAX_BUCKETS"]

MAX_BUCKETS = 256  # more buckets: the one-hot count of a chunk grows too wide; callers sort with PyTorch
_CHUNK = 4096  # tokens x buckets counted at once
NUM_WARPS = 4


@triton.jit
def _bucket(ids, num_buckets, DROP: tl.constexpr):
    """Bucket ids clamped into range; keep flags (``DROP``) to bucket 0 (kept) or 1 (dropped)."""
    if DROP:
        return (ids == 0).to(tl.int32)
    return tl.minimum(tl.maximum(ids, 0), num_buckets - 1)


@triton.jit
def _sort_row(
    BKT, stride_bb, stride_bs, stride_bh,
    POS, DOC, ORDER, INV, CPOS, CDOC,
    b, h, heads, S, num_buckets, num_docs, drop_value,
    NB: tl.constexpr, BLOCK: tl.constexpr, DOCS: tl.constexpr, DROP: tl.constexpr,
):
    """One (batch row, head): a stable counting sort of its S tokens by bucket id."""
    bkt_row = BKT + b * stride_bb + h * stride_bh
    out_row = (b * heads + h) * S  # ORDER, INV, CPOS, CDOC: (B, heads, S), contiguous
    ids = tl.arange(0, NB)
    # Pass 1: tokens per bucket, then each bucket's first place (an exclusive prefix sum).
    counts = tl.zeros([NB], dtype=tl.int32)
    for start in range(0, S, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        ok = offs < S
        bk = tl.load(bkt_row + offs.to(tl.int64) * stride_bs, mask=ok, other=0).to(tl.int32)
        bk = _bucket(bk, num_buckets, DROP)
        hit = (bk[:, None] == ids[None, :]) & ok[:, None]
        counts += tl.sum(hit.to(tl.int32), axis=0)
    first = tl.cumsum(counts, axis=0) - counts
    # Pass 2: a token's place is its bucket's next free one, taken in token order.
    for start in range(0, S, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        ok = offs < S
        bk = tl.load(bkt_row + offs.to(tl.int64) * stride_bs, mask=ok, other=0).to(tl.int32)
        bk = _bucket(bk, num_buckets, DROP)
        hit = ((bk[:, None] == ids[None, :]) & ok[:, None]).to(tl.int32)
        seen = tl.cumsum(hit, axis=0)  # per bucket, this chunk's tokens up to and including each
        place = tl.sum(hit * (seen - 1 + first[None, :]), axis=1)
        first += tl.sum(hit, axis=0)
        pos = tl.load(POS + offs, mask=ok, other=0).to(tl.int64)
        if DOCS:
            doc = tl.load(DOC + offs, mask=ok, other=0).to(tl.int64)
        else:
            doc = tl.zeros([BLOCK], dtype=tl.int64)
        if DROP:  # the ids are keep flags: bucket 0 = kept, 1 = dropped
            cdoc = tl.where(bk == 0, doc, drop_value)
        else:
            cdoc = bk.to(tl.int64) * num_docs + doc
        dst = out_row + place.to(tl.int64)
        tl.store(ORDER + dst, offs.to(tl.int64), mask=ok)
        tl.store(CPOS + dst, (cdoc << 31) | pos, mask=ok)
        tl.store(CDOC + dst, cdoc.to(tl.int32), mask=ok)
        tl.store(INV + out_row + offs, place.to(tl.int64), mask=ok)


@triton.jit
def _sort_tokens_kernel(
    QB, stride_qbb, stride_qbs, stride_qbh,
    KB, stride_kbb, stride_kbs, stride_kbh,
    Q_POS, K_POS, Q_DOC, K_DOC,
    Q_ORDER, Q_INV, Q_CPOS, Q_CDOC,
    K_ORDER, K_INV, K_CPOS, K_CDOC,
    q_rows, H, Hkv, Sq, Sk, num_buckets, num_docs, q_drop, k_drop,
    NB: tl.constexpr, BLOCK: tl.constexpr, DOCS: tl.constexpr, DROP: tl.constexpr,
):
    pid = tl.program_id(0)
    if pid < q_rows:  # the first B * H programs take the queries, the others the keys
        _sort_row(QB, stride_qbb, stride_qbs, stride_qbh, Q_POS, Q_DOC, Q_ORDER, Q_INV, Q_CPOS, Q_CDOC,
                  (pid // H).to(tl.int64), (pid % H).to(tl.int64), H, Sq, num_buckets, num_docs, q_drop,
                  NB=NB, BLOCK=BLOCK, DOCS=DOCS, DROP=DROP)
    else:
        r = pid - q_rows
        _sort_row(KB, stride_kbb, stride_kbs, stride_kbh, K_POS, K_DOC, K_ORDER, K_INV, K_CPOS, K_CDOC,
                  (r // Hkv).to(tl.int64), (r % Hkv).to(tl.int64), Hkv, Sk, num_buckets, num_docs, k_drop,
                  NB=NB, BLOCK=BLOCK, DOCS=DOCS, DROP=DROP)


def sort_tokens(q_buckets: torch.Tensor, k_buckets: torch.Tensor, num_buckets: int, q_pos: torch.Tensor,
                k_pos: torch.Tensor, q_doc, k_doc, num_docs: int, drop: tuple | None = None):
    """Every head's tokens sorted by bucket, stably, for queries and keys in one launch.

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
    block = max(16, min(1024, _CHUNK // nb))
    q_drop, k_drop = drop if drop is not None else (0, 0)
    _sort_tokens_kernel[(B * (H + Hkv),)](
        q_buckets, *q_buckets.stride(), k_buckets, *k_buckets.stride(),
        q_pos, k_pos, q_doc if docs else q_pos, k_doc if docs else k_pos,
        q_order, q_inv, q_cpos, q_cdoc, k_order, k_inv, k_cpos, k_cdoc,
        B * H, H, Hkv, Sq, Sk, num_buckets, num_docs, q_drop, k_drop,
        NB=nb, BLOCK=block, DOCS=docs, DROP=drop is not None, num_warps=NUM_WARPS,
    )
    return q_order, q_inv, q_cpos, q_cdoc, k_order, k_inv, k_cpos, k_cdoc


@triton.jit
def _permute_kernel(
    X0, X1, Y0, Y1, IDX, L, LY,
    stride_x0b, stride_x0s, stride_x0h, stride_x0d,
    stride_x1b, stride_x1s, stride_x1h, stride_x1d,
    stride_lb, stride_lh, stride_ls,
    S, H, D,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, TWO: tl.constexpr, LSE: tl.constexpr,
):
    """Y[b, s, h, :] = X[b, IDX[b, h, s], h, :] for one or two tensors (Y contiguous), and with
    ``LSE`` the same permutation of L (B, H, S) into LY (B, H, S, contiguous)."""
    pid_s = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b, h = pid_bh // H, pid_bh % H
    rows = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    ok = rows < S
    src = tl.load(IDX + pid_bh * S + rows, mask=ok, other=0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    m = ok[:, None] & (cols[None, :] < D)
    dst = ((b * S + rows.to(tl.int64)) * H + h)[:, None] * D + cols[None, :]
    x = tl.load(X0 + b * stride_x0b + h * stride_x0h + src[:, None] * stride_x0s + cols[None, :] * stride_x0d, mask=m)
    tl.store(Y0 + dst, x, mask=m)
    if TWO:
        x = tl.load(X1 + b * stride_x1b + h * stride_x1h + src[:, None] * stride_x1s + cols[None, :] * stride_x1d,
                    mask=m)
        tl.store(Y1 + dst, x, mask=m)
    if LSE:
        lse = tl.load(L + b * stride_lb + h * stride_lh + src * stride_ls, mask=ok)
        tl.store(LY + pid_bh * S + rows, lse, mask=ok)


def permute_tokens(xs, index: torch.Tensor, lse: torch.Tensor | None = None):
    """Every head's tokens of ``xs`` (one or two (B, S, H, D) tensors of one shape and dtype, any
    strides) in the order ``index`` (B, H, S): ``y[b, s, h] = x[b, index[b, h, s], h]``, as new
    contiguous tensors; with ``lse`` (B, H, S), also ``lse`` so permuted (appended)."""
    x0 = xs[0]
    B, S, H, D = x0.shape
    assert len(xs) in (1, 2) and all(x.shape == x0.shape and x.dtype == x0.dtype for x in xs)
    assert index.shape == (B, H, S)
    index = index.contiguous()
    ys = [torch.empty((B, S, H, D), dtype=x0.dtype, device=x0.device) for _ in xs]
    x1, y1 = (xs[1], ys[1]) if len(xs) == 2 else (x0, ys[0])
    ly = torch.empty((B, H, S), dtype=lse.dtype, device=lse.device) if lse is not None else index
    block_d = triton.next_power_of_2(D)
    block_s = max(1, min(64, 4096 // block_d))
    _permute_kernel[(triton.cdiv(S, block_s), B * H)](
        x0, x1, ys[0], y1, index, lse if lse is not None else index, ly,
        *x0.stride(), *x1.stride(), *(lse.stride() if lse is not None else (0, 0, 0)),
        S, H, D, BLOCK_S=block_s, BLOCK_D=block_d, TWO=len(xs) == 2, LSE=lse is not None,
        num_warps=NUM_WARPS,
    )
    return (*ys, ly) if lse is not None else tuple(ys)
