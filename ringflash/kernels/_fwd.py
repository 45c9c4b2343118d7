"""Forward kernel: O and a natural-log LSE of one (query block, key block) pair.

One program owns ``BLOCK_M`` query rows of one (batch, head) and walks the key tiles it can
see: first the fully visible ones (no mask arithmetic), then the boundary ones (the mask rule
and the sequence-end mask). Fully masked tiles are never visited. Windows and documents
(``WINDOW``, ``DOCS``) add boundary tiles on the left of the visible range too; without them the
code is the causal/full kernel's, unchanged. With ``FOLD`` the
program merges its result into the running float32 ``OUT``/``LSE`` of earlier blocks in
place, so a ring step needs no separate merge launch and partials never round to bf16.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._common import (LN2, _count_tiles, _keys_visible, _load_ranges, _load_tile, _lpt_item, _merge_states,
                      _query_attrs, _rows_ptr)


@triton.jit
def _fwd_tile(
    acc, l_i, m_i, q, qp, qd,
    k_base, v_base, stride_ks, stride_vs, KPOS, KDOC,
    start_n, Sk, qk_scale, wl, wr, PAT, nb, bs,
    offs_n, offs_d,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, DOT_PREC: tl.constexpr, WIDE: tl.constexpr,
    WINDOW: tl.constexpr, DOCS: tl.constexpr, SPARSE: tl.constexpr, ROWB: tl.constexpr,
):
    cols = start_n + offs_n
    k = _load_tile(_rows_ptr(k_base, start_n, offs_n, stride_ks, WIDE) + offs_d[None, :],
                   cols, MASKED, Sk, offs_d, HEAD_DIM != BLOCK_D, HEAD_DIM)
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)  # (BLOCK_M, BLOCK_N)
    if MASKED:
        visible = _keys_visible(cols, qp, qd, KPOS, KDOC, Sk, wl, wr, CAUSAL, WINDOW, DOCS, PAT, nb, bs, SPARSE,
                                ROWB)
        qk = tl.where(visible, qk * qk_scale, float("-inf"))
        m_ij = tl.maximum(m_i, tl.max(qk, 1))
        # A row with nothing visible yet keeps m = -inf; shift it by 0 so exp2 gives 0, not NaN.
        m_use = tl.where(m_ij == float("-inf"), 0.0, m_ij)
        p = tl.math.exp2(qk - m_use[:, None])
    else:
        m_ij = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        m_use = m_ij
        p = tl.math.exp2(qk * qk_scale - m_use[:, None])
    alpha = tl.math.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    v = _load_tile(_rows_ptr(v_base, start_n, offs_n, stride_vs, WIDE) + offs_d[None, :],
                   cols, MASKED, Sk, offs_d, HEAD_DIM != BLOCK_D, HEAD_DIM)
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PREC)
    return acc, l_i, m_ij


@triton.jit
def _attn_fwd(
    Q, K, V, QPOS, KPOS, QDOC, KDOC, RANGES, OUT, LSE,
    PAT, LIST, COUNTS,  # block pattern and per-tile key-tile lists (SPARSE)
    BOUNDS,  # each row's run of visible keys (ROWB; _row_bounds_kernel)
    qk_scale,  # softmax_scale * log2(e)
    wl, wr,  # window sides; read only where WINDOW says the side is bounded
    nb, bs,  # the block pattern's blocks per side and block size (SPARSE)
    stride_ab, stride_ah, stride_kab, stride_kah,  # per-head attributes (0: shared)
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_ob, stride_os, stride_oh,
    stride_lb, stride_lh, stride_ls,
    H, G, Sq, Sk,
    SWIZZLE,  # rows per section of the causal order (_lpt_item)
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, FOLD: tl.constexpr, DOT_PREC: tl.constexpr, WIDE: tl.constexpr,
    WINDOW: tl.constexpr, DOCS: tl.constexpr, SPARSE: tl.constexpr, ROWB: tl.constexpr,
):
    tl.static_assert(not ROWB or ((WINDOW or DOCS) and not SPARSE), "row bounds serve the ranged masks")
    num_m = tl.cdiv(Sq, BLOCK_M)
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    if CAUSAL:
        # Later query tiles see more keys: start them first so the tail of the grid is short.
        pid_m, pid_bh = _lpt_item(pid_bh * num_m + pid_m, num_m, tl.num_programs(1), SWIZZLE, False)
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    hk = (h // G).to(tl.int64)
    h = h.to(tl.int64)
    # Per-head attributes (QK-dropping, hash buckets) and their tile ranges; zero strides when shared.
    QPOS += b * stride_ab + h * stride_ah
    QDOC += b * stride_ab + h * stride_ah
    KPOS += b * stride_kab + hk * stride_kah
    KDOC += b * stride_kab + hk * stride_kah
    if stride_ah != 0:
        RANGES += (b * H + h) * num_m * 4
        BOUNDS += (b * H + h) * Sq * 2

    start_m = pid_m * BLOCK_M
    tile_m = tl.arange(0, BLOCK_M)
    offs_m = start_m + tile_m
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D

    q_base = Q + b * stride_qb + h * stride_qh
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    q = _load_tile(_rows_ptr(q_base, start_m, tile_m, stride_qs, WIDE) + offs_d[None, :],
                   offs_m, True, Sq, offs_d, not EVEN_D, HEAD_DIM)

    # Key tiles [0, full_end) are visible to every row; [full_end, hi) are boundary tiles.
    num_n_even = Sk // BLOCK_N
    lo = 0
    qd = offs_m  # unused without DOCS
    if SPARSE:
        # Block-sparse: this tile's key tiles, listed once per call (kernels/blocks.py), fully
        # visible ones first.
        n_full = tl.load(COUNTS + pid_m * 2)
        n_any = tl.load(COUNTS + pid_m * 2 + 1)
        num_n = tl.cdiv(Sk, BLOCK_N)
        qp = tl.load(QPOS + offs_m, mask=offs_m < Sq, other=0)
        if DOCS:
            qd = tl.load(QDOC + offs_m, mask=offs_m < Sq, other=-2)
    elif WINDOW or DOCS:
        lo, full_start, full_end, hi = _load_ranges(RANGES, pid_m)  # _ranges_kernel's
        # With ROWB, boundary tiles by each row's run of visible keys: qp, qd carry [first, end),
        # and no key attribute is loaded in the loop.
        qp, qd = _query_attrs(QPOS, QDOC, BOUNDS, offs_m, Sq, CAUSAL, WINDOW, DOCS, ROWB)
    elif CAUSAL:
        last_m = tl.minimum(start_m + BLOCK_M, Sq) - 1
        q_first = tl.load(QPOS + start_m)
        q_last = tl.load(QPOS + last_m)
        qp = tl.load(QPOS + offs_m, mask=offs_m < Sq, other=0)
        full_end = _count_tiles(KPOS, Sk, num_n_even, q_first, BLOCK_N, True, False) * BLOCK_N
        hi = _count_tiles(KPOS, Sk, tl.cdiv(Sk, BLOCK_N), q_last, BLOCK_N, False, False) * BLOCK_N
        hi = tl.maximum(hi, full_end)
    else:
        qp = offs_m  # unused
        full_end = num_n_even * BLOCK_N
        hi = tl.cdiv(Sk, BLOCK_N) * BLOCK_N

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if SPARSE:
        for i in range(0, n_full):
            start_n = tl.load(LIST + pid_m * num_n + i) * BLOCK_N
            acc, l_i, m_i = _fwd_tile(
                acc, l_i, m_i, q, qp, qd, k_base, v_base, stride_ks, stride_vs, KPOS, KDOC,
                start_n, Sk, qk_scale, wl, wr, PAT, nb, bs, offs_n, offs_d,
                HEAD_DIM, BLOCK_D, False, CAUSAL, DOT_PREC, WIDE, WINDOW, DOCS, SPARSE, ROWB,
            )
        for i in range(n_full, n_any):
            start_n = tl.load(LIST + pid_m * num_n + i) * BLOCK_N
            acc, l_i, m_i = _fwd_tile(
                acc, l_i, m_i, q, qp, qd, k_base, v_base, stride_ks, stride_vs, KPOS, KDOC,
                start_n, Sk, qk_scale, wl, wr, PAT, nb, bs, offs_n, offs_d,
                HEAD_DIM, BLOCK_D, True, CAUSAL, DOT_PREC, WIDE, WINDOW, DOCS, SPARSE, ROWB,
            )
    elif WINDOW or DOCS:
        for start_n in range(full_start, full_end, BLOCK_N):
            acc, l_i, m_i = _fwd_tile(
                acc, l_i, m_i, q, qp, qd, k_base, v_base, stride_ks, stride_vs, KPOS, KDOC,
                start_n, Sk, qk_scale, wl, wr, PAT, nb, bs, offs_n, offs_d,
                HEAD_DIM, BLOCK_D, False, CAUSAL, DOT_PREC, WIDE, WINDOW, DOCS, SPARSE, ROWB,
            )
        for start_n in range(full_end, hi, BLOCK_N):
            acc, l_i, m_i = _fwd_tile(
                acc, l_i, m_i, q, qp, qd, k_base, v_base, stride_ks, stride_vs, KPOS, KDOC,
                start_n, Sk, qk_scale, wl, wr, PAT, nb, bs, offs_n, offs_d,
                HEAD_DIM, BLOCK_D, True, CAUSAL, DOT_PREC, WIDE, WINDOW, DOCS, SPARSE, ROWB,
            )
        for start_n in range(lo, full_start, BLOCK_N):
            acc, l_i, m_i = _fwd_tile(
                acc, l_i, m_i, q, qp, qd, k_base, v_base, stride_ks, stride_vs, KPOS, KDOC,
                start_n, Sk, qk_scale, wl, wr, PAT, nb, bs, offs_n, offs_d,
                HEAD_DIM, BLOCK_D, True, CAUSAL, DOT_PREC, WIDE, WINDOW, DOCS, SPARSE, ROWB,
            )
    else:
        for start_n in range(0, full_end, BLOCK_N):
            acc, l_i, m_i = _fwd_tile(
                acc, l_i, m_i, q, qp, qd, k_base, v_base, stride_ks, stride_vs, KPOS, KDOC,
                start_n, Sk, qk_scale, wl, wr, PAT, nb, bs, offs_n, offs_d,
                HEAD_DIM, BLOCK_D, False, CAUSAL, DOT_PREC, WIDE, WINDOW, DOCS, SPARSE, ROWB,
            )
        for start_n in range(full_end, hi, BLOCK_N):
            acc, l_i, m_i = _fwd_tile(
                acc, l_i, m_i, q, qp, qd, k_base, v_base, stride_ks, stride_vs, KPOS, KDOC,
                start_n, Sk, qk_scale, wl, wr, PAT, nb, bs, offs_n, offs_d,
                HEAD_DIM, BLOCK_D, True, CAUSAL, DOT_PREC, WIDE, WINDOW, DOCS, SPARSE, ROWB,
            )

    # A row that saw no key: O = 0, LSE = -inf.
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    o = acc / l_safe[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(l_safe)) * LN2)

    row_ok = offs_m < Sq
    o_ptrs = _rows_ptr(OUT + b * stride_ob + h * stride_oh, start_m, tile_m, stride_os, WIDE) + offs_d[None, :]
    l_ptrs = LSE + b * stride_lb + h * stride_lh + offs_m * stride_ls
    if EVEN_D:
        o_mask = row_ok[:, None]
    else:
        o_mask = row_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    if FOLD:
        # Online-softmax merge with the running state of earlier key blocks, in float32.
        lse_old = tl.load(l_ptrs, mask=row_ok, other=float("-inf"))
        o_old = tl.load(o_ptrs, mask=o_mask, other=0.0)
        o, lse = _merge_states(o_old, lse_old, o, lse)
    tl.store(o_ptrs, o.to(OUT.dtype.element_ty), mask=o_mask)  # float32, or the inputs' dtype
    tl.store(l_ptrs, lse, mask=row_ok)
