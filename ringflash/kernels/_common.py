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
