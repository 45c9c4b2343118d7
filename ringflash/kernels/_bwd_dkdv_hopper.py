"""Backward dK/dV kernel for Hopper (sm_90) in Gluon: the contract of :mod:`._bwd`'s dK/dV
programs, on TMA loads and asynchronous wgmma with a producer warp.

One program owns ``BLOCK_N`` = 128 keys of one (batch, K/V head) and walks, for each of the
``G`` query heads that read that K/V head, the query tiles that can see its keys (the ranges
of :func:`._common._ranges_kernel` by keys: fully visible tiles first, then the boundary ones).
Nothing is atomic: each program owns its rows of dK and dV, so the result is bitwise the same
from run to run.

Partitions (``gl.warp_specialize``):

* the default partition, 8 warps = 2 consumer warpgroups, stacked along the keys: warpgroup 0
  owns keys 0-63 of the tile and warpgroup 1 keys 64-127, with their rows of dK and dV in
  float32 registers for the whole program;
* a worker partition, 1 warp: the TMA producer. K and V once (``kv_bar``), then Q and dO of
  every (query head, query tile) into ``STAGES`` slots.

Barriers, all of count 1: ``q_ready[s]``/``do_ready[s]`` (producer -> consumer: Q / dO of slot s
landed), ``q_empty[s]``/``do_empty[s]`` (consumer -> producer: every wgmma reading the slot
retired). Phases as in :mod:`._fwd_hopper`: item t sits in slot ``t % STAGES`` in round
``t // STAGES``, and the producer waits the empty barriers with the parity flipped.

Per query tile, in transposed form (keys are the rows, so the products that accumulate into dK
and dV take their A operand from registers):

    issue S^T  = K Q^T                  (after q_ready)
    issue dP^T = V dO^T                 (after do_ready)
    wait(1): S^T done; P^T = exp2(S^T * scale - LSE2) (0 where masked)   <- overlaps dP^T
    issue dV += P^T dO
    wait(1): dP^T done (groups retire in order); dS^T = P^T * (dP^T - delta)  <- overlaps dV
    issue dK += dS^T Q
    wait(0); partition barrier; release Q and dO
    ... and at the end dK *= softmax scale; add into (or store) the float32 dK, dV.

The producer runs ahead by the number of slots, so the next tile's loads overlap these products.

With ``SMEM_P`` (``attention.HOPPER_BWD_SMEM_P``) the consumers take FA3's routes instead
(:func:`_consumer_smem_p`): S and dP with the queries as rows, P and dS through shared memory.
With ``STATS_SMEM`` (``attention.HOPPER_BWD_STATS_SMEM``, the launcher's default where the rows
allow it) ``LSE`` and ``DELTA`` are TMA descriptors of (B, H, S) rows: the producer loads each
step's rows with its Q (on ``q_ready``) and dO (on ``do_ready``), and the consumers read them from
shared memory (:func:`_stage_stats`) instead of loading them from global memory after issuing the
step's first products, a wait that was their most sampled stall (0.89-0.99x the kernel's time).

With ``DQ_MODE`` > 0 (``attention.HOPPER_BWD_DQ``, FA3's routes) the program computes dQ too, and
no dQ kernel runs: five tile products per step instead of seven in two kernels. The consumers
compute each step's dQ tile = dS K and put it into one of two float32 tiles in shared memory; a
third partition, one warp (:func:`_dq_writer`; two with ``DQ_WRITERS`` = 2, the launcher's default,
taking the even and the odd steps), adds each into the float32 dQ with one bulk TMA reduction. Two more barriers of
count 1 per buffer: ``dq_full[b]`` (consumers -> writer: the tile is in buffer b) and
``dq_empty[b]`` (writer -> consumers: the reduction has read it). The consumers therefore never
wait for an addition to land, only, at most, for the reduction issued two steps before to have
read its buffer. With DQ_MODE >= 2 the additions into each query tile
come in a fixed order (bitwise repeatable): a counter per (batch, query head, query tile) in
global memory, which the writer waits on before its reduction and raises once the reduction has
landed. The order is FA3's "shortest processing time first": the grid launches the last key
tile first, each query tile takes the additions of its key tiles from the last down, and every
program walks its query tiles upwards. Under a causal mask the program of key tile n then
reaches query tile m one step after the program of key tile n + 1 did (it starts one tile
higher), so the addition it waits for was issued a step earlier and has usually landed; the
programs a writer waits for were launched before its own, so every wait ends. DQ_MODE = 3 is
the same order into a dQ whose contents do not matter (a new buffer, or one the call overwrites):
the first addition into each query tile is a plain TMA store, so nothing has to zero dQ first;
the launcher then zeros (or leaves out of its cast) the query tiles that no key tile walked,
whose counters are still 0 (``_bwd._bwd_dq_finish``).
"""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)

from ._hopper_common import (LOG2E, barriers, bulk_wait, cta_barrier, fence_gpu, invalidate, load_acquire, ranges,
                             tile_start, tma_load, tma_reduce_add, tma_store, visible)


@gluon.jit
def _program(H, G, BLOCK_N: gl.constexpr, LAST_FIRST: gl.constexpr):
    """(b, K/V head, first key, key tile) of this program; with ``LAST_FIRST`` (the ordered dQ)
    the grid runs the key tiles from the last down."""
    n = gl.program_id(0)
    if LAST_FIRST:
        n = gl.num_programs(0) - 1 - n
    pid_bh = gl.program_id(1)
    Hkv = H // G
    return pid_bh // Hkv, pid_bh % Hkv, n * BLOCK_N, n


@gluon.jit
def _tile(j, lo, flo, fhi, hi, BLOCK_M: gl.constexpr, ASCENDING: gl.constexpr):
    """(first query row, boundary tile?) of the j-th query tile a program walks: fully visible
    tiles first, then the boundary ones (:func:`._hopper_common.tile_start`); with ``ASCENDING``
    every tile from the first up (the ordered dQ's walk)."""
    if ASCENDING:
        m0 = lo + j * BLOCK_M
        return m0, (m0 < flo) | (m0 >= fhi)
    return tile_start(j, lo, flo, fhi, hi, BLOCK_M), j >= (fhi - flo) // BLOCK_M


@gluon.jit
def _step(t, j, lo, flo, fhi, hi, q_smem, do_smem, BLOCK_M: gl.constexpr, HEAD_DIM: gl.constexpr,
          STAGES: gl.constexpr, ASCENDING: gl.constexpr = False):
    """Step ``t`` of a program, the ``j``-th query tile of a query head (the walks loop over the heads
    of the group and their tiles, rather than divide ``t`` by the tile count: t // n_m and t % n_m
    took 24 instructions a step, a MUFU among them): (boundary tile?, first query row, slot,
    phase, Q, dO)."""
    s = t % STAGES
    q2 = q_smem.index(s).reshape([BLOCK_M, HEAD_DIM])
    do2 = do_smem.index(s).reshape([BLOCK_M, HEAD_DIM])
    m0, boundary = _tile(j, lo, flo, fhi, hi, BLOCK_M, ASCENDING)
    return boundary, m0, s, (t // STAGES) & 1, q2, do2


@gluon.jit
def _query_stats(LSE, DELTA, b, h, rows, Sq, stride_lb, stride_lh):
    """(rows in range, LSE in base 2, delta) of a tile's queries; a row that sees no key anywhere
    gets LSE +inf, so its P is 0."""
    row_ok = rows < Sq
    l_row = b.to(gl.int64) * stride_lb + h.to(gl.int64) * stride_lh + rows
    lse = gl.load(LSE + l_row, mask=row_ok, other=float("inf"))
    lse2 = gl.where(lse == float("-inf"), float("inf"), lse * LOG2E)
    return row_ok, lse2, gl.load(DELTA + l_row, mask=row_ok, other=0.0)


@gluon.jit
def _stage_stats(lse_slot, delta_slot, rows, Sq, BLOCK_M: gl.constexpr, layout: gl.constexpr):
    """:func:`_query_stats` from a stage's rows in shared memory, where the producer loaded them
    with the stage's Q and dO (``STATS_SMEM``; TMA reads rows past ``Sq`` as 0)."""
    row_ok = rows < Sq
    lse = lse_slot.reshape([BLOCK_M]).load(layout)
    lse2 = gl.where(row_ok & (lse != float("-inf")), lse * LOG2E, float("inf"))
    di = gl.where(row_ok, delta_slot.reshape([BLOCK_M]).load(layout), 0.0)
    return row_ok, lse2, di


@gluon.jit
def _producer(q_desc, k_desc, v_desc, do_desc, LSE, DELTA, QPOS, KPOS, QDOC, KDOC, RANGES, BOUNDS, DK, DV,
              k_smem, v_smem, q_smem, do_smem, p_smem, ds_smem, lse_smem, delta_smem,
              kv_bar, q_ready, do_ready, q_empty, do_empty,
              sm_scale, qk_scale, wl, wr, stride_lb, stride_lh, stride_kb, stride_ks, stride_kh,
              stride_vb, stride_vs, stride_vh, H, G, Sq, Sk,
              BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr, STAGES: gl.constexpr,
              CAUSAL: gl.constexpr, WINDOW: gl.constexpr, DOCS: gl.constexpr, RANGED: gl.constexpr, ROWB: gl.constexpr,
              ACCUMULATE: gl.constexpr, CONSUMER_WARPS: gl.constexpr, SMEM_P: gl.constexpr,
              STATS_SMEM: gl.constexpr,
              dq_desc, dq_smem, dq_full, dq_empty, SEM, RANK, DQ_MODE: gl.constexpr,
              DQ_WRITERS: gl.constexpr, W: gl.constexpr):
    b, hk, n0, n = _program(H, G, BLOCK_N, DQ_MODE >= 2)
    lo, flo, fhi, hi = ranges(RANGES, n, Sq, BLOCK_M, RANGED)
    n_m = (hi - lo) // BLOCK_M

    mbarrier.expect(kv_bar, k_desc.block_type.nbytes + v_desc.block_type.nbytes)
    tma_load(k_desc, [b, n0, hk, 0], kv_bar, k_smem)
    tma_load(v_desc, [b, n0, hk, 0], kv_bar, v_smem)
    for t in range(G * n_m):
        h = hk * G + t // n_m
        m0, _boundary = _tile(t % n_m, lo, flo, fhi, hi, BLOCK_M, DQ_MODE >= 2)
        s = t % STAGES
        ph = (t // STAGES) & 1
        mbarrier.wait(q_empty.index(s), ph ^ 1)
        if STATS_SMEM:  # the rows' LSE with Q, their delta with dO, on the same barriers
            mbarrier.expect(q_ready.index(s), q_desc.block_type.nbytes + LSE.block_type.nbytes)
            tma_load(LSE, [b, h, m0], q_ready.index(s), lse_smem.index(s))
        else:
            mbarrier.expect(q_ready.index(s), q_desc.block_type.nbytes)
        tma_load(q_desc, [b, m0, h, 0], q_ready.index(s), q_smem.index(s))
        mbarrier.wait(do_empty.index(s), ph ^ 1)
        if STATS_SMEM:
            mbarrier.expect(do_ready.index(s), do_desc.block_type.nbytes + DELTA.block_type.nbytes)
            tma_load(DELTA, [b, h, m0], do_ready.index(s), delta_smem.index(s))
        else:
            mbarrier.expect(do_ready.index(s), do_desc.block_type.nbytes)
        tma_load(do_desc, [b, m0, h, 0], do_ready.index(s), do_smem.index(s))


@gluon.jit
def _consumer(q_desc, k_desc, v_desc, do_desc, LSE, DELTA, QPOS, KPOS, QDOC, KDOC, RANGES, BOUNDS, DK, DV,
              k_smem, v_smem, q_smem, do_smem, p_smem, ds_smem, lse_smem, delta_smem,
              kv_bar, q_ready, do_ready, q_empty, do_empty,
              sm_scale, qk_scale, wl, wr, stride_lb, stride_lh, stride_kb, stride_ks, stride_kh,
              stride_vb, stride_vs, stride_vh, H, G, Sq, Sk,
              BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr, STAGES: gl.constexpr,
              CAUSAL: gl.constexpr, WINDOW: gl.constexpr, DOCS: gl.constexpr, RANGED: gl.constexpr, ROWB: gl.constexpr,
              ACCUMULATE: gl.constexpr, CONSUMER_WARPS: gl.constexpr, SMEM_P: gl.constexpr,
              STATS_SMEM: gl.constexpr,
              dq_desc, dq_smem, dq_full, dq_empty, SEM, RANK, DQ_MODE: gl.constexpr,
              DQ_WRITERS: gl.constexpr, W: gl.constexpr):
    if SMEM_P:
        _consumer_smem_p(LSE, DELTA, QPOS, KPOS, QDOC, KDOC, RANGES, BOUNDS, DK, DV,
                         k_smem, v_smem, q_smem, do_smem, p_smem, ds_smem, lse_smem, delta_smem,
                         kv_bar, q_ready, do_ready, q_empty,
                         do_empty, sm_scale, qk_scale, wl, wr, stride_lb, stride_lh, stride_kb, stride_ks,
                         stride_kh, stride_vb, stride_vs, stride_vh, H, G, Sq, Sk, BLOCK_M, BLOCK_N, HEAD_DIM,
                         STAGES, CAUSAL, WINDOW, DOCS, RANGED, ROWB, ACCUMULATE, CONSUMER_WARPS, q_desc.dtype,
                         STATS_SMEM,
                         dq_desc, dq_smem, dq_full, dq_empty, SEM, RANK, DQ_MODE)
        return
    NW: gl.constexpr = CONSUMER_WARPS
    # (keys x queries) products and (keys x head dim) accumulators, warps stacked along the keys.
    st_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NW, 1],
                                                        instr_shape=[16, BLOCK_M, 16])
    acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NW, 1],
                                                         instr_shape=[16, HEAD_DIM, 16])
    op_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_layout, k_width=2)
    key_layout: gl.constexpr = gl.SliceLayout(1, st_layout)
    query_layout: gl.constexpr = gl.SliceLayout(0, st_layout)
    dtype: gl.constexpr = q_desc.dtype

    b, hk, n0, n = _program(H, G, BLOCK_N, DQ_MODE >= 2)
    lo, flo, fhi, hi = ranges(RANGES, n, Sq, BLOCK_M, RANGED)
    n_m = (hi - lo) // BLOCK_M

    keys = n0 + gl.arange(0, BLOCK_N, layout=key_layout)
    kp = keys
    kd = keys
    if CAUSAL or WINDOW > 0:
        kp = gl.load(KPOS + keys, mask=keys < Sk, other=0).to(gl.int32)
    if DOCS:
        kd = gl.load(KDOC + keys, mask=keys < Sk, other=-1)

    k2 = k_smem.reshape([BLOCK_N, HEAD_DIM])
    v2 = v_smem.reshape([BLOCK_N, HEAD_DIM])
    st_zero = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, layout=st_layout)
    dk = gl.zeros([BLOCK_N, HEAD_DIM], gl.float32, layout=acc_layout)
    dv = gl.zeros([BLOCK_N, HEAD_DIM], gl.float32, layout=acc_layout)

    mbarrier.wait(kv_bar, 0)
    for g in range(G):  # the query heads of the group, then their query tiles (see _smem_p_walk)
        h = hk * G + g
        for j in range(n_m):
            t = g * n_m + j
            boundary, m0, s, ph, q2, do2 = _step(t, j, lo, flo, fhi, hi, q_smem, do_smem, BLOCK_M, HEAD_DIM,
                                                 STAGES)
            mbarrier.wait(q_ready.index(s), ph)
            st_tok = warpgroup_mma(k2, q2.permute((1, 0)), st_zero, use_acc=False, is_async=True)
            mbarrier.wait(do_ready.index(s), ph)
            dpt_tok = warpgroup_mma(v2, do2.permute((1, 0)), st_zero, use_acc=False, is_async=True)

            # While the wgmmas run: this tile's LSE and delta.
            rows = m0 + gl.arange(0, BLOCK_M, layout=query_layout)
            if STATS_SMEM:
                row_ok, lse2, di = _stage_stats(lse_smem.index(s), delta_smem.index(s), rows, Sq, BLOCK_M, query_layout)
            else:
                row_ok, lse2, di = _query_stats(LSE, DELTA, b, h, rows, Sq, stride_lb, stride_lh)

            st, _k, _q = warpgroup_mma_wait(num_outstanding=1, deps=(st_tok, k2, q2))
            pt = gl.exp2(st * qk_scale - lse2[None, :])
            if boundary:  # a boundary tile: the rule, the sequence ends
                ok = row_ok[None, :] & (keys < Sk)[:, None]
                qp = rows
                qd = rows
                if CAUSAL or WINDOW > 0:
                    qp = gl.load(QPOS + rows, mask=row_ok, other=0).to(gl.int32)
                if DOCS:
                    qd = gl.load(QDOC + rows, mask=row_ok, other=-2)
                ok = ok & visible(qp[None, :], kp[:, None], qd[None, :], kd[:, None], wl, wr, CAUSAL, WINDOW, DOCS)
                pt = gl.where(ok, pt, 0.0)
            pt_op = gl.convert_layout(pt.to(dtype), op_layout)
            dv_tok = warpgroup_mma(pt_op, do2, dv, is_async=True)

            dpt, _v, _do = warpgroup_mma_wait(num_outstanding=1, deps=(dpt_tok, v2, do2))
            dst = pt * (dpt - di[None, :])
            dst_op = gl.convert_layout(dst.to(dtype), op_layout)
            dk_tok = warpgroup_mma(dst_op, q2, dk, is_async=True)

            dv, dk, _pt, _ds, _q2, _do2 = warpgroup_mma_wait(num_outstanding=0,
                                                             deps=(dv_tok, dk_tok, pt_op, dst_op, q2, do2))
            # Both warpgroups past their wgmmas on this slot before one thread hands it back.
            cta_barrier()
            mbarrier.arrive(q_empty.index(s))
            mbarrier.arrive(do_empty.index(s))

    _store_dkdv(dk * sm_scale, dv, DK, DV, b, hk, n0, Sk, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs,
                stride_vh, BLOCK_N, HEAD_DIM, ACCUMULATE, acc_layout)


@gluon.jit
def _store_dkdv(dk, dv, DK, DV, b, hk, n0, Sk, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
                BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr, ACCUMULATE: gl.constexpr, acc_layout: gl.constexpr):
    """Add into (or store) the float32 dK and dV of the program's keys."""
    rows_k = n0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, acc_layout))
    cols = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, acc_layout))
    mask = (rows_k < Sk)[:, None] & (cols < HEAD_DIM)[None, :]
    r64 = rows_k.to(gl.int64)[:, None]
    dk_ptrs = DK + b.to(gl.int64) * stride_kb + hk.to(gl.int64) * stride_kh + r64 * stride_ks + cols[None, :]
    dv_ptrs = DV + b.to(gl.int64) * stride_vb + hk.to(gl.int64) * stride_vh + r64 * stride_vs + cols[None, :]
    if ACCUMULATE:
        dk += gl.load(dk_ptrs, mask=mask, other=0.0)
        dv += gl.load(dv_ptrs, mask=mask, other=0.0)
    gl.store(dk_ptrs, dk.to(DK.dtype.element_ty), mask=mask)  # float32, or the inputs' dtype
    gl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=mask)


@gluon.jit
def _consumer_smem_p(LSE, DELTA, QPOS, KPOS, QDOC, KDOC, RANGES, BOUNDS, DK, DV,
                     k_smem, v_smem, q_smem, do_smem, p_smem, ds_smem, lse_smem, delta_smem,
                     kv_bar, q_ready, do_ready, q_empty,
                     do_empty, sm_scale, qk_scale, wl, wr, stride_lb, stride_lh, stride_kb, stride_ks, stride_kh,
                     stride_vb, stride_vs, stride_vh, H, G, Sq, Sk,
                     BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr, STAGES: gl.constexpr,
                     CAUSAL: gl.constexpr, WINDOW: gl.constexpr, DOCS: gl.constexpr, RANGED: gl.constexpr, ROWB: gl.constexpr,
                     ACCUMULATE: gl.constexpr, CONSUMER_WARPS: gl.constexpr, dtype: gl.constexpr,
                     STATS_SMEM: gl.constexpr,
                     dq_desc, dq_smem, dq_full, dq_empty, SEM, RANK, DQ_MODE: gl.constexpr):
    """The consumers with FA3's operand routes (``HOPPER_BWD_SMEM_P``): S = Q K^T and dP = dO V^T
    with the queries as rows, the two warpgroups splitting the keys (warpgroup w computes key
    columns 64w..64w+63, which are also its rows of dK and dV), so that a query's LSE and delta
    are two registers a thread rather than a column slice; P and dS go through shared memory,
    from where the dV and dK products read them transposed. Per query tile:

        issue S = Q K^T, dP = dO V^T
        wait(1): S done; P = exp2(S * scale - LSE2) (0 where masked); P -> p_smem
        issue dV += P^T dO                  (A: p_smem transposed)
        wait(1): dP done; dS = P * (dP * sm_scale - delta * sm_scale); dS -> ds_smem
        issue dK += dS^T Q                  (A: ds_smem transposed)
        wait(0); release Q and dO

    dS carries the softmax scale (an FFMA where the subtraction was), so that neither the dQ tile
    of every step nor dK at the end is multiplied by it (32 multiplies a step fewer at D = 128).

    With ``DQ_MODE`` > 0 the step ends in FA3's order instead:

        issue dQ = dS K                     (A: ds_smem)
        issue dK += dS^T Q
        wait(1): dV and dQ done; dQ tile -> dq_smem[t % 2] (once the writer has read it out);
                 release dO (dV was its last reader)                     <- overlaps dK
        wait(0); release Q

    With ``ROWB`` a boundary tile's P is masked by its query rows' runs of visible keys
    ([first, end) from ``BOUNDS``, two loads a row) instead of both sides' positions and
    documents; the launcher takes it under short windows only (``attention.HOPPER_BWD_ROW_BOUNDS``:
    with the ordered dQ, long walks slowed down with it).

    The partition barrier after each store orders every thread's writes (both warpgroups') before
    the wgmma or the TMA unit that reads them, and the waits retire those wgmmas before the next
    tile overwrites the tiles. Registers a consumer thread holds at D = 128 and 64 queries a step: dK and dV
    (64 + 64), S/P and dP (32 + 32), a query's LSE and delta (2 + 2); ptxas reports no spill
    (tests/test_kernels_hopper.py), where the transposed form spilled 356-700 bytes.
    """
    NW: gl.constexpr = CONSUMER_WARPS
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NW // 2, 2],
                                                       instr_shape=[16, BLOCK_N // 2, 16])
    acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NW, 1],
                                                         instr_shape=[16, HEAD_DIM, 16])
    query_layout: gl.constexpr = gl.SliceLayout(1, s_layout)
    key_layout: gl.constexpr = gl.SliceLayout(0, s_layout)

    b, hk, n0, n = _program(H, G, BLOCK_N, DQ_MODE >= 2)
    lo, flo, fhi, hi = ranges(RANGES, n, Sq, BLOCK_M, RANGED)
    n_m = (hi - lo) // BLOCK_M

    k2 = k_smem.reshape([BLOCK_N, HEAD_DIM])
    v2 = v_smem.reshape([BLOCK_N, HEAD_DIM])
    pt_smem = p_smem.permute((1, 0))
    dst_smem = ds_smem.permute((1, 0))
    s_zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=s_layout)
    dk = gl.zeros([BLOCK_N, HEAD_DIM], gl.float32, layout=acc_layout)
    dv = gl.zeros([BLOCK_N, HEAD_DIM], gl.float32, layout=acc_layout)
    # DQ_MODE > 0: dQ_tile = dS K, the warpgroups splitting the head dim
    dq_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NW // 2, 2],
                                                        instr_shape=[16, HEAD_DIM // 2, 16])
    dq_zero = s_zero  # (not read with DQ_MODE = 0)
    if DQ_MODE > 0 and HEAD_DIM != BLOCK_N:  # else the same shape and layout as S: one zero tile for both
        dq_zero = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, layout=dq_layout)

    mbarrier.wait(kv_bar, 0)
    # Padded keys (rows of K and V past Sk, zero-filled by TMA) score 0, so their P would be
    # exp2(-LSE2), which overflows float16 (and their dS with it) in rows of low LSE, and dQ = dS K
    # would then add inf * 0: every walk masks them (MASK 1 through the ranges, 2 at every step).
    if RANGED:
        dk, dv = _smem_p_walk(dk, dv, b, hk, n0, G, n_m, lo, flo, fhi, hi, k2, v2, q_smem, do_smem, p_smem,
                              ds_smem, pt_smem, dst_smem, lse_smem, delta_smem, q_ready, do_ready, q_empty,
                              do_empty, s_zero, dq_zero, LSE, DELTA, QPOS, KPOS, QDOC, KDOC, BOUNDS, sm_scale,
                              qk_scale, wl, wr, stride_lb, stride_lh, Sq, Sk, dq_smem, dq_full, dq_empty,
                              query_layout, key_layout, BLOCK_M, BLOCK_N, HEAD_DIM, STAGES, CAUSAL, WINDOW, DOCS,
                              ROWB, dtype, STATS_SMEM, DQ_MODE, 1)
    elif n0 + BLOCK_N > Sk:
        dk, dv = _smem_p_walk(dk, dv, b, hk, n0, G, n_m, lo, flo, fhi, hi, k2, v2, q_smem, do_smem, p_smem,
                              ds_smem, pt_smem, dst_smem, lse_smem, delta_smem, q_ready, do_ready, q_empty,
                              do_empty, s_zero, dq_zero, LSE, DELTA, QPOS, KPOS, QDOC, KDOC, BOUNDS, sm_scale,
                              qk_scale, wl, wr, stride_lb, stride_lh, Sq, Sk, dq_smem, dq_full, dq_empty,
                              query_layout, key_layout, BLOCK_M, BLOCK_N, HEAD_DIM, STAGES, CAUSAL, WINDOW, DOCS,
                              ROWB, dtype, STATS_SMEM, DQ_MODE, 2)
    else:
        dk, dv = _smem_p_walk(dk, dv, b, hk, n0, G, n_m, lo, flo, fhi, hi, k2, v2, q_smem, do_smem, p_smem,
                              ds_smem, pt_smem, dst_smem, lse_smem, delta_smem, q_ready, do_ready, q_empty,
                              do_empty, s_zero, dq_zero, LSE, DELTA, QPOS, KPOS, QDOC, KDOC, BOUNDS, sm_scale,
                              qk_scale, wl, wr, stride_lb, stride_lh, Sq, Sk, dq_smem, dq_full, dq_empty,
                              query_layout, key_layout, BLOCK_M, BLOCK_N, HEAD_DIM, STAGES, CAUSAL, WINDOW, DOCS,
                              ROWB, dtype, STATS_SMEM, DQ_MODE, 0)

    _store_dkdv(dk, dv, DK, DV, b, hk, n0, Sk, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs,
                stride_vh, BLOCK_N, HEAD_DIM, ACCUMULATE, acc_layout)


@gluon.jit
def _smem_p_walk(dk, dv, b, hk, n0, G, n_m, lo, flo, fhi, hi, k2, v2, q_smem, do_smem, p_smem, ds_smem, pt_smem,
                 dst_smem, lse_smem, delta_smem, q_ready, do_ready, q_empty, do_empty, s_zero, dq_zero,
                 LSE, DELTA, QPOS, KPOS, QDOC, KDOC, BOUNDS, sm_scale, qk_scale, wl, wr, stride_lb, stride_lh, Sq, Sk,
                 dq_smem, dq_full, dq_empty,
                 query_layout: gl.constexpr, key_layout: gl.constexpr,
                 BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr, STAGES: gl.constexpr,
                 CAUSAL: gl.constexpr, WINDOW: gl.constexpr, DOCS: gl.constexpr, ROWB: gl.constexpr,
                 dtype: gl.constexpr, STATS_SMEM: gl.constexpr, DQ_MODE: gl.constexpr, MASK: gl.constexpr):
    """The steps of :func:`_consumer_smem_p`'s program, the mask a constexpr so that each compiled
    walk holds only the masking it uses. ``MASK`` 1: the boundary tiles of the ranges take the rule
    (every tile of a key tile that runs past ``Sk`` is one, :func:`._common._query_ranges`); 2: no
    rule, every step zeroes the keys past ``Sk``; 0: nothing is masked.

    A call without ranges has no boundary but the sequence ends, and rows past ``Sq`` need no
    mask: their LSE of +inf already makes their P 0. With the masking inside the one loop under
    the runtime flag, ptxas predicated it into every step of such a call (38 selects a step at
    D = 128 on Triton 3.6: benchmarks/results/kernels_cpu_sass_loops/), so those calls take 2 in
    a program whose keys run past ``Sk`` and 0 in every other."""
    for g in range(G):  # the query heads of the group (one without GQA: Triton makes G = 1 a constant)
        h = hk * G + g
        for j in range(n_m):  # their query tiles
            t = g * n_m + j
            boundary, m0, s, ph, q2, do2 = _step(t, j, lo, flo, fhi, hi, q_smem, do_smem, BLOCK_M, HEAD_DIM,
                                                 STAGES, DQ_MODE >= 2)
            mbarrier.wait(q_ready.index(s), ph)
            s_tok = warpgroup_mma(q2, k2.permute((1, 0)), s_zero, use_acc=False, is_async=True)
            mbarrier.wait(do_ready.index(s), ph)
            dp_tok = warpgroup_mma(do2, v2.permute((1, 0)), s_zero, use_acc=False, is_async=True)

            rows = m0 + gl.arange(0, BLOCK_M, layout=query_layout)
            if STATS_SMEM:
                row_ok, lse2, di = _stage_stats(lse_smem.index(s), delta_smem.index(s), rows, Sq, BLOCK_M, query_layout)
            else:
                row_ok, lse2, di = _query_stats(LSE, DELTA, b, h, rows, Sq, stride_lb, stride_lh)

            st, _k, _q = warpgroup_mma_wait(num_outstanding=1, deps=(s_tok, k2, q2))
            p = gl.exp2(st * qk_scale - lse2[:, None])
            if MASK == 1:
                if boundary and ROWB:
                    # each query row's run of visible keys [first, end) (_row_bounds_kernel; end <= Sk):
                    # two loads a row and two compares an element, no key attribute
                    keys = n0 + gl.arange(0, BLOCK_N, layout=key_layout)
                    first = gl.load(BOUNDS + rows * 2, mask=row_ok, other=0)
                    end = gl.load(BOUNDS + rows * 2 + 1, mask=row_ok, other=0)
                    p = gl.where((keys[None, :] >= first[:, None]) & (keys[None, :] < end[:, None]), p, 0.0)
                elif boundary:  # a boundary tile: the rule, the sequence ends (key attributes loaded here only)
                    keys = n0 + gl.arange(0, BLOCK_N, layout=key_layout)
                    ok = row_ok[:, None] & (keys < Sk)[None, :]
                    qp = rows
                    qd = rows
                    kp = keys
                    kd = keys
                    if CAUSAL or WINDOW > 0:
                        qp = gl.load(QPOS + rows, mask=row_ok, other=0).to(gl.int32)
                        kp = gl.load(KPOS + keys, mask=keys < Sk, other=0).to(gl.int32)
                    if DOCS:
                        qd = gl.load(QDOC + rows, mask=row_ok, other=-2)
                        kd = gl.load(KDOC + keys, mask=keys < Sk, other=-1)
                    ok = ok & visible(qp[:, None], kp[None, :], qd[:, None], kd[None, :], wl, wr, CAUSAL, WINDOW, DOCS)
                    p = gl.where(ok, p, 0.0)
            elif MASK == 2:  # no rule: only the keys past the sequence end (rows past it have LSE +inf)
                keys = n0 + gl.arange(0, BLOCK_N, layout=key_layout)
                p = gl.where((keys < Sk)[None, :], p, 0.0)
            p_smem.store(p.to(dtype))
            fence_async_shared()
            cta_barrier()
            dv_tok = warpgroup_mma(pt_smem, do2, dv, is_async=True)

            dp, _v, _do = warpgroup_mma_wait(num_outstanding=1, deps=(dp_tok, v2, do2))
            ds = p * (dp * sm_scale - (di * sm_scale)[:, None])
            ds_smem.store(ds.to(dtype))
            fence_async_shared()
            cta_barrier()
            if DQ_MODE == 0:
                dk_tok = warpgroup_mma(dst_smem, q2, dk, is_async=True)
                dv, dk, _p, _ds, _q2, _do2 = warpgroup_mma_wait(num_outstanding=0,
                                                                deps=(dv_tok, dk_tok, pt_smem, dst_smem, q2, do2))
                cta_barrier()
                mbarrier.arrive(q_empty.index(s))
                mbarrier.arrive(do_empty.index(s))
            else:
                # dQ before dK (FA3's order): the dQ tile goes into shared memory while dK += dS^T Q
                # runs. Groups retire in order, so wait(1) leaves only the dK product in flight.
                dq_tok = warpgroup_mma(ds_smem, k2, dq_zero, use_acc=False, is_async=True)
                dk_tok = warpgroup_mma(dst_smem, q2, dk, is_async=True)
                dv, dq, _p, _do2, _k2 = warpgroup_mma_wait(num_outstanding=1, deps=(dv_tok, dq_tok, pt_smem, do2, k2))
                # The dQ tile into its buffer once the writer's reduction from it two steps ago has
                # read it; the writer adds it (_dq_writer), so no wait for the addition lands here.
                buf = t % 2
                mbarrier.wait(dq_empty.index(buf), ((t // 2) & 1) ^ 1)
                dq_smem.index(buf).reshape([BLOCK_M, HEAD_DIM]).store(dq)
                fence_async_shared()  # the generic-proxy writes before the TMA unit reads them
                cta_barrier()  # also: both warpgroups past their dV products, the last readers of dO
                mbarrier.arrive(dq_full.index(buf))
                mbarrier.arrive(do_empty.index(s))
                dk, _ds, _q2 = warpgroup_mma_wait(num_outstanding=0, deps=(dk_tok, dst_smem, q2))
                cta_barrier()  # both warpgroups past their dK products, the last readers of Q
                mbarrier.arrive(q_empty.index(s))

    return dk, dv


@gluon.jit
def _dq_writer(q_desc, k_desc, v_desc, do_desc, LSE, DELTA, QPOS, KPOS, QDOC, KDOC, RANGES, BOUNDS, DK, DV,
               k_smem, v_smem, q_smem, do_smem, p_smem, ds_smem, lse_smem, delta_smem,
               kv_bar, q_ready, do_ready, q_empty, do_empty,
               sm_scale, qk_scale, wl, wr, stride_lb, stride_lh, stride_kb, stride_ks, stride_kh,
               stride_vb, stride_vs, stride_vh, H, G, Sq, Sk,
               BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr, STAGES: gl.constexpr,
               CAUSAL: gl.constexpr, WINDOW: gl.constexpr, DOCS: gl.constexpr, RANGED: gl.constexpr, ROWB: gl.constexpr,
               ACCUMULATE: gl.constexpr, CONSUMER_WARPS: gl.constexpr, SMEM_P: gl.constexpr,
               STATS_SMEM: gl.constexpr,
               dq_desc, dq_smem, dq_full, dq_empty, SEM, RANK, DQ_MODE: gl.constexpr,
               DQ_WRITERS: gl.constexpr, W: gl.constexpr):
    """The dQ writer (DQ_MODE > 0), one warp: each step's dQ tile, once the consumers have put it
    in its buffer (``dq_full``), added into the float32 dQ with one bulk TMA reduction; the buffer
    goes back (``dq_empty``) once the reduction has read it. With DQ_MODE >= 2 the additions into
    a query tile come from the last key tile down: the writer waits until the counter of (batch,
    query head, query tile) says that the higher key tiles that walk it (``RANK``, or all higher
    ones without ranges) have added theirs, adds, waits until its addition has landed, and counts
    itself in; it polls the counter with plain acquire loads (an atomic read of it, the form
    before, ran the backward 2-4% slower). Those programs were launched before this one (the grid
    runs key tiles fastest, the last first), so the wait ends. The consumers go on meanwhile, two
    buffers ahead at most.

    Ordered, one writer has one addition in flight: once an addition takes longer to land than
    the consumers take for a step, the writer sets the pace (benchmarks/model_dq_writer.py: 1.5x
    the time at 1.5 steps). With ``DQ_WRITERS`` = 2 (``attention.HOPPER_BWD_DQ_WRITERS``) two
    writers, ``W`` = 0 and 1, take the even and the odd steps, each with its own buffer: two
    additions in flight, into two different query tiles, each still added after the higher key
    tiles' and counted in once landed, so the sum and its order are the same. With DQ_MODE = 3 the
    first addition into a query tile (no higher key tile walks it) stores the tile instead."""
    b, hk, n0, n = _program(H, G, BLOCK_N, DQ_MODE >= 2)
    lo, flo, fhi, hi = ranges(RANGES, n, Sq, BLOCK_M, RANGED)
    n_m = (hi - lo) // BLOCK_M
    n_q = (Sq + BLOCK_M - 1) // BLOCK_M
    for t in range(W, G * n_m, DQ_WRITERS):  # with two writers, buffer t % 2 is this writer's
        h = hk * G + t // n_m
        m0, _boundary = _tile(t % n_m, lo, flo, fhi, hi, BLOCK_M, DQ_MODE >= 2)
        buf = t % 2
        mbarrier.wait(dq_full.index(buf), (t // 2) & 1)
        if DQ_MODE >= 2:
            sem = SEM + (b * H + h) * n_q + m0 // BLOCK_M
            want = gl.num_programs(0) - 1 - n
            if RANGED:
                want = gl.load(RANK + n * n_q + m0 // BLOCK_M)
            seen = load_acquire(sem)
            while seen != want:
                seen = load_acquire(sem)
        if DQ_MODE == 3:
            if want == 0:  # the first addition into this query tile: a plain store (dQ was not set)
                tma_store(dq_desc, [b, m0, h, 0], dq_smem.index(buf))
            else:
                tma_reduce_add(dq_desc, [b, m0, h, 0], dq_smem.index(buf))
        else:
            tma_reduce_add(dq_desc, [b, m0, h, 0], dq_smem.index(buf))
        if DQ_MODE >= 2:
            bulk_wait()  # the addition has landed in global memory
            fence_gpu()
            gl.atomic_add(sem, 1, sem="release")
        else:
            tma.store_wait(0)  # the reduction has read the buffer
        mbarrier.arrive(dq_empty.index(buf))


@gluon.jit
def _attn_bwd_dkdv_hopper(q_desc, k_desc, v_desc, do_desc, LSE, DELTA, QPOS, KPOS, QDOC, KDOC, RANGES, BOUNDS, DK, DV,
                          sm_scale, qk_scale, wl, wr, stride_lb, stride_lh, stride_kb, stride_ks, stride_kh,
                          stride_vb, stride_vs, stride_vh, H, G, Sq, Sk, dq_desc, SEM, RANK,
                          BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr,
                          STAGES: gl.constexpr, CAUSAL: gl.constexpr, WINDOW: gl.constexpr, DOCS: gl.constexpr,
                          RANGED: gl.constexpr, ROWB: gl.constexpr, ACCUMULATE: gl.constexpr,
                          PRODUCER_WARPS: gl.constexpr, PRODUCER_REGS: gl.constexpr,
                          CONSUMER_WARPS: gl.constexpr, SMEM_P: gl.constexpr, STATS_SMEM: gl.constexpr,
                          P_LAYOUT: gl.constexpr,
                          DQ_MODE: gl.constexpr, DQ_WRITERS: gl.constexpr):
    gl.static_assert(SMEM_P or DQ_MODE == 0, "dQ in the dK/dV program needs FA3's routes (SMEM_P)")
    gl.static_assert(DQ_WRITERS == 1 or (DQ_WRITERS == 2 and DQ_MODE > 0), "one or two dQ writers (DQ_MODE > 0)")
    gl.static_assert(SMEM_P or not ROWB, "row bounds are read by FA3's routes (SMEM_P) only")
    dtype: gl.constexpr = q_desc.dtype
    k_smem = gl.allocate_shared_memory(dtype, k_desc.block_type.shape, k_desc.layout)
    v_smem = gl.allocate_shared_memory(dtype, v_desc.block_type.shape, v_desc.layout)
    q_smem = gl.allocate_shared_memory(dtype, [STAGES] + q_desc.block_type.shape, q_desc.layout)
    do_smem = gl.allocate_shared_memory(dtype, [STAGES] + do_desc.block_type.shape, do_desc.layout)
    if SMEM_P:  # P and dS of one query tile, (queries x keys)
        p_smem = gl.allocate_shared_memory(dtype, [BLOCK_M, BLOCK_N], P_LAYOUT)
        ds_smem = gl.allocate_shared_memory(dtype, [BLOCK_M, BLOCK_N], P_LAYOUT)
    else:
        p_smem = k_smem  # never read
        ds_smem = k_smem
    if STATS_SMEM:  # each stage's LSE and delta rows, loaded with its Q and dO (LSE, DELTA: descriptors)
        lse_smem = gl.allocate_shared_memory(gl.float32, [STAGES] + LSE.block_type.shape, LSE.layout)
        delta_smem = gl.allocate_shared_memory(gl.float32, [STAGES] + DELTA.block_type.shape, DELTA.layout)
    else:
        lse_smem = k_smem  # never read
        delta_smem = k_smem
    if DQ_MODE > 0:  # two float32 dQ tiles, the sources of the writer's reductions
        dq_smem = gl.allocate_shared_memory(gl.float32, [2] + dq_desc.block_type.shape, dq_desc.layout)
    else:
        dq_smem = k_smem  # never read
    dq_full = barriers(2, 1)
    dq_empty = barriers(2, 1)

    kv_bars = barriers(1, 1)
    kv_bar = kv_bars.index(0)
    q_ready = barriers(STAGES, 1)
    do_ready = barriers(STAGES, 1)
    q_empty = barriers(STAGES, 1)
    do_empty = barriers(STAGES, 1)
    fence_async_shared()

    # Argument tuples written out in the call (see _fwd_hopper.py: constexprs stay constexprs).
    if DQ_WRITERS == 2:  # a second writer, one warp, for the odd steps
        gl.warp_specialize(
            [
                (_consumer, (q_desc, k_desc, v_desc, do_desc, LSE, DELTA, QPOS, KPOS, QDOC, KDOC, RANGES, BOUNDS, DK, DV,
                             k_smem, v_smem, q_smem, do_smem, p_smem, ds_smem, lse_smem, delta_smem,
                             kv_bar, q_ready, do_ready, q_empty, do_empty,
                             sm_scale, qk_scale, wl, wr, stride_lb, stride_lh, stride_kb, stride_ks, stride_kh,
                             stride_vb, stride_vs, stride_vh, H, G, Sq, Sk, BLOCK_M, BLOCK_N, HEAD_DIM, STAGES,
                             CAUSAL, WINDOW, DOCS, RANGED, ROWB, ACCUMULATE, CONSUMER_WARPS, SMEM_P, STATS_SMEM,
                             dq_desc, dq_smem, dq_full, dq_empty, SEM, RANK, DQ_MODE, DQ_WRITERS, 0)),
                (_producer, (q_desc, k_desc, v_desc, do_desc, LSE, DELTA, QPOS, KPOS, QDOC, KDOC, RANGES, BOUNDS, DK, DV,
                             k_smem, v_smem, q_smem, do_smem, p_smem, ds_smem, lse_smem, delta_smem,
                             kv_bar, q_ready, do_ready, q_empty, do_empty,
                             sm_scale, qk_scale, wl, wr, stride_lb, stride_lh, stride_kb, stride_ks, stride_kh,
                             stride_vb, stride_vs, stride_vh, H, G, Sq, Sk, BLOCK_M, BLOCK_N, HEAD_DIM, STAGES,
                             CAUSAL, WINDOW, DOCS, RANGED, ROWB, ACCUMULATE, CONSUMER_WARPS, SMEM_P, STATS_SMEM,
                             dq_desc, dq_smem, dq_full, dq_empty, SEM, RANK, DQ_MODE, DQ_WRITERS, 0)),
                (_dq_writer, (q_desc, k_desc, v_desc, do_desc, LSE, DELTA, QPOS, KPOS, QDOC, KDOC, RANGES, BOUNDS, DK, DV,
                              k_smem, v_smem, q_smem, do_smem, p_smem, ds_smem, lse_smem, delta_smem,
                              kv_bar, q_ready, do_ready, q_empty, do_empty,
                              sm_scale, qk_scale, wl, wr, stride_lb, stride_lh, stride_kb, stride_ks, stride_kh,
                              stride_vb, stride_vs, stride_vh, H, G, Sq, Sk, BLOCK_M, BLOCK_N, HEAD_DIM, STAGES,
                              CAUSAL, WINDOW, DOCS, RANGED, ROWB, ACCUMULATE, CONSUMER_WARPS, SMEM_P, STATS_SMEM,
                              dq_desc, dq_smem, dq_full, dq_empty, SEM, RANK, DQ_MODE, DQ_WRITERS, 0)),
                (_dq_writer, (q_desc, k_desc, v_desc, do_desc, LSE, DELTA, QPOS, KPOS, QDOC, KDOC, RANGES, BOUNDS, DK, DV,
                              k_smem, v_smem, q_smem, do_smem, p_smem, ds_smem, lse_smem, delta_smem,
                              kv_bar, q_ready, do_ready, q_empty, do_empty,
                              sm_scale, qk_scale, wl, wr, stride_lb, stride_lh, stride_kb, stride_ks, stride_kh,
                              stride_vb, stride_vs, stride_vh, H, G, Sq, Sk, BLOCK_M, BLOCK_N, HEAD_DIM, STAGES,
                              CAUSAL, WINDOW, DOCS, RANGED, ROWB, ACCUMULATE, CONSUMER_WARPS, SMEM_P, STATS_SMEM,
                              dq_desc, dq_smem, dq_full, dq_empty, SEM, RANK, DQ_MODE, DQ_WRITERS, 1)),
            ],
            [PRODUCER_WARPS, 1, 1], [PRODUCER_REGS, PRODUCER_REGS, PRODUCER_REGS])
    elif DQ_MODE > 0:
        gl.warp_specialize(
            [
                (_consumer, (q_desc, k_desc, v_desc, do_desc, LSE, DELTA, QPOS, KPOS, QDOC, KDOC, RANGES, BOUNDS, DK, DV,
                             k_smem, v_smem, q_smem, do_smem, p_smem, ds_smem, lse_smem, delta_smem,
                             kv_bar, q_ready, do_ready, q_empty, do_empty,
                             sm_scale, qk_scale, wl, wr, stride_lb, stride_lh, stride_kb, stride_ks, stride_kh,
                             stride_vb, stride_vs, stride_vh, H, G, Sq, Sk, BLOCK_M, BLOCK_N, HEAD_DIM, STAGES,
                             CAUSAL, WINDOW, DOCS, RANGED, ROWB, ACCUMULATE, CONSUMER_WARPS, SMEM_P, STATS_SMEM,
                             dq_desc, dq_smem, dq_full, dq_empty, SEM, RANK, DQ_MODE, DQ_WRITERS, 0)),
                (_producer, (q_desc, k_desc, v_desc, do_desc, LSE, DELTA, QPOS, KPOS, QDOC, KDOC, RANGES, BOUNDS, DK, DV,
                             k_smem, v_smem, q_smem, do_smem, p_smem, ds_smem, lse_smem, delta_smem,
                             kv_bar, q_ready, do_ready, q_empty, do_empty,
                             sm_scale, qk_scale, wl, wr, stride_lb, stride_lh, stride_kb, stride_ks, stride_kh,
                             stride_vb, stride_vs, stride_vh, H, G, Sq, Sk, BLOCK_M, BLOCK_N, HEAD_DIM, STAGES,
                             CAUSAL, WINDOW, DOCS, RANGED, ROWB, ACCUMULATE, CONSUMER_WARPS, SMEM_P, STATS_SMEM,
                             dq_desc, dq_smem, dq_full, dq_empty, SEM, RANK, DQ_MODE, DQ_WRITERS, 0)),
                (_dq_writer, (q_desc, k_desc, v_desc, do_desc, LSE, DELTA, QPOS, KPOS, QDOC, KDOC, RANGES, BOUNDS, DK, DV,
                              k_smem, v_smem, q_smem, do_smem, p_smem, ds_smem, lse_smem, delta_smem,
                              kv_bar, q_ready, do_ready, q_empty, do_empty,
                              sm_scale, qk_scale, wl, wr, stride_lb, stride_lh, stride_kb, stride_ks, stride_kh,
                              stride_vb, stride_vs, stride_vh, H, G, Sq, Sk, BLOCK_M, BLOCK_N, HEAD_DIM, STAGES,
                              CAUSAL, WINDOW, DOCS, RANGED, ROWB, ACCUMULATE, CONSUMER_WARPS, SMEM_P, STATS_SMEM,
                              dq_desc, dq_smem, dq_full, dq_empty, SEM, RANK, DQ_MODE, DQ_WRITERS, 0)),
            ],
            [PRODUCER_WARPS, 1], [PRODUCER_REGS, PRODUCER_REGS])
    else:
        gl.warp_specialize(
            [
                (_consumer, (q_desc, k_desc, v_desc, do_desc, LSE, DELTA, QPOS, KPOS, QDOC, KDOC, RANGES, BOUNDS, DK, DV,
                             k_smem, v_smem, q_smem, do_smem, p_smem, ds_smem, lse_smem, delta_smem,
                             kv_bar, q_ready, do_ready, q_empty, do_empty,
                             sm_scale, qk_scale, wl, wr, stride_lb, stride_lh, stride_kb, stride_ks, stride_kh,
                             stride_vb, stride_vs, stride_vh, H, G, Sq, Sk, BLOCK_M, BLOCK_N, HEAD_DIM, STAGES,
                             CAUSAL, WINDOW, DOCS, RANGED, ROWB, ACCUMULATE, CONSUMER_WARPS, SMEM_P, STATS_SMEM,
                             dq_desc, dq_smem, dq_full, dq_empty, SEM, RANK, DQ_MODE, DQ_WRITERS, 0)),
                (_producer, (q_desc, k_desc, v_desc, do_desc, LSE, DELTA, QPOS, KPOS, QDOC, KDOC, RANGES, BOUNDS, DK, DV,
                             k_smem, v_smem, q_smem, do_smem, p_smem, ds_smem, lse_smem, delta_smem,
                             kv_bar, q_ready, do_ready, q_empty, do_empty,
                             sm_scale, qk_scale, wl, wr, stride_lb, stride_lh, stride_kb, stride_ks, stride_kh,
                             stride_vb, stride_vs, stride_vh, H, G, Sq, Sk, BLOCK_M, BLOCK_N, HEAD_DIM, STAGES,
                             CAUSAL, WINDOW, DOCS, RANGED, ROWB, ACCUMULATE, CONSUMER_WARPS, SMEM_P, STATS_SMEM,
                             dq_desc, dq_smem, dq_full, dq_empty, SEM, RANK, DQ_MODE, DQ_WRITERS, 0)),
            ],
            [PRODUCER_WARPS], [PRODUCER_REGS])

    invalidate(kv_bars, 1)
    invalidate(q_ready, STAGES)
    invalidate(do_ready, STAGES)
    invalidate(q_empty, STAGES)
    invalidate(do_empty, STAGES)
    invalidate(dq_full, 2)
    invalidate(dq_empty, 2)
