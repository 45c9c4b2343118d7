"""Backward dQ kernel for Hopper (sm_90) in Gluon: the contract of :mod:`._bwd`'s dQ programs
(dQ recomputed from Q K^T and dO V^T, no atomics, so bitwise repeatable), on TMA loads and
asynchronous wgmma with a producer warp.

One program owns ``BLOCK_M`` = 128 query rows of one (batch, head) and walks the key tiles they
can see, in :mod:`._fwd_hopper`'s order and from the same tile ranges. Partitions as there: 2
consumer warpgroups (64 query rows each, with their rows of dQ in float32 registers) and a
1-warp TMA producer that loads Q and dO once, then K and V of every key tile into ``STAGES``
slots (``k_ready``/``v_ready``, released through ``k_empty``/``v_empty``, parities as in
:mod:`._fwd_hopper`).

Per key tile:

    issue S  = Q K^T                     (after k_ready)
    issue dP = dO V^T                    (after v_ready)
    wait(1): S done; P = exp2(S * scale - LSE2) (0 where masked)   <- overlaps dP
    wait(0): dP done; partition barrier; release V; dS = P * (dP - delta)
    issue dQ += dS K; wait(0); partition barrier; release K
    ... and at the end dQ *= softmax scale; add into (or store) the float32 dQ.
"""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    warpgroup_mma,
    warpgroup_mma_wait,
)

from ._hopper_common import (LOG2E, barriers, cta_barrier, invalidate, load_kv_tiles, query_program, ranges,
                             tile_start, tma_load, visible)


@gluon.jit
def _producer(q_desc, k_desc, v_desc, do_desc, LSE, DELTA, QPOS, KPOS, QDOC, KDOC, RANGES, DQ,
              q_smem, do_smem, k_smem, v_smem, q_bar, k_ready, v_ready, k_empty, v_empty,
              sm_scale, qk_scale, wl, wr, stride_lb, stride_lh, stride_qb, stride_qs, stride_qh, H, G, Sq, Sk, SWIZZLE,
              BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr, STAGES: gl.constexpr,
              CAUSAL: gl.constexpr, WINDOW: gl.constexpr, DOCS: gl.constexpr, RANGED: gl.constexpr,
              ACCUMULATE: gl.constexpr, CONSUMER_WARPS: gl.constexpr):
    b, h, hk, m0, pid_m = query_program(H, G, Sq, SWIZZLE, BLOCK_M, CAUSAL)
    lo, flo, fhi, hi = ranges(RANGES, pid_m, Sk, BLOCK_N, RANGED)

    mbarrier.expect(q_bar, q_desc.block_type.nbytes + do_desc.block_type.nbytes)
    tma_load(q_desc, [b, m0, h, 0], q_bar, q_smem)
    tma_load(do_desc, [b, m0, h, 0], q_bar, do_smem)
    load_kv_tiles(k_desc, v_desc, k_smem, v_smem, k_ready, v_ready, k_empty, v_empty, b, hk, lo, flo, fhi, hi,
                  BLOCK_N, STAGES)


@gluon.jit
def _consumer(q_desc, k_desc, v_desc, do_desc, LSE, DELTA, QPOS, KPOS, QDOC, KDOC, RANGES, DQ,
              q_smem, do_smem, k_smem, v_smem, q_bar, k_ready, v_ready, k_empty, v_empty,
              sm_scale, qk_scale, wl, wr, stride_lb, stride_lh, stride_qb, stride_qs, stride_qh, H, G, Sq, Sk, SWIZZLE,
              BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr, STAGES: gl.constexpr,
              CAUSAL: gl.constexpr, WINDOW: gl.constexpr, DOCS: gl.constexpr, RANGED: gl.constexpr,
              ACCUMULATE: gl.constexpr, CONSUMER_WARPS: gl.constexpr):
    NW: gl.constexpr = CONSUMER_WARPS
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NW, 1],
                                                       instr_shape=[16, BLOCK_N, 16])
    acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NW, 1],
                                                         instr_shape=[16, HEAD_DIM, 16])
    op_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_layout, k_width=2)
    row_layout: gl.constexpr = gl.SliceLayout(1, s_layout)
    col_layout: gl.constexpr = gl.SliceLayout(0, s_layout)
    dtype: gl.constexpr = q_desc.dtype

    b, h, hk, m0, pid_m = query_program(H, G, Sq, SWIZZLE, BLOCK_M, CAUSAL)
    lo, flo, fhi, hi = ranges(RANGES, pid_m, Sk, BLOCK_N, RANGED)
    n = (hi - lo) // BLOCK_N
    n_full = (fhi - flo) // BLOCK_N

    rows = m0 + gl.arange(0, BLOCK_M, layout=row_layout)
    row_ok = rows < Sq
    qp = rows
    qd = rows
    if CAUSAL or WINDOW > 0:
        qp = gl.load(QPOS + rows, mask=row_ok, other=0).to(gl.int32)
    if DOCS:
        qd = gl.load(QDOC + rows, mask=row_ok, other=-2)
    l_row = b.to(gl.int64) * stride_lb + h.to(gl.int64) * stride_lh + rows
    lse = gl.load(LSE + l_row, mask=row_ok, other=float("inf"))
    lse2 = gl.where(lse == float("-inf"), float("inf"), lse * LOG2E)  # a row that sees nothing: P = 0
    di = gl.load(DELTA + l_row, mask=row_ok, other=0.0)

    q2 = q_smem.reshape([BLOCK_M, HEAD_DIM])
    do2 = do_smem.reshape([BLOCK_M, HEAD_DIM])
    s_zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=s_layout)
    dq = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, layout=acc_layout)

    mbarrier.wait(q_bar, 0)
    for j in range(n):
        s = j % STAGES
        ph = (j // STAGES) & 1
        k2 = k_smem.index(s).reshape([BLOCK_N, HEAD_DIM])
        v2 = v_smem.index(s).reshape([BLOCK_N, HEAD_DIM])

        mbarrier.wait(k_ready.index(s), ph)
        s_tok = warpgroup_mma(q2, k2.permute((1, 0)), s_zero, use_acc=False, is_async=True)
        mbarrier.wait(v_ready.index(s), ph)
        dp_tok = warpgroup_mma(do2, v2.permute((1, 0)), s_zero, use_acc=False, is_async=True)

        sc, _q, _k = warpgroup_mma_wait(num_outstanding=1, deps=(s_tok, q2, k2))
        p = gl.exp2(sc * qk_scale - lse2[:, None])
        if j >= n_full:  # a boundary tile: the rule, the sequence ends
            cols = tile_start(j, lo, flo, fhi, hi, BLOCK_N) + gl.arange(0, BLOCK_N, layout=col_layout)
            inside = cols < Sk
            kp = cols
            kd = cols
            if CAUSAL or WINDOW > 0:
                kp = gl.load(KPOS + cols, mask=inside, other=0).to(gl.int32)
            if DOCS:
                kd = gl.load(KDOC + cols, mask=inside, other=-1)
            ok = inside[None, :] & visible(qp[:, None], kp[None, :], qd[:, None], kd[None, :], wl, wr,
                                           CAUSAL, WINDOW, DOCS)
            p = gl.where(ok, p, 0.0)

        dp, _do, _v = warpgroup_mma_wait(num_outstanding=0, deps=(dp_tok, do2, v2))
        cta_barrier()
        mbarrier.arrive(v_empty.index(s))
        ds = p * (dp - di[:, None])
        ds_op = gl.convert_layout(ds.to(dtype), op_layout)
        dq_tok = warpgroup_mma(ds_op, k2, dq, is_async=True)
        dq, _ds, _k2 = warpgroup_mma_wait(num_outstanding=0, deps=(dq_tok, ds_op, k2))
        cta_barrier()
        mbarrier.arrive(k_empty.index(s))

    dq = dq * sm_scale
    rows_o = m0 + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, acc_layout))
    cols_o = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, acc_layout))
    mask = (rows_o < Sq)[:, None] & (cols_o < HEAD_DIM)[None, :]
    ptrs = (DQ + b.to(gl.int64) * stride_qb + h.to(gl.int64) * stride_qh
            + rows_o.to(gl.int64)[:, None] * stride_qs + cols_o[None, :])
    if ACCUMULATE:
        dq += gl.load(ptrs, mask=mask, other=0.0)
    gl.store(ptrs, dq.to(DQ.dtype.element_ty), mask=mask)  # float32, or the inputs' dtype


@gluon.jit
def _attn_bwd_dq_hopper(q_desc, k_desc, v_desc, do_desc, LSE, DELTA, QPOS, KPOS, QDOC, KDOC, RANGES, DQ,
                        sm_scale, qk_scale, wl, wr, stride_lb, stride_lh, stride_qb, stride_qs, stride_qh,
                        H, G, Sq, Sk, SWIZZLE,
                        BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr,
                        STAGES: gl.constexpr, CAUSAL: gl.constexpr, WINDOW: gl.constexpr, DOCS: gl.constexpr,
                        RANGED: gl.constexpr, ACCUMULATE: gl.constexpr,
                        PRODUCER_WARPS: gl.constexpr, PRODUCER_REGS: gl.constexpr,
                        CONSUMER_WARPS: gl.constexpr):
    dtype: gl.constexpr = q_desc.dtype
    q_smem = gl.allocate_shared_memory(dtype, q_desc.block_type.shape, q_desc.layout)
    do_smem = gl.allocate_shared_memory(dtype, do_desc.block_type.shape, do_desc.layout)
    k_smem = gl.allocate_shared_memory(dtype, [STAGES] + k_desc.block_type.shape, k_desc.layout)
    v_smem = gl.allocate_shared_memory(dtype, [STAGES] + v_desc.block_type.shape, v_desc.layout)

    q_bars = barriers(1, 1)
    q_bar = q_bars.index(0)
    k_ready = barriers(STAGES, 1)
    v_ready = barriers(STAGES, 1)
    k_empty = barriers(STAGES, 1)
    v_empty = barriers(STAGES, 1)
    fence_async_shared()

    gl.warp_specialize(
        [
            (_consumer, (q_desc, k_desc, v_desc, do_desc, LSE, DELTA, QPOS, KPOS, QDOC, KDOC, RANGES, DQ,
                         q_smem, do_smem, k_smem, v_smem, q_bar, k_ready, v_ready, k_empty, v_empty,
                         sm_scale, qk_scale, wl, wr, stride_lb, stride_lh, stride_qb, stride_qs, stride_qh,
                         H, G, Sq, Sk, SWIZZLE, BLOCK_M, BLOCK_N, HEAD_DIM, STAGES, CAUSAL, WINDOW, DOCS, RANGED,
                         ACCUMULATE, CONSUMER_WARPS)),
            (_producer, (q_desc, k_desc, v_desc, do_desc, LSE, DELTA, QPOS, KPOS, QDOC, KDOC, RANGES, DQ,
                         q_smem, do_smem, k_smem, v_smem, q_bar, k_ready, v_ready, k_empty, v_empty,
                         sm_scale, qk_scale, wl, wr, stride_lb, stride_lh, stride_qb, stride_qs, stride_qh,
                         H, G, Sq, Sk, SWIZZLE, BLOCK_M, BLOCK_N, HEAD_DIM, STAGES, CAUSAL, WINDOW, DOCS, RANGED,
                         ACCUMULATE, CONSUMER_WARPS)),
        ],
        [PRODUCER_WARPS], [PRODUCER_REGS])

    invalidate(q_bars, 1)
    invalidate(k_ready, STAGES)
    invalidate(v_ready, STAGES)
    invalidate(k_empty, STAGES)
    invalidate(v_empty, STAGES)
