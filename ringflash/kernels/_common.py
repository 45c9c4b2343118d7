"""Triton helpers shared by the forward and backward kernels.

Masks come from global token positions, and on every call the positions of one side are
strictly increasing (every layout guarantees it). So the keys a query row can see form a
*prefix* of the key block, and the queries that can see a key form a *suffix* of the query
block. A tile is then classified from its first and last positions alone:

* fully masked   ``max q_pos <  min k_pos``: skipped, never loaded;
* fully visible  ``min q_pos >= max k_pos``: runs without mask arithmetic;
* boundary       everything else: pays for the position compare.

The counts below give the tile ranges of each class with one vectorised load of the tile
boundary positions (a few chunks for very long blocks), instead of a scan over every tile
or a serial binary search with one dependent load per step.
"""

from __future__ import annotations

import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)  # log2(e): scores are scaled once so the kernels use exp2
LN2 = tl.constexpr(0.6931471805599453)  # ln(2): back to a natural-log LSE at the end

CHUNK = tl.constexpr(512)  # tile-boundary positions read per vector load


# Launch option of every kernel here: multiplies and adds fused into FMAs, as the kernels were
# written, tested and timed with. Triton 3.9 warns that its default (fused) becomes unfused in
# 3.10; asked for explicitly, the kernels compile the same on either side of that change.
FP_FUSION = {"enable_fp_fusion": True}


@triton.jit
def _count_tiles(
    POS,
    n,
    num_tiles,
    x,
    TILE: tl.constexpr,
    LAST: tl.constexpr,
    STRICT: tl.constexpr,
):
    """Number of tiles ``t < num_tiles`` whose first (or last, with LAST) position is below ``x``.

    Tile ``t`` covers indices ``[t*TILE, min((t+1)*TILE, n))`` of the increasing ``POS``;
    "below" is ``< x`` with STRICT, else ``<= x``. Because positions increase, the tiles that
    pass form a prefix and the count is the index of the first tile that fails.
    """
    count = num_tiles * 0
    for c in range(0, num_tiles, CHUNK):
        t = c + tl.arange(0, CHUNK)
        if LAST:
            idx = tl.minimum(t * TILE + (TILE - 1), n - 1)
        else:
            idx = t * TILE
        p = tl.load(POS + idx, mask=t < num_tiles, other=0)
        if STRICT:
            ok = p < x
        else:
            ok = p <= x
        count += tl.sum((ok & (t < num_tiles)).to(tl.int32), axis=0)
    return count


@triton.jit
def _lpt_item(it, num_t, rows, SWIZZLE, HEAVY_FIRST: tl.constexpr):
    """(tile, row) of work item ``it`` of a causal grid of ``num_t`` tiles per row (a batch x
    head): the longest-processing-time-first order in sections of ``SWIZZLE`` rows. Causal tiles
    differ in length (a query tile's keys grow with its index, a key tile's queries shrink), and
    the rows run one after another in launch order, so with each row's tiles heaviest first the
    last row's long tiles still start near the end of the grid and leave SMs idle while they
    finish. Within a section every row's heaviest tile comes first, then every row's next one;
    a section has as many rows as have their K/V (or Q/dO) in L2 together, so the programs
    running at once still share them (the host picks ``SWIZZLE``; the last section may be short).
    ``HEAVY_FIRST``: tile 0 is the heaviest (key tiles), else the last one (query tiles)."""
    first = it // (SWIZZLE * num_t) * SWIZZLE
    n = tl.minimum(SWIZZLE, rows - first)
    r = it - first * num_t
    rank = r // n
    if not HEAVY_FIRST:
        rank = num_t - 1 - rank
    return rank, first + r % n


@triton.jit
def _rows_ptr(base, start, offs, stride, WIDE: tl.constexpr):
    """``base + (start + offs)[:, None] * stride``: pointers to a tile's rows.

    With ``WIDE`` (a tensor spans 2**31 elements or more, e.g. seqlen * heads * head_dim past
    it) the tile's first row is taken in 64 bits and only the rows within the tile in 32.
    Otherwise all 32-bit: the 64-bit form cost the forward 7-10% on H100.
    """
    if WIDE:
        return base + tl.cast(start, tl.int64) * stride + offs[:, None] * stride
    else:
        return base + (start + offs)[:, None] * stride


@triton.jit
def _load_tile(ptrs, rows, ROW_MASK: tl.constexpr, n_rows, cols, COL_MASK: tl.constexpr, n_cols):
    """Load a 2-D tile, masking rows (axis 0) and/or columns (axis 1) only where asked."""
    if ROW_MASK:
        if COL_MASK:
            x = tl.load(ptrs, mask=(rows[:, None] < n_rows) & (cols[None, :] < n_cols), other=0.0)
        else:
            x = tl.load(ptrs, mask=rows[:, None] < n_rows, other=0.0)
    else:
        if COL_MASK:
            x = tl.load(ptrs, mask=cols[None, :] < n_cols, other=0.0)
        else:
            x = tl.load(ptrs)
    return x


@triton.jit
def _merge_states(o_old, lse_old, o_new, lse_new):
    """Online-softmax merge of two partial results (float32): the merged (O, LSE).

    Rows empty on both sides (LSE = -inf) stay O = 0 and LSE = -inf, with weights
    exp(-inf - 0) = 0 instead of NaN.
    """
    mx = tl.maximum(lse_old, lse_new)
    mx = tl.where(mx == float("-inf"), 0.0, mx)
    lse = mx + tl.log(tl.exp(lse_old - mx) + tl.exp(lse_new - mx))
    ref = tl.where(lse == float("-inf"), 0.0, lse)
    w_old = tl.exp(lse_old - ref)
    w_new = tl.exp(lse_new - ref)
    return o_old * w_old[:, None] + o_new * w_new[:, None], lse


# -- masks beyond causal: sliding windows and packed documents ----------------------------------
#
# Positions increase and document ids never decrease along every layout's local order, so each
# rule keeps the tiles that can see each other to one contiguous range per tile, and the tiles
# fully inside every rule to a sub-range of it. Each bound below is a count of tiles whose first
# or last attribute passes a monotone test (_count_tiles). ``WINDOW`` is a bit set: 1 the left
# side is bounded, 2 the right side; an unbounded side costs nothing. The ranges depend on the
# tiles' positions only, not on batch or head, so :func:`_ranges_kernel` computes them once per
# call for every tile, and the attention programs read four integers.


@triton.jit
def _clip_ranges(lo, flo, fhi, hi):
    """[lo, flo) boundary, [flo, fhi) fully visible, [fhi, hi) boundary: every tile of [lo, hi)
    in exactly one of them, whatever the rules' bounds were."""
    flo = tl.minimum(tl.maximum(flo, lo), hi)
    fhi = tl.minimum(tl.maximum(fhi, flo), hi)
    return flo, fhi


@triton.jit
def _key_ranges(
    QPOS, QDOC, KPOS, KDOC, start_m, Sq, Sk, wl, wr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, WINDOW: tl.constexpr, DOCS: tl.constexpr,
):
    """Key ranges (in keys, multiples of BLOCK_N) for the query tile at ``start_m``:
    ``[lo, flo)`` and ``[fhi, hi)`` boundary tiles, ``[flo, fhi)`` fully visible tiles."""
    num_n = tl.cdiv(Sk, BLOCK_N)
    num_n_even = Sk // BLOCK_N
    last_m = tl.minimum(start_m + BLOCK_M, Sq) - 1
    lo = num_n * 0
    hi = num_n
    flo = lo
    fhi = num_n_even
    if CAUSAL or WINDOW:
        q_first = tl.load(QPOS + start_m).to(tl.int64)
        q_last = tl.load(QPOS + last_m).to(tl.int64)
        if CAUSAL:
            hi = tl.minimum(hi, _count_tiles(KPOS, Sk, num_n, q_last, BLOCK_N, False, False))
            fhi = tl.minimum(fhi, _count_tiles(KPOS, Sk, num_n_even, q_first, BLOCK_N, True, False))
        # visible: q - wl <= k <= q + wr
        if WINDOW % 2 == 1:
            lo = tl.maximum(lo, _count_tiles(KPOS, Sk, num_n, q_first - wl, BLOCK_N, True, True))
            flo = tl.maximum(flo, _count_tiles(KPOS, Sk, num_n, q_last - wl, BLOCK_N, False, True))
        if WINDOW >= 2:
            hi = tl.minimum(hi, _count_tiles(KPOS, Sk, num_n, q_last + wr, BLOCK_N, False, False))
            fhi = tl.minimum(fhi, _count_tiles(KPOS, Sk, num_n_even, q_first + wr, BLOCK_N, True, False))
    if DOCS:
        d_first = tl.load(QDOC + start_m)
        d_last = tl.load(QDOC + last_m)
        lo = tl.maximum(lo, _count_tiles(KDOC, Sk, num_n, d_first, BLOCK_N, True, True))
        hi = tl.minimum(hi, _count_tiles(KDOC, Sk, num_n, d_last, BLOCK_N, False, False))
        # Fully visible only for a query tile inside one document, over key tiles inside it.
        one_doc = d_first == d_last
        flo = tl.maximum(flo, tl.where(one_doc, _count_tiles(KDOC, Sk, num_n, d_first, BLOCK_N, False, True), num_n))
        fhi = tl.minimum(fhi, _count_tiles(KDOC, Sk, num_n_even, d_last, BLOCK_N, True, False))
    flo, fhi = _clip_ranges(lo, flo, fhi, hi)
    return lo * BLOCK_N, flo * BLOCK_N, fhi * BLOCK_N, hi * BLOCK_N


@triton.jit
def _query_ranges(
    QPOS, QDOC, KPOS, KDOC, start_n, Sq, Sk, wl, wr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, WINDOW: tl.constexpr, DOCS: tl.constexpr,
):
    """Query ranges (in queries, multiples of BLOCK_M) for the key tile at ``start_n``:
    ``[lo, flo)`` and ``[fhi, hi)`` boundary tiles, ``[flo, fhi)`` fully visible tiles."""
    num_m = tl.cdiv(Sq, BLOCK_M)
    num_m_even = Sq // BLOCK_M
    last_n = tl.minimum(start_n + BLOCK_N, Sk) - 1
    lo = num_m * 0
    hi = num_m
    flo = lo
    fhi = num_m_even
    if CAUSAL or WINDOW:
        k_first = tl.load(KPOS + start_n).to(tl.int64)
        k_last = tl.load(KPOS + last_n).to(tl.int64)
        if CAUSAL:
            lo = tl.maximum(lo, _count_tiles(QPOS, Sq, num_m, k_first, BLOCK_M, True, True))
            flo = tl.maximum(flo, _count_tiles(QPOS, Sq, num_m, k_last, BLOCK_M, False, True))
        # visible: k - wr <= q <= k + wl
        if WINDOW >= 2:
            lo = tl.maximum(lo, _count_tiles(QPOS, Sq, num_m, k_first - wr, BLOCK_M, True, True))
            flo = tl.maximum(flo, _count_tiles(QPOS, Sq, num_m, k_last - wr, BLOCK_M, False, True))
        if WINDOW % 2 == 1:
            hi = tl.minimum(hi, _count_tiles(QPOS, Sq, num_m, k_last + wl, BLOCK_M, False, False))
            fhi = tl.minimum(fhi, _count_tiles(QPOS, Sq, num_m_even, k_first + wl, BLOCK_M, True, False))
    if DOCS:
        d_first = tl.load(KDOC + start_n)
        d_last = tl.load(KDOC + last_n)
        lo = tl.maximum(lo, _count_tiles(QDOC, Sq, num_m, d_first, BLOCK_M, True, True))
        hi = tl.minimum(hi, _count_tiles(QDOC, Sq, num_m, d_last, BLOCK_M, False, False))
        one_doc = d_first == d_last
        flo = tl.maximum(flo, tl.where(one_doc, _count_tiles(QDOC, Sq, num_m, d_first, BLOCK_M, False, True), num_m))
        fhi = tl.minimum(fhi, _count_tiles(QDOC, Sq, num_m_even, d_last, BLOCK_M, True, False))
    flo, fhi = _clip_ranges(lo, flo, fhi, hi)
    # A key tile that runs past Sk has padded keys (zero-filled rows of K and V): none of its query
    # tiles counts as fully visible, so that every one masks them. Their P would otherwise be
    # exp2(-LSE2), and where a kernel adds dQ = dS K from these programs (the Hopper backward),
    # an overflow of it to inf would add inf * 0 into dQ.
    fhi = tl.where(start_n + BLOCK_N > Sk, flo, fhi)
    return lo * BLOCK_M, flo * BLOCK_M, fhi * BLOCK_M, hi * BLOCK_M


@triton.jit
def _rule(qp, kp, qd, kd, wl, wr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr, DOCS: tl.constexpr,
          PAT, nb, bs, SPARSE: tl.constexpr):
    """The visibility rule of a boundary tile; ``qp``/``qd`` and ``kp``/``kd`` already broadcast
    against each other (rows and columns, either orientation). With SPARSE the block pattern
    ``PAT`` (nb x nb uint8, blocks of ``bs`` positions) is read for every pair."""
    if DOCS:
        ok = qd == kd
    else:
        ok = qp == qp
    if CAUSAL:
        ok = ok & (qp >= kp)
    if WINDOW % 2 == 1:
        ok = ok & (kp >= qp - wl)
    if WINDOW >= 2:
        ok = ok & (kp <= qp + wr)
    if SPARSE:
        ok = ok & (tl.load(PAT + (qp // bs) * nb + kp // bs) != 0)
    return ok


@triton.jit
def _head_attrs(QPOS, QDOC, KPOS, KDOC, bh, stride_ab, stride_ah, stride_kab, stride_kah, H, G):
    """The attribute pointers of (batch, query head) ``bh`` and of its K/V head ``h // G``; shared
    attributes have zero strides."""
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    hk = h // G
    return (QPOS + b * stride_ab + h * stride_ah, QDOC + b * stride_ab + h * stride_ah,
            KPOS + b * stride_kab + hk * stride_kah, KDOC + b * stride_kab + hk * stride_kah)


@triton.jit
def _ranges_kernel(
    QPOS, QDOC, KPOS, KDOC, RANGES, Sq, Sk, wl, wr,
    stride_ab, stride_ah, stride_kab, stride_kah, H, G,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, WINDOW: tl.constexpr, DOCS: tl.constexpr, BY_KEYS: tl.constexpr,
):
    """RANGES[bh, t] = (lo, flo, fhi, hi) of query tile t (of key tile t with BY_KEYS), int32.

    Per-head attributes (:mod:`ringflash.sparse`): program (t, b * H + h) reads query head
    ``h``'s attributes (strides ``stride_ab``/``stride_ah``) and those of its K/V head
    ``h // G``; shared attributes have zero strides and a grid of one (b, h)."""
    t = tl.program_id(0)
    bh = tl.program_id(1)
    QPOS, QDOC, KPOS, KDOC = _head_attrs(QPOS, QDOC, KPOS, KDOC, bh, stride_ab, stride_ah, stride_kab, stride_kah, H, G)
    RANGES += bh.to(tl.int64) * tl.num_programs(0) * 4
    if BY_KEYS:
        lo, flo, fhi, hi = _query_ranges(QPOS, QDOC, KPOS, KDOC, t * BLOCK_N, Sq, Sk, wl, wr,
                                         BLOCK_M, BLOCK_N, CAUSAL, WINDOW, DOCS)
    else:
        lo, flo, fhi, hi = _key_ranges(QPOS, QDOC, KPOS, KDOC, t * BLOCK_M, Sq, Sk, wl, wr,
                                       BLOCK_M, BLOCK_N, CAUSAL, WINDOW, DOCS)
    base = RANGES + t * 4
    tl.store(base, lo.to(tl.int32))
    tl.store(base + 1, flo.to(tl.int32))
    tl.store(base + 2, fhi.to(tl.int32))
    tl.store(base + 3, hi.to(tl.int32))


@triton.jit
def _load_ranges(RANGES, t):
    base = RANGES + t * 4
    return tl.load(base), tl.load(base + 1), tl.load(base + 2), tl.load(base + 3)


@triton.jit
def _load_bounds(BOUNDS, rows, Sq):
    """(first, end) of ``rows`` from :func:`_row_bounds_kernel`'s table (one head's); rows past
    ``Sq`` get the empty run (0, 0), so they see no key."""
    ok = rows < Sq
    return tl.load(BOUNDS + rows * 2, mask=ok, other=0), tl.load(BOUNDS + rows * 2 + 1, mask=ok, other=0)


@triton.jit
def _query_attrs(QPOS, QDOC, BOUNDS, rows, Sq, CAUSAL: tl.constexpr, WINDOW: tl.constexpr, DOCS: tl.constexpr,
                 ROWB: tl.constexpr):
    """(qp, qd) a query-tile program holds for its boundary tiles under windows and documents:
    the rows' positions (where the rule reads them) and document ids, or with ``ROWB`` each
    row's run of visible keys ``[first, end)`` (:func:`_load_bounds`)."""
    qp = rows
    qd = rows
    if ROWB:
        qp, qd = _load_bounds(BOUNDS, rows, Sq)
    else:
        if CAUSAL or WINDOW:
            qp = tl.load(QPOS + rows, mask=rows < Sq, other=0)
        if DOCS:
            qd = tl.load(QDOC + rows, mask=rows < Sq, other=-2)
    return qp, qd


@triton.jit
def _in_run(cols, first, end):
    """A key column inside a row's run of visible keys ``[first, end)`` (end <= Sk, so this also
    masks the sequence end)."""
    return (cols >= first) & (cols < end)


@triton.jit
def _keys_visible(cols, qp, qd, KPOS, KDOC, Sk, wl, wr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr,
                  DOCS: tl.constexpr, PAT, nb, bs, SPARSE: tl.constexpr, ROWB: tl.constexpr):
    """Which pairs of a boundary tile with the queries as rows see each other (the forward's and
    the dQ program's): ``cols`` the tile's key indices; ``qp``/``qd`` the rows' positions and
    documents (:func:`_query_attrs`), or with ``ROWB`` each row's run [first, end) of visible keys.
    The key attributes are loaded here, only where the rule reads them."""
    if ROWB:
        visible = _in_run(cols[None, :], qp[:, None], qd[:, None])
    else:
        visible = (cols < Sk)[None, :]
        if WINDOW or DOCS or SPARSE:
            kp = cols
            kd = cols
            if CAUSAL or WINDOW or SPARSE:
                kp = tl.load(KPOS + cols, mask=cols < Sk, other=0)
            if DOCS:
                kd = tl.load(KDOC + cols, mask=cols < Sk, other=-1)
            visible = visible & _rule(qp[:, None], kp[None, :], qd[:, None], kd[None, :], wl, wr,
                                      CAUSAL, WINDOW, DOCS, PAT, nb, bs, SPARSE)
        elif CAUSAL:
            kp = tl.load(KPOS + cols, mask=cols < Sk, other=0)
            visible = visible & (qp[:, None] >= kp[None, :])
    return visible


@triton.jit
def _row_key_below(KPOS, KDOC, idx, d, p, POS: tl.constexpr, HEAD_ATTRS: tl.constexpr, DOCS: tl.constexpr,
                   STRICT: tl.constexpr):
    """Whether key ``idx`` comes before (document ``d``, position ``p``) in the keys' order
    (``STRICT``: strictly before; else at or before): documents first, then positions."""
    if POS:
        kp = tl.load(KPOS + idx).to(tl.int64)
        if HEAD_ATTRS:
            kp = kp & 0x7FFFFFFF  # the position of a composite (document << 31 | position)
        if STRICT:
            below = kp < p
        else:
            below = kp <= p
    else:  # no position rule: p is -inf (STRICT) or +inf
        below = idx < 0 if STRICT else idx >= 0
    if DOCS:
        kd = tl.load(KDOC + idx)
        below = (kd < d) | ((kd == d) & below)
    return below


@triton.jit
def _keys_below(KPOS, KDOC, Sk, steps, d, p, POS: tl.constexpr, HEAD_ATTRS: tl.constexpr, DOCS: tl.constexpr,
                STRICT: tl.constexpr):
    """Per row, the number of keys before (document ``d``, position ``p``) (``STRICT``) or at or
    before it: a binary search of ``steps`` loads over the keys' order."""
    lo = d * 0
    hi = d * 0 + Sk
    for _ in range(steps):
        mid = (lo + hi) // 2
        below = (lo < hi) & _row_key_below(KPOS, KDOC, tl.minimum(mid, Sk - 1), d, p, POS, HEAD_ATTRS, DOCS, STRICT)
        hi = tl.where((lo < hi) & ~below, mid, hi)
        lo = tl.where(below, mid + 1, lo)
    return lo


@triton.jit
def _row_bounds_kernel(
    QPOS, QDOC, KPOS, KDOC, BOUNDS, Sq, Sk, steps, wl, wr,
    stride_ab, stride_ah, stride_kab, stride_kah, H, G,
    BLOCK: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr, DOCS: tl.constexpr,
    HEAD_ATTRS: tl.constexpr,
):
    """BOUNDS[bh, row] = (first, end): the keys query ``row`` sees are exactly ``[first, end)`` of
    the local key order (empty when end <= first), int32. Every rule the ranges serve leaves a
    row one such run, because positions increase inside each document and documents along the
    order: the run starts at the first key at or after (row's document, position - left) and ends
    before the first key after (row's document, position [+ right]). Two binary searches of
    ``steps`` = ceil(log2(Sk + 1)) loads per row."""
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    bh = tl.program_id(1)
    QPOS, QDOC, KPOS, KDOC = _head_attrs(QPOS, QDOC, KPOS, KDOC, bh, stride_ab, stride_ah, stride_kab, stride_kah, H, G)
    ok = rows < Sq
    POS: tl.constexpr = CAUSAL or WINDOW > 0
    qp = rows.to(tl.int64) * 0
    if POS:
        qp = tl.load(QPOS + rows, mask=ok, other=0).to(tl.int64)
        if HEAD_ATTRS:
            qp = qp & 0x7FFFFFFF
    qd = rows * 0
    if DOCS:
        qd = tl.load(QDOC + rows, mask=ok, other=0)
    # first: the number of keys strictly before (qd, qp - wl); without a left bound, before (qd, -inf)
    lo_p = qp - wl if WINDOW % 2 == 1 else qp * 0 - (1 << 40)
    # end: the number of keys at or before (qd, qp [+ wr]); without a right bound, (qd, +inf)
    hi_p = qp * 0 + (1 << 40)
    if CAUSAL:
        hi_p = qp
    if WINDOW >= 2:
        hi_p = tl.minimum(hi_p, qp + wr)
    first = _keys_below(KPOS, KDOC, Sk, steps, qd, lo_p, POS, HEAD_ATTRS, DOCS, True)
    end = _keys_below(KPOS, KDOC, Sk, steps, qd, hi_p, POS, HEAD_ATTRS, DOCS, False)
    base = BOUNDS + bh.to(tl.int64) * Sq * 2 + rows * 2
    tl.store(base, first.to(tl.int32), mask=ok)
    tl.store(base + 1, end.to(tl.int32), mask=ok)
