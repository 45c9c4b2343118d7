"""Backward kernels: ``delta = rowsum(dO * O)``, then dK/dV and dQ of one block pair.

The gradients are recomputed from the *global* LSE and delta (of all key blocks), so the
same kernels serve a single call and every step of a ring. There are no atomics, so the
result is bit-for-bit deterministic:

* a dK/dV program owns one key tile of one kv head and loops over the ``G`` query heads
  that read it (GQA) and over the query tiles that can see it. When that grid is too small
  to fill the GPU (few kv heads, short blocks), the group is split: ``SPLIT`` programs per key
  tile each take ``G / SPLIT`` query heads and store their part in their own float32 slab,
  and the caller sums the slabs in a fixed order;
* a separate dQ program owns one query tile of one head and loops over the key tiles it sees.

Both add into float32 accumulators that the caller may carry across blocks; without
ACCUMULATE (no accumulator given) they store instead, which saves a zero fill and a read.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._common import (LOG2E, _count_tiles, _in_run, _keys_visible, _load_bounds, _load_ranges, _load_tile, _lpt_item,
                      _query_attrs, _rows_ptr, _rule)


@triton.jit
def _bwd_delta(
    OUT, DO, DELTA,
    stride_ob, stride_os, stride_oh,
    stride_db, stride_ds, stride_dh,
    H, Sq,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, WIDE: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    tile_m = tl.arange(0, BLOCK_M)
    offs_m = pid_m * BLOCK_M + tile_m
    offs_d = tl.arange(0, BLOCK_D)
    o = _load_tile(_rows_ptr(OUT + b * stride_ob + h * stride_oh, pid_m * BLOCK_M, tile_m, stride_os, WIDE) + offs_d[None, :],
                   offs_m, True, Sq, offs_d, HEAD_DIM != BLOCK_D, HEAD_DIM)
    do = _load_tile(_rows_ptr(DO + b * stride_db + h * stride_dh, pid_m * BLOCK_M, tile_m, stride_ds, WIDE) + offs_d[None, :],
                    offs_m, True, Sq, offs_d, HEAD_DIM != BLOCK_D, HEAD_DIM)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    tl.store(DELTA + pid_bh.to(tl.int64) * Sq + offs_m, delta, mask=offs_m < Sq)


@triton.jit
def _bwd_dq_finish(
    SRC, DST, SEM,
    stride_sb, stride_ss, stride_sh,
    stride_db, stride_ds, stride_dh,
    H, Sq, n_tiles,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, TILE: tl.constexpr,
    IN_PLACE: tl.constexpr, ACCUMULATE: tl.constexpr,
):
    """dQ after the Hopper backward's ordered additions into a dQ that was not set first (its
    DQ_MODE = 3): ``SEM[b * H + h, i]`` counts the additions into query tile i of ``TILE`` rows,
    so a row whose count is 0 was walked by no key tile and its dQ is 0. With ``IN_PLACE`` (dQ is
    the float32 sum itself) those rows are zeroed and nothing else is touched; otherwise ``DST``
    gets the float32 sum ``SRC`` cast to its dtype (added to it with ``ACCUMULATE``), 0 where
    nothing was added. One pass over dQ, as the cast it replaces."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    inside = rows < Sq
    added = tl.load(SEM + pid_bh.to(tl.int64) * n_tiles + rows // TILE, mask=inside, other=0) > 0
    tile_ok = inside[:, None] & (cols < HEAD_DIM)[None, :]
    src = SRC + b * stride_sb + h * stride_sh + rows.to(tl.int64)[:, None] * stride_ss + cols[None, :]
    if IN_PLACE:
        tl.store(src, tl.zeros([BLOCK_M, BLOCK_D], tl.float32), mask=tile_ok & ~added[:, None])
    else:
        dq = tl.load(src, mask=tile_ok & added[:, None], other=0.0)
        dst = DST + b * stride_db + h * stride_dh + rows.to(tl.int64)[:, None] * stride_ds + cols[None, :]
        if ACCUMULATE:
            dq += tl.load(dst, mask=tile_ok, other=0.0).to(tl.float32)
        tl.store(dst, dq.to(DST.dtype.element_ty), mask=tile_ok)


@triton.jit
def _lse2(LSE_row, rows, Sq, MASKED: tl.constexpr):
    # Base-2 LSE; a row that sees no key anywhere (LSE = -inf) gets +inf so its P is 0.
    if MASKED:
        lse = tl.load(LSE_row + rows, mask=rows < Sq, other=float("inf"))
    else:
        lse = tl.load(LSE_row + rows)
    return tl.where(lse == float("-inf"), float("inf"), lse * LOG2E)


@triton.jit
def _dkdv_tile(
    dk, dv, k, v, kp, kd, cols,
    q_base, do_base, stride_qs, stride_dos, LSE_row, DELTA_row, QPOS, QDOC, BOUNDS,
    start_m, Sq, Sk, qk_scale, wl, wr, PAT, nb, bs,
    offs_m, offs_d,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, DOT_PREC: tl.constexpr, WIDE: tl.constexpr,
    WINDOW: tl.constexpr, DOCS: tl.constexpr, SPARSE: tl.constexpr, ROWB: tl.constexpr,
):
    rows = start_m + offs_m
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D
    q = _load_tile(_rows_ptr(q_base, start_m, offs_m, stride_qs, WIDE) + offs_d[None, :],
                   rows, MASKED, Sq, offs_d, not EVEN_D, HEAD_DIM)  # (BLOCK_M, D)
    lse2 = _lse2(LSE_row, rows, Sq, MASKED)
    qkT = tl.dot(k, tl.trans(q), input_precision=DOT_PREC)  # (BLOCK_N, BLOCK_M)
    pT = tl.math.exp2(qkT * qk_scale - lse2[None, :])
    if MASKED:
        if ROWB:  # each row's run of visible keys [first, end): two loads a row, no rule
            first, end = _load_bounds(BOUNDS, rows, Sq)
            visible = _in_run(cols[:, None], first[None, :], end[None, :])
        else:
            visible = (rows < Sq)[None, :] & (cols < Sk)[:, None]
            if WINDOW or DOCS or SPARSE:
                qp = rows
                qd = rows
                if CAUSAL or WINDOW or SPARSE:
                    qp = tl.load(QPOS + rows, mask=rows < Sq, other=0)
                if DOCS:
                    qd = tl.load(QDOC + rows, mask=rows < Sq, other=-2)
                visible = visible & _rule(qp[None, :], kp[:, None], qd[None, :], kd[:, None], wl, wr,
                                          CAUSAL, WINDOW, DOCS, PAT, nb, bs, SPARSE)
            elif CAUSAL:
                qp = tl.load(QPOS + rows, mask=rows < Sq, other=0)
                visible = visible & (qp[None, :] >= kp[:, None])
        pT = tl.where(visible, pT, 0.0)
    do = _load_tile(_rows_ptr(do_base, start_m, offs_m, stride_dos, WIDE) + offs_d[None, :],
                    rows, MASKED, Sq, offs_d, not EVEN_D, HEAD_DIM)
    dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=DOT_PREC)
    if MASKED:
        di = tl.load(DELTA_row + rows, mask=rows < Sq, other=0.0)
    else:
        di = tl.load(DELTA_row + rows)
    dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)  # (BLOCK_N, BLOCK_M)
    dsT = pT * (dpT - di[None, :])
    dk = tl.dot(dsT.to(q.dtype), q, dk, input_precision=DOT_PREC)
    return dk, dv


@triton.jit
def _dkdv_program(
    pid_n, pid_bh, g_first, g_count,
    Q, K, V, DO, LSE, DELTA, QPOS, KPOS, QDOC, KDOC, RANGES_KV, DK, DV,
    PAT, LIST_KV, COUNTS_KV, BOUNDS,
    sm_scale, qk_scale, wl, wr, nb, bs,
    stride_ab, stride_ah, stride_kab, stride_kah,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_dob, stride_dos, stride_doh,
    stride_dkb, stride_dks, stride_dkh,
    stride_dvb, stride_dvs, stride_dvh,
    H, G, Sq, Sk,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, ACCUMULATE: tl.constexpr, DOT_PREC: tl.constexpr, WIDE: tl.constexpr,
    WINDOW: tl.constexpr, DOCS: tl.constexpr, SPARSE: tl.constexpr, ROWB: tl.constexpr,
):
    Hkv = H // G
    b = (pid_bh // Hkv).to(tl.int64)
    hk = (pid_bh % Hkv).to(tl.int64)
    KPOS += b * stride_kab + hk * stride_kah
    KDOC += b * stride_kab + hk * stride_kah

    start_n = pid_n * BLOCK_N
    tile_n = tl.arange(0, BLOCK_N)
    cols = start_n + tile_n
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D

    k = _load_tile(_rows_ptr(K + b * stride_kb + hk * stride_kh, start_n, tile_n, stride_ks, WIDE) + offs_d[None, :],
                   cols, True, Sk, offs_d, not EVEN_D, HEAD_DIM)
    v = _load_tile(_rows_ptr(V + b * stride_vb + hk * stride_vh, start_n, tile_n, stride_vs, WIDE) + offs_d[None, :],
                   cols, True, Sk, offs_d, not EVEN_D, HEAD_DIM)

    # Query tiles: [lo, mid) boundary, [mid, even_end) fully visible, [even_end, Sq) boundary
    # (the last, partial tile). Tiles before lo see none of these keys. The masked loops run
    # first: with a loop after the unmasked one (even one that runs no iteration), Triton 3.6
    # compiled the unmasked loop 10-14% slower on H100 (docs/performance.md, "Tried and not adopted": TMA loads).
    num_m_even = Sq // BLOCK_M
    num_m = tl.cdiv(Sq, BLOCK_M)
    kd = cols  # unused without DOCS
    num_n = tl.cdiv(Sk, BLOCK_N)
    if SPARSE:
        # Block-sparse: the query tiles that see this key tile, listed once per call, fully
        # visible ones first; the boundary ones run first (see the loop order below).
        n_full = tl.load(COUNTS_KV + pid_n * 2)
        n_any = tl.load(COUNTS_KV + pid_n * 2 + 1)
        kp = tl.load(KPOS + cols, mask=cols < Sk, other=0)
        if DOCS:
            kd = tl.load(KDOC + cols, mask=cols < Sk, other=-1)
    elif WINDOW or DOCS:
        # Windows and documents: the same three loops over the ranges of every rule.
        lo, mid, even_end, hi = _load_ranges(RANGES_KV, pid_n)
        kp = cols
        if (CAUSAL or WINDOW) and not ROWB:
            kp = tl.load(KPOS + cols, mask=cols < Sk, other=0)
        if DOCS and not ROWB:
            kd = tl.load(KDOC + cols, mask=cols < Sk, other=-1)
    elif CAUSAL:
        last_n = tl.minimum(start_n + BLOCK_N, Sk) - 1
        k_first = tl.load(KPOS + start_n)
        k_last = tl.load(KPOS + last_n)
        kp = tl.load(KPOS + cols, mask=cols < Sk, other=0)
        lo = _count_tiles(QPOS, Sq, num_m, k_first, BLOCK_M, True, True) * BLOCK_M
        mid = _count_tiles(QPOS, Sq, num_m, k_last, BLOCK_M, False, True) * BLOCK_M
    else:
        kp = cols  # unused
        lo = 0
        mid = 0
    if not (WINDOW or DOCS or SPARSE):
        even_end = tl.maximum(mid, num_m_even * BLOCK_M)
        hi = num_m * BLOCK_M

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for g in range(g_first, g_first + g_count):
        h = hk * G + g
        q_base = Q + b * stride_qb + h * stride_qh
        do_base = DO + b * stride_dob + h * stride_doh
        LSE_row = LSE + (b * H + h) * Sq
        DELTA_row = DELTA + (b * H + h) * Sq
        # This query head's attributes (per-head attributes; zero strides when shared).
        QPOS_h = QPOS + b * stride_ab + h * stride_ah
        QDOC_h = QDOC + b * stride_ab + h * stride_ah
        BOUNDS_h = BOUNDS
        if stride_ah != 0:
            BOUNDS_h = BOUNDS + (b * H + h) * Sq * 2
        if SPARSE:
            for i in range(n_full, n_any):
                start_m = tl.load(LIST_KV + pid_n * num_m + i) * BLOCK_M
                dk, dv = _dkdv_tile(
                    dk, dv, k, v, kp, kd, cols, q_base, do_base, stride_qs, stride_dos,
                    LSE_row, DELTA_row, QPOS_h, QDOC_h, BOUNDS_h, start_m, Sq, Sk, qk_scale, wl, wr, PAT, nb, bs,
                    offs_m, offs_d, HEAD_DIM, BLOCK_D, True, CAUSAL, DOT_PREC, WIDE, WINDOW, DOCS, SPARSE, ROWB,
                )
            for i in range(0, n_full):
                start_m = tl.load(LIST_KV + pid_n * num_m + i) * BLOCK_M
                dk, dv = _dkdv_tile(
                    dk, dv, k, v, kp, kd, cols, q_base, do_base, stride_qs, stride_dos,
                    LSE_row, DELTA_row, QPOS_h, QDOC_h, BOUNDS_h, start_m, Sq, Sk, qk_scale, wl, wr, PAT, nb, bs,
                    offs_m, offs_d, HEAD_DIM, BLOCK_D, False, CAUSAL, DOT_PREC, WIDE, WINDOW, DOCS, SPARSE, ROWB,
                )
        else:
            if WINDOW or DOCS:
                if stride_ah != 0:
                    lo, mid, even_end, hi = _load_ranges(RANGES_KV + (b * H + h) * num_n * 4, pid_n)
            for start_m in range(even_end, hi, BLOCK_M):
                dk, dv = _dkdv_tile(
                    dk, dv, k, v, kp, kd, cols, q_base, do_base, stride_qs, stride_dos,
                    LSE_row, DELTA_row, QPOS_h, QDOC_h, BOUNDS_h, start_m, Sq, Sk, qk_scale, wl, wr, PAT, nb, bs,
                    offs_m, offs_d, HEAD_DIM, BLOCK_D, True, CAUSAL, DOT_PREC, WIDE, WINDOW, DOCS, SPARSE, ROWB,
                )
            for start_m in range(lo, mid, BLOCK_M):
                dk, dv = _dkdv_tile(
                    dk, dv, k, v, kp, kd, cols, q_base, do_base, stride_qs, stride_dos,
                    LSE_row, DELTA_row, QPOS_h, QDOC_h, BOUNDS_h, start_m, Sq, Sk, qk_scale, wl, wr, PAT, nb, bs,
                    offs_m, offs_d, HEAD_DIM, BLOCK_D, True, CAUSAL, DOT_PREC, WIDE, WINDOW, DOCS, SPARSE, ROWB,
                )
            for start_m in range(mid, even_end, BLOCK_M):
                dk, dv = _dkdv_tile(
                    dk, dv, k, v, kp, kd, cols, q_base, do_base, stride_qs, stride_dos,
                    LSE_row, DELTA_row, QPOS_h, QDOC_h, BOUNDS_h, start_m, Sq, Sk, qk_scale, wl, wr, PAT, nb, bs,
                    offs_m, offs_d, HEAD_DIM, BLOCK_D, False, CAUSAL, DOT_PREC, WIDE, WINDOW, DOCS, SPARSE, ROWB,
                )

    dk = dk * sm_scale
    if EVEN_D:
        mask = (cols < Sk)[:, None]
    else:
        mask = (cols < Sk)[:, None] & (offs_d[None, :] < HEAD_DIM)
    dk_ptrs = _rows_ptr(DK + b * stride_dkb + hk * stride_dkh, start_n, tile_n, stride_dks, WIDE) + offs_d[None, :]
    dv_ptrs = _rows_ptr(DV + b * stride_dvb + hk * stride_dvh, start_n, tile_n, stride_dvs, WIDE) + offs_d[None, :]
    if ACCUMULATE:
        dk += tl.load(dk_ptrs, mask=mask, other=0.0)
        dv += tl.load(dv_ptrs, mask=mask, other=0.0)
    tl.store(dk_ptrs, dk.to(DK.dtype.element_ty), mask=mask)  # float32, or the inputs' dtype
    tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=mask)


@triton.jit
def _dq_tile(
    dq, q, do, lse2, di, qp, qd,
    k_base, v_base, stride_ks, stride_vs, KPOS, KDOC,
    start_n, Sk, qk_scale, wl, wr, PAT, nb, bs,
    offs_n, offs_d,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, DOT_PREC: tl.constexpr, WIDE: tl.constexpr,
    WINDOW: tl.constexpr, DOCS: tl.constexpr, SPARSE: tl.constexpr, ROWB: tl.constexpr,
):
    cols = start_n + offs_n
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D
    k = _load_tile(_rows_ptr(k_base, start_n, offs_n, stride_ks, WIDE) + offs_d[None, :],
                   cols, MASKED, Sk, offs_d, not EVEN_D, HEAD_DIM)
    v = _load_tile(_rows_ptr(v_base, start_n, offs_n, stride_vs, WIDE) + offs_d[None, :],
                   cols, MASKED, Sk, offs_d, not EVEN_D, HEAD_DIM)
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)  # (BLOCK_M, BLOCK_N)
    p = tl.math.exp2(qk * qk_scale - lse2[:, None])
    if MASKED:
        visible = _keys_visible(cols, qp, qd, KPOS, KDOC, Sk, wl, wr, CAUSAL, WINDOW, DOCS, PAT, nb, bs, SPARSE,
                                ROWB)
        p = tl.where(visible, p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
    ds = p * (dp - di[:, None])
    dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PREC)
    return dq


@triton.jit
def _dq_program(
    pid_m, pid_bh,
    Q, K, V, DO, LSE, DELTA, QPOS, KPOS, QDOC, KDOC, RANGES_Q, DQ,
    PAT, LIST_Q, COUNTS_Q, BOUNDS,
    sm_scale, qk_scale, wl, wr, nb, bs,
    stride_ab, stride_ah, stride_kab, stride_kah,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_dob, stride_dos, stride_doh,
    stride_dqb, stride_dqs, stride_dqh,
    H, G, Sq, Sk,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, ACCUMULATE: tl.constexpr, DOT_PREC: tl.constexpr, WIDE: tl.constexpr,
    WINDOW: tl.constexpr, DOCS: tl.constexpr, SPARSE: tl.constexpr, ROWB: tl.constexpr,
):
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    hk = (h // G).to(tl.int64)
    h = h.to(tl.int64)
    QPOS += b * stride_ab + h * stride_ah
    QDOC += b * stride_ab + h * stride_ah
    KPOS += b * stride_kab + hk * stride_kah
    KDOC += b * stride_kab + hk * stride_kah
    if stride_ah != 0:
        RANGES_Q += (b * H + h) * tl.cdiv(Sq, BLOCK_M) * 4
        BOUNDS += (b * H + h) * Sq * 2

    start_m = pid_m * BLOCK_M
    tile_m = tl.arange(0, BLOCK_M)
    rows = start_m + tile_m
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D

    q = _load_tile(_rows_ptr(Q + b * stride_qb + h * stride_qh, start_m, tile_m, stride_qs, WIDE) + offs_d[None, :],
                   rows, True, Sq, offs_d, not EVEN_D, HEAD_DIM)
    do = _load_tile(_rows_ptr(DO + b * stride_dob + h * stride_doh, start_m, tile_m, stride_dos, WIDE) + offs_d[None, :],
                    rows, True, Sq, offs_d, not EVEN_D, HEAD_DIM)
    lse2 = _lse2(LSE + (b * H + h) * Sq, rows, Sq, True)
    di = tl.load(DELTA + (b * H + h) * Sq + rows, mask=rows < Sq, other=0.0)
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh

    num_n_even = Sk // BLOCK_N
    qd = rows  # unused without DOCS
    if SPARSE:
        n_full = tl.load(COUNTS_Q + pid_m * 2)
        n_any = tl.load(COUNTS_Q + pid_m * 2 + 1)
        num_n = tl.cdiv(Sk, BLOCK_N)
        qp = tl.load(QPOS + rows, mask=rows < Sq, other=0)
        if DOCS:
            qd = tl.load(QDOC + rows, mask=rows < Sq, other=-2)
    elif WINDOW or DOCS:
        lo, full_start, full_end, hi = _load_ranges(RANGES_Q, pid_m)
        # with ROWB, qp and qd carry each row's run of visible keys [first, end)
        qp, qd = _query_attrs(QPOS, QDOC, BOUNDS, rows, Sq, CAUSAL, WINDOW, DOCS, ROWB)
    elif CAUSAL:
        last_m = tl.minimum(start_m + BLOCK_M, Sq) - 1
        q_first = tl.load(QPOS + start_m)
        q_last = tl.load(QPOS + last_m)
        qp = tl.load(QPOS + rows, mask=rows < Sq, other=0)
        full_end = _count_tiles(KPOS, Sk, num_n_even, q_first, BLOCK_N, True, False) * BLOCK_N
        hi = _count_tiles(KPOS, Sk, tl.cdiv(Sk, BLOCK_N), q_last, BLOCK_N, False, False) * BLOCK_N
        hi = tl.maximum(hi, full_end)
    else:
        qp = rows  # unused
        full_end = num_n_even * BLOCK_N
        hi = tl.cdiv(Sk, BLOCK_N) * BLOCK_N

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    # Boundary tiles first, then the unmasked ones (see the dK/dV loops).
    if SPARSE:
        for i in range(n_full, n_any):
            start_n = tl.load(LIST_Q + pid_m * num_n + i) * BLOCK_N
            dq = _dq_tile(dq, q, do, lse2, di, qp, qd, k_base, v_base, stride_ks, stride_vs, KPOS, KDOC,
                          start_n, Sk, qk_scale, wl, wr, PAT, nb, bs, offs_n, offs_d,
                          HEAD_DIM, BLOCK_D, True, CAUSAL, DOT_PREC, WIDE, WINDOW, DOCS, SPARSE, ROWB)
        for i in range(0, n_full):
            start_n = tl.load(LIST_Q + pid_m * num_n + i) * BLOCK_N
            dq = _dq_tile(dq, q, do, lse2, di, qp, qd, k_base, v_base, stride_ks, stride_vs, KPOS, KDOC,
                          start_n, Sk, qk_scale, wl, wr, PAT, nb, bs, offs_n, offs_d,
                          HEAD_DIM, BLOCK_D, False, CAUSAL, DOT_PREC, WIDE, WINDOW, DOCS, SPARSE, ROWB)
    else:
        for start_n in range(full_end, hi, BLOCK_N):
            dq = _dq_tile(dq, q, do, lse2, di, qp, qd, k_base, v_base, stride_ks, stride_vs, KPOS, KDOC,
                          start_n, Sk, qk_scale, wl, wr, PAT, nb, bs, offs_n, offs_d,
                          HEAD_DIM, BLOCK_D, True, CAUSAL, DOT_PREC, WIDE, WINDOW, DOCS, SPARSE, ROWB)
    if not SPARSE:
        if WINDOW or DOCS:
            for start_n in range(lo, full_start, BLOCK_N):
                dq = _dq_tile(dq, q, do, lse2, di, qp, qd, k_base, v_base, stride_ks, stride_vs, KPOS, KDOC,
                              start_n, Sk, qk_scale, wl, wr, PAT, nb, bs, offs_n, offs_d,
                              HEAD_DIM, BLOCK_D, True, CAUSAL, DOT_PREC, WIDE, WINDOW, DOCS, SPARSE, ROWB)
            for start_n in range(full_start, full_end, BLOCK_N):
                dq = _dq_tile(dq, q, do, lse2, di, qp, qd, k_base, v_base, stride_ks, stride_vs, KPOS, KDOC,
                              start_n, Sk, qk_scale, wl, wr, PAT, nb, bs, offs_n, offs_d,
                              HEAD_DIM, BLOCK_D, False, CAUSAL, DOT_PREC, WIDE, WINDOW, DOCS, SPARSE, ROWB)
        else:
            for start_n in range(0, full_end, BLOCK_N):
                dq = _dq_tile(dq, q, do, lse2, di, qp, qd, k_base, v_base, stride_ks, stride_vs, KPOS, KDOC,
                              start_n, Sk, qk_scale, wl, wr, PAT, nb, bs, offs_n, offs_d,
                              HEAD_DIM, BLOCK_D, False, CAUSAL, DOT_PREC, WIDE, WINDOW, DOCS, SPARSE, ROWB)

    dq = dq * sm_scale
    if EVEN_D:
        mask = (rows < Sq)[:, None]
    else:
        mask = (rows < Sq)[:, None] & (offs_d[None, :] < HEAD_DIM)
    dq_ptrs = _rows_ptr(DQ + b * stride_dqb + h * stride_dqh, start_m, tile_m, stride_dqs, WIDE) + offs_d[None, :]
    if ACCUMULATE:
        dq += tl.load(dq_ptrs, mask=mask, other=0.0)
    tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty), mask=mask)  # float32, or the inputs' dtype


# One kernel, launched once per program kind (DO_DKDV / DO_DQ), or once with both kinds in one
# grid so dQ programs could fill the SMs that the last dK/dV programs leave idle. The fused grid
# measured slower on H200 (docs/performance.md); attention.BWD_FUSED selects it.

@triton.jit
def _attn_bwd(
    Q, K, V, DO, LSE, DELTA, QPOS, KPOS, QDOC, KDOC, RANGES_KV, RANGES_Q, DQ, DK, DV,
    PAT, LIST_KV, COUNTS_KV, LIST_Q, COUNTS_Q,
    BOUNDS,  # each query row's run of visible keys (ROWB; _row_bounds_kernel)
    sm_scale, qk_scale, wl, wr, nb, bs,
    stride_ab, stride_ah, stride_kab, stride_kah,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_dob, stride_dos, stride_doh,
    stride_dqb, stride_dqs, stride_dqh,
    stride_dkb, stride_dks, stride_dkh,
    stride_dvb, stride_dvs, stride_dvh,
    stride_dk_split, stride_dv_split,
    B, H, G, SPLIT, Sq, Sk,
    SWIZZLE_KV, SWIZZLE_Q,  # rows per section of the causal orders (_lpt_item)
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M1: tl.constexpr, BLOCK_N1: tl.constexpr,
    BLOCK_M2: tl.constexpr, BLOCK_N2: tl.constexpr,
    CAUSAL: tl.constexpr, ACC_DKDV: tl.constexpr, ACC_DQ: tl.constexpr,
    DOT_PREC: tl.constexpr, DO_DKDV: tl.constexpr, DO_DQ: tl.constexpr, WIDE: tl.constexpr,
    WINDOW: tl.constexpr, DOCS: tl.constexpr, SPARSE: tl.constexpr, ROWB: tl.constexpr,
):
    tl.static_assert(not ROWB or ((WINDOW or DOCS) and not SPARSE), "row bounds serve the ranged masks")
    pid = tl.program_id(0)
    num_n = tl.cdiv(Sk, BLOCK_N1)
    n_dkdv = 0
    if DO_DKDV:
        # Heaviest first: with causal, early key tiles are seen by the most queries.
        # With SPLIT > 1, program (key tile, split, b * kv head) takes the split's query heads
        # of the group and stores into that split's slab of DK/DV (never accumulates).
        n_dkdv = num_n * B * (H // G) * SPLIT
        if pid < n_dkdv:
            pid_n = pid % num_n
            rest = pid // num_n
            if CAUSAL:
                pid_n, rest = _lpt_item(pid, num_n, B * (H // G) * SPLIT, SWIZZLE_KV, True)
            split = (rest % SPLIT).to(tl.int64)
            g_count = G // SPLIT
            _dkdv_program(
                pid_n, rest // SPLIT, split * g_count, g_count,
                Q, K, V, DO, LSE, DELTA, QPOS, KPOS, QDOC, KDOC, RANGES_KV,
                DK + split * stride_dk_split, DV + split * stride_dv_split,
                PAT, LIST_KV, COUNTS_KV, BOUNDS,
                sm_scale, qk_scale, wl, wr, nb, bs,
                stride_ab, stride_ah, stride_kab, stride_kah,
                stride_qb, stride_qs, stride_qh,
                stride_kb, stride_ks, stride_kh,
                stride_vb, stride_vs, stride_vh,
                stride_dob, stride_dos, stride_doh,
                stride_dkb, stride_dks, stride_dkh,
                stride_dvb, stride_dvs, stride_dvh,
                H, G, Sq, Sk,
                HEAD_DIM, BLOCK_D, BLOCK_M1, BLOCK_N1, CAUSAL, ACC_DKDV, DOT_PREC, WIDE, WINDOW, DOCS, SPARSE, ROWB,
            )
    if DO_DQ:
        if pid >= n_dkdv:
            num_m = tl.cdiv(Sq, BLOCK_M2)
            p = pid - n_dkdv
            pid_m = p % num_m
            pid_bh = p // num_m
            if CAUSAL:
                # Heaviest first: later query tiles see the most keys.
                pid_m, pid_bh = _lpt_item(p, num_m, B * H, SWIZZLE_Q, False)
            _dq_program(
                pid_m, pid_bh,
                Q, K, V, DO, LSE, DELTA, QPOS, KPOS, QDOC, KDOC, RANGES_Q, DQ,
                PAT, LIST_Q, COUNTS_Q, BOUNDS,
                sm_scale, qk_scale, wl, wr, nb, bs,
                stride_ab, stride_ah, stride_kab, stride_kah,
                stride_qb, stride_qs, stride_qh,
                stride_kb, stride_ks, stride_kh,
                stride_vb, stride_vs, stride_vh,
                stride_dob, stride_dos, stride_doh,
                stride_dqb, stride_dqs, stride_dqh,
                H, G, Sq, Sk,
                HEAD_DIM, BLOCK_D, BLOCK_M2, BLOCK_N2, CAUSAL, ACC_DQ, DOT_PREC, WIDE, WINDOW, DOCS, SPARSE, ROWB,
            )
