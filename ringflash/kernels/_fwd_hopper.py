"""Forward kernel for Hopper (sm_90) in Gluon, with FlashAttention-3's schedule.

It serves the same contract as :mod:`._fwd` (float32 partials, a natural-log LSE, an in-place
fold into a running result, positions, windows and documents through the tile ranges of
:func:`._common._ranges_kernel`, shared or per head as QK-dropping and hash buckets give them,
:func:`._hopper_common.head_attrs`) for bfloat16/float16 at head dims 64 and 128; the launcher
(:mod:`.attention`) sends everything else to the Triton kernel. Gluon kernels do not run under
Triton's CPU interpreter: on the CPU they are only compiled (tests/test_kernels_hopper.py).

One program owns ``BLOCK_M`` = 128 query rows of one (batch, head) and walks the key tiles
those rows can see. Two partitions (``gl.warp_specialize``):

* the default partition, 8 warps = 2 consumer warpgroups. The wgmma layout stacks the warps
  along the rows (16 rows a warp), so warpgroup 0 owns rows 0-63 and warpgroup 1 rows 64-127 of
  one shared Q tile; each issues its own m64 wgmmas, and the online softmax is row-local.
* a worker partition, 1 warp with 24 registers (``setmaxnreg`` hands the rest to the
  consumers): the TMA producer. It loads Q once, then K and V tiles into ``STAGES`` slots.

Barriers, of count 1 unless said. A TMA load completes a "ready" barrier through its byte count; the
consumer's arrive completes an "empty" one:

* ``q_bar``: Q landed.
* ``k_ready[s]``, ``v_ready[s]``: the K / V tile of slot s landed.
* ``k_empty[s]``, ``v_empty[s]``: the wgmma reading K / V of slot s retired, the slot may be
  refilled. K and V are released apart because K_j is done one softmax before V_j (below).

Tile j sits in slot ``j % STAGES`` in round ``j // STAGES``; waiters wait that round's parity.
The producer waits the empty barriers with the parity flipped, so its first round passes at once
(a fresh mbarrier counts as having completed the phase before phase 0).

The consumer overlaps the softmax of tile j with the PV product of tile j - 1 (FA3's
intra-warpgroup overlap); wgmma groups retire in order, so waiting for "one outstanding"
after issuing S_j and then PV_{j-1} means S_j is done while PV_{j-1} may still run:

    S_0 = Q K_0^T; wait; release K_0; P_0 = softmax(S_0)
    for j = 1 .. n-1:
        issue S_j = Q K_j^T               (after k_ready[j])
        issue O += P_{j-1} V_{j-1}        (after v_ready[j-1]; P from registers, made 16-bit
                                           just before: it crosses the loop in float32)
        wait(1): S_j done; release K_j; P_j, alpha_j = softmax(S_j)   <- overlaps PV_{j-1}
        wait(0): O done; release V_{j-1}; O *= alpha_j
    O += P_{n-1} V_{n-1}; wait; release V_{n-1}

Before each release both warpgroups pass a partition-wide barrier: the arrive is one thread's,
and the other warpgroup's wgmma may still read the slot.

Variants (constexprs, to be measured against each other):

* ``SPLIT = 2``: a consumer partition per warpgroup (4 warps, 64 rows, its own Q tile of
  ``BLOCK_M / 2`` rows). The empty barriers then count 2 arrives, one per warpgroup, and no
  barrier spans both warpgroups: each releases a slot when its own wgmmas on it have retired.
  ``SPLIT = 3`` (a launch config of 12 consumer warps, ``BLOCK_M`` = 192): three such partitions,
  FA3's tile at D = 64, where a step's products are short beside its softmax and a third
  warpgroup has its softmax to run while the other two's products occupy the tensor cores. The
  register file then gives each consumer thread about 160 registers instead of 240.
* ``PINGPONG`` (with ``SPLIT = 2``): FA3's inter-warpgroup ping-pong. The two warpgroups take
  turns issuing their products (S_j and PV_{j-1}, or the peeled S_0, or the last PV): warpgroup w
  waits ``turn[w]`` before issuing and arrives on ``turn[1 - w]`` once all its warps have issued,
  warpgroup 0 first (its first wait is on the phase before a fresh barrier's first). Each then
  waits for its own results and runs its softmax while the other's products occupy the tensor
  cores. Neither can get two turns ahead, so the parity of a turn never aliases.
* ``PERSISTENT`` (not with ``PINGPONG``): one program per SM works through (query tile, head)
  items drawn from a global counter (``COUNTER``, zeroed by the launcher), in the order of the
  one-program-per-tile grid (:func:`._hopper_common.item_program`). Two Q slots: the producer
  waits ``q_empties[s]`` (every consumer partition has retired its last QK^T of the item that
  used slot s before), writes the item's index into its slot s after ``COUNTER[0]`` (global
  memory, read back by the same SM's consumers), and loads its Q into slot s
  (completing ``q_bars[s]``) and its K/V tiles after the last item's, continuing the slot rounds
  (``j0``: the tiles loaded before). So the next item's loads run while the consumers finish the
  last item's PV and epilogue. The consumers wait ``q_bars[t % 2]`` with the parity of
  ``t // 2`` and read the index there; an index of ``N_ITEMS`` (with no Q) ends both loops.

Key tiles come boundary first: ``[fhi, hi)`` and ``[lo, flo)`` (the mask rule on positions and
document ids, and the sequence end), then ``[flo, fhi)`` fully visible (no mask arithmetic). The
first tile is peeled and always masked, so a causal program's diagonal tile is that one; tiles
outside ``[lo, hi)`` are never loaded.
With ``ROWB`` (``attention.HOPPER_FWD_ROW_BOUNDS``) a boundary tile is masked by each row's run
of visible keys instead, ``[first, end)`` in the local key order (:func:`._common._row_bounds_kernel`,
made once per call): positions and document ids increase along that order under every rule the
ranges serve, so the keys a row sees are one run, and the mask is two compares of a column index,
with no per-tile loads of the keys' positions and ids (the rows' ``qp``, ``qd`` carry the bounds).
Both partitions map a tile's index to its keys with the same function (:func:`._hopper_common.tile_start`).
TMA descriptors are 4-D over (B, S, H, D) with boxes [1, BLOCK, 1, D]: rows past the end of
*this* batch's sequence are zero-filled (never the next batch's rows) and masked as keys.

The epilogue writes float32 O and the LSE with plain stores (the accumulator's own layout),
after merging them with the running result (``FOLD``).
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

from ._hopper_common import (LN2, barriers, cta_barrier, head_attrs, invalidate, item_program, load_kv_tiles,
                             load_pos, max_of, query_program, ranges, sum_of, tile_start, tma_load, visible)


@gluon.jit
def _producer(q_desc, k_desc, v_desc, QPOS, KPOS, QDOC, KDOC, RANGES, BOUNDS, OUT, LSE,
              q_smem, k_smem, v_smem, q_bars, q_empties, k_ready, v_ready, k_empty, v_empty, turn,
              qk_scale, wl, wr, stride_ab, stride_ah, stride_kab, stride_kah,
              stride_ob, stride_os, stride_oh, stride_lb, stride_lh,
              H, G, Sq, Sk, N_ITEMS, COUNTER, SWIZZLE,
              BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr,
              STAGES: gl.constexpr, CAUSAL: gl.constexpr, WINDOW: gl.constexpr, DOCS: gl.constexpr,
              RANGED: gl.constexpr, HEAD_ATTRS: gl.constexpr, ROWB: gl.constexpr,
              FOLD: gl.constexpr, CONSUMER_WARPS: gl.constexpr,
              SPLIT: gl.constexpr, PINGPONG: gl.constexpr, PERSISTENT: gl.constexpr, WG: gl.constexpr):
    if PERSISTENT:
        # Items come from a global counter, so programs that drew short items draw more. Item t
        # goes into Q slot t % 2 once every consumer has retired its last QK^T of item t - 2
        # (q_empties), its index into this program's slot t % 2 after the counter, and its K/V
        # tiles continue the slot rounds where item t - 1's ended: they load while the consumers
        # finish item t - 1. The end is an index of N_ITEMS with no Q.
        t = 0
        j0 = 0
        it = gl.atomic_add(COUNTER, 1)
        while it < N_ITEMS:
            qs = t % 2
            b, h, hk, m0, pid_m = item_program(it, N_ITEMS, H, G, Sq, SWIZZLE, BLOCK_M, CAUSAL)
            _qp, _kp, _qd, _kd, ranges_h = head_attrs(b, h, hk, H, Sq, QPOS, KPOS, QDOC, KDOC, RANGES, stride_ab,
                                                      stride_ah, stride_kab, stride_kah, BLOCK_M, HEAD_ATTRS)
            lo, flo, fhi, hi = ranges(ranges_h, pid_m, Sk, BLOCK_N, RANGED)
            mbarrier.wait(q_empties.index(qs), ((t // 2) & 1) ^ 1)
            _post_item(COUNTER, qs, it)
            mbarrier.expect(q_bars.index(qs), SPLIT * q_desc.block_type.nbytes)
            for w in gl.static_range(SPLIT):
                tma_load(q_desc, [b, m0 + w * (BLOCK_M // SPLIT), h, 0], q_bars.index(qs),
                         q_smem.index(qs * SPLIT + w))
            j0 = load_kv_tiles(k_desc, v_desc, k_smem, v_smem, k_ready, v_ready, k_empty, v_empty, b, hk,
                               lo, flo, fhi, hi, BLOCK_N, STAGES, j0, True)
            t += 1
            it = gl.atomic_add(COUNTER, 1)
        qs = t % 2
        mbarrier.wait(q_empties.index(qs), ((t // 2) & 1) ^ 1)
        _post_item(COUNTER, qs, N_ITEMS)
        mbarrier.arrive(q_bars.index(qs))
    else:
        b, h, hk, m0, pid_m = query_program(H, G, Sq, SWIZZLE, BLOCK_M, CAUSAL)
        _qp, _kp, _qd, _kd, ranges_h = head_attrs(b, h, hk, H, Sq, QPOS, KPOS, QDOC, KDOC, RANGES, stride_ab,
                                                  stride_ah, stride_kab, stride_kah, BLOCK_M, HEAD_ATTRS)
        lo, flo, fhi, hi = ranges(ranges_h, pid_m, Sk, BLOCK_N, RANGED)

        mbarrier.expect(q_bars.index(0), SPLIT * q_desc.block_type.nbytes)
        for w in gl.static_range(SPLIT):  # one Q tile per consumer partition
            tma_load(q_desc, [b, m0 + w * (BLOCK_M // SPLIT), h, 0], q_bars.index(0), q_smem.index(w))
        load_kv_tiles(k_desc, v_desc, k_smem, v_smem, k_ready, v_ready, k_empty, v_empty, b, hk, lo, flo, fhi, hi,
                      BLOCK_N, STAGES, 0, True)


@gluon.jit
def _post_item(COUNTER, s, it):
    """Write work item ``it`` into this program's slot ``s`` (global memory after the counter)
    ahead of the arrive on the slot's Q barrier that publishes it: the arrive orders the write
    before the consumers' wait (release / acquire), and the partition's barrier first orders it
    before the arriving thread's arrive."""
    gl.store(COUNTER + 1 + gl.program_id(0) * 2 + s, it)
    cta_barrier()


@gluon.jit
def _read_item(COUNTER, s):
    """The work item in this program's slot ``s`` (after the wait on the slot's Q barrier)."""
    return gl.load(COUNTER + 1 + gl.program_id(0) * 2 + s)


@gluon.jit
def _softmax_tile(s_acc, m_i, l_i, qp, qd, n0, KPOS, KDOC, Sk, qk_scale, wl, wr,
                  s_layout: gl.constexpr, BLOCK_N: gl.constexpr, MASKED: gl.constexpr,
                  CAUSAL: gl.constexpr, WINDOW: gl.constexpr, DOCS: gl.constexpr, HEAD_ATTRS: gl.constexpr,
                  ROWB: gl.constexpr = False):
    """Online-softmax step on one tile's float32 scores (log2 domain): P (unnormalised), the
    new running max and row sum, and alpha, the factor for the running O. A boundary tile
    (``MASKED``) applies the rule of :func:`._common._rule` and the sequence end."""
    if MASKED:
        cols = n0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
        if ROWB:
            # qp, qd: each row's run of visible keys [first, end) (_row_bounds_kernel; end <= Sk)
            ok = (cols[None, :] >= qp[:, None]) & (cols[None, :] < qd[:, None])
        else:
            inside = cols < Sk
            ok = inside[None, :]
            kp = cols
            kd = cols
            if CAUSAL or WINDOW > 0:
                kp = load_pos(KPOS, cols, inside, HEAD_ATTRS, WINDOW)
            if DOCS:
                kd = gl.load(KDOC + cols, mask=inside, other=-1)
            ok = ok & visible(qp[:, None], kp[None, :], qd[:, None], kd[None, :], wl, wr, CAUSAL, WINDOW, DOCS)
        # The raw scores masked, and scaled inside the exponent as on unmasked tiles (one FFMA an
        # element, where scaling first took a multiply and a subtraction; the scale is positive,
        # so the row maximum is the same).
        sm = gl.where(ok, s_acc, float("-inf"))
        m_new = gl.maximum(m_i, gl.reduce(sm, 1, max_of) * qk_scale)
        # A row with nothing visible yet keeps m = -inf: shift it by 0 so exp2 gives 0, not NaN.
        m_use = gl.where(m_new == float("-inf"), 0.0, m_new)
        p = gl.exp2(sm * qk_scale - m_use[:, None])
    else:
        m_new = gl.maximum(m_i, gl.reduce(s_acc, 1, max_of) * qk_scale)
        m_use = m_new
        p = gl.exp2(s_acc * qk_scale - m_use[:, None])
    alpha = gl.exp2(m_i - m_use)
    l_i = l_i * alpha + gl.reduce(p, 1, sum_of)
    return p, m_new, l_i, alpha


@gluon.jit
def _row_bounds_of(BOUNDS, b, h, H, Sq, HEAD_ATTRS: gl.constexpr):
    """The rows' bounds of (batch ``b``, head ``h``): per head with per-head attributes, else shared."""
    if HEAD_ATTRS:
        BOUNDS += (b * H + h).to(gl.int64) * Sq * 2
    return BOUNDS


@gluon.jit
def _my_turn(turn, t, WG: gl.constexpr, PINGPONG: gl.constexpr):
    """PINGPONG: wait until the other warpgroup has issued its products of its turn t - 1
    (warpgroup 0 goes first: its first wait is on the phase before a fresh barrier's first)."""
    if PINGPONG:
        mbarrier.wait(turn.index(WG), (t & 1) ^ (1 - WG))


@gluon.jit
def _pass_turn(turn, WG: gl.constexpr, PINGPONG: gl.constexpr):
    """PINGPONG: this warpgroup's products are issued; the other may issue its own, while this one
    waits for them and runs its softmax."""
    if PINGPONG:
        cta_barrier()  # every warp of the warpgroup has issued
        mbarrier.arrive(turn.index(1 - WG))


@gluon.jit
def _kv_step(j, j0, lo, flo, fhi, hi, q2, k_smem, v_smem, k_ready, v_ready, k_empty, v_empty, turn,
             p_prev, acc, m_i, l_i, s_zero, qp, qd, KPOS, KDOC, Sk, qk_scale, wl, wr,
             s_layout: gl.constexpr, o_layout: gl.constexpr, p_layout: gl.constexpr,
             BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr, STAGES: gl.constexpr,
             MASKED: gl.constexpr, CAUSAL: gl.constexpr, WINDOW: gl.constexpr, DOCS: gl.constexpr,
             HEAD_ATTRS: gl.constexpr, PINGPONG: gl.constexpr, WG: gl.constexpr, ROWB: gl.constexpr = False):
    """Tile j >= 1: S_j = Q K_j^T beside O += P_{j-1} V_{j-1}, the softmax of S_j beside the PV.
    ``j0``: the tiles of the program's earlier items (a persistent program), which set the slot
    and its round. ``p_prev``: P_{j-1} in float32, as the softmax left it; returns P_j so.

    P crosses the loop in float32 and becomes the 16-bit operand here, next to the product that
    reads it. Carried as 16-bit values, P went through the loop's phi as 64 separate halves, and
    ptxas swapped the two halves of every packed register at the end of each step and back
    before the wgmma: at D = 128 the loop over fully visible tiles took 515-519 instructions a
    step, 64 of them PRMT, on Triton 3.6 (526-531 on 3.9), and takes 450-455 (462-467). The
    float32 carry holds 32 more registers across the loop: on Triton 3.6 nothing spills inside
    the loops; on 3.9 the loop over boundary tiles with row bounds reloads 27 words a step from
    local memory instead of its 32 PRMT (benchmarks/results/kernels_cpu_sass_loops/)."""
    s = (j0 + j) % STAGES
    ph = ((j0 + j) // STAGES) & 1
    sp = (j0 + j - 1) % STAGES
    php = ((j0 + j - 1) // STAGES) & 1
    k2 = k_smem.index(s).reshape([BLOCK_N, HEAD_DIM])
    v2 = v_smem.index(sp).reshape([BLOCK_N, HEAD_DIM])

    p_op = gl.convert_layout(p_prev.to(v2.dtype), p_layout)
    _my_turn(turn, j, WG, PINGPONG)
    mbarrier.wait(k_ready.index(s), ph)
    s_tok = warpgroup_mma(q2, k2.permute((1, 0)), s_zero, use_acc=False, is_async=True)
    mbarrier.wait(v_ready.index(sp), php)
    o_tok = warpgroup_mma(p_op, v2, acc, is_async=True)
    _pass_turn(turn, WG, PINGPONG)

    # One group outstanding at most: the older one, S_j, has retired; the PV may still run.
    s_acc, _q, _k = warpgroup_mma_wait(num_outstanding=1, deps=(s_tok, q2, k2))
    cta_barrier()
    mbarrier.arrive(k_empty.index(s))

    n0 = 0
    if MASKED:
        n0 = tile_start(j, lo, flo, fhi, hi, BLOCK_N, True)
    p, m_i, l_i, alpha = _softmax_tile(s_acc, m_i, l_i, qp, qd, n0, KPOS, KDOC, Sk, qk_scale, wl, wr,
                                       s_layout, BLOCK_N, MASKED, CAUSAL, WINDOW, DOCS, HEAD_ATTRS, ROWB)

    acc, _p = warpgroup_mma_wait(num_outstanding=0, deps=(o_tok, p_op))
    cta_barrier()
    mbarrier.arrive(v_empty.index(sp))
    acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))[:, None]
    return p, acc, m_i, l_i


@gluon.jit
def _consumer_item(b, h, m0, pid_m, qs, q_phase, j0, QPOS, KPOS, QDOC, KDOC, RANGES, BOUNDS, OUT, LSE,
                   q_smem, k_smem, v_smem, q_bars, q_empties, k_ready, v_ready, k_empty, v_empty, turn,
                   qk_scale, wl, wr, stride_ob, stride_os, stride_oh, stride_lb, stride_lh, Sq, Sk,
                   s_layout: gl.constexpr, o_layout: gl.constexpr, p_layout: gl.constexpr,
                   row_layout: gl.constexpr, ROWS: gl.constexpr, SPLIT: gl.constexpr,
                   BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr,
                   STAGES: gl.constexpr, CAUSAL: gl.constexpr, WINDOW: gl.constexpr, DOCS: gl.constexpr,
                   RANGED: gl.constexpr, HEAD_ATTRS: gl.constexpr, ROWB: gl.constexpr,
                   FOLD: gl.constexpr, PINGPONG: gl.constexpr,
                   PERSISTENT: gl.constexpr, WG: gl.constexpr):
    """One query tile (this warpgroup's ROWS rows of it) over its key tiles, and its epilogue.
    ``qs``: its Q slot and ``q_phase`` the parity of the slot barrier's phase; ``j0``: the key
    tiles the program walked before (slot rounds). Returns ``j0`` plus this item's tiles."""
    lo, flo, fhi, hi = ranges(RANGES, pid_m, Sk, BLOCK_N, RANGED)
    n = (hi - lo) // BLOCK_N
    n_full = (fhi - flo) // BLOCK_N
    m0 = m0 + WG * ROWS

    rows = m0 + gl.arange(0, ROWS, layout=row_layout)
    qp = rows  # unused without positions
    qd = rows  # unused without documents
    if ROWB:
        # Each row's run of visible keys [first, end), in qp and qd (an empty run past the end).
        qp = gl.load(BOUNDS + rows * 2, mask=rows < Sq, other=1)
        qd = gl.load(BOUNDS + rows * 2 + 1, mask=rows < Sq, other=0)
    else:
        if CAUSAL or WINDOW > 0:
            qp = load_pos(QPOS, rows, rows < Sq, HEAD_ATTRS, WINDOW)
        if DOCS:
            qd = gl.load(QDOC + rows, mask=rows < Sq, other=-2)

    q2 = q_smem.index(qs * SPLIT + WG).reshape([ROWS, HEAD_DIM])
    m_i = gl.full([ROWS], float("-inf"), gl.float32, layout=row_layout)
    l_i = gl.full([ROWS], 0.0, gl.float32, layout=row_layout)
    acc = gl.zeros([ROWS, HEAD_DIM], gl.float32, layout=o_layout)
    s_zero = gl.zeros([ROWS, BLOCK_N], gl.float32, layout=s_layout)

    mbarrier.wait(q_bars.index(qs), q_phase)
    n_masked = n - n_full
    if n > 0:
        # Tile 0, peeled (nothing to overlap its QK^T with), with the mask: right for a fully
        # visible tile too. The boundary tiles come first (tile_start's BOUNDARY_FIRST), so that
        # tile 0 is one of them where there are any: a dense causal program pays for one masked
        # tile, its diagonal, not for the diagonal and a peeled visible tile.
        s0 = j0 % STAGES
        k2 = k_smem.index(s0).reshape([BLOCK_N, HEAD_DIM])
        _my_turn(turn, 0, WG, PINGPONG)
        mbarrier.wait(k_ready.index(s0), (j0 // STAGES) & 1)
        s_tok = warpgroup_mma(q2, k2.permute((1, 0)), s_zero, use_acc=False, is_async=True)
        _pass_turn(turn, WG, PINGPONG)
        s_acc, _q, _k = warpgroup_mma_wait(num_outstanding=0, deps=(s_tok, q2, k2))
        cta_barrier()
        mbarrier.arrive(k_empty.index(s0))
        n0 = tile_start(0, lo, flo, fhi, hi, BLOCK_N, True)
        p, m_i, l_i, alpha = _softmax_tile(s_acc, m_i, l_i, qp, qd, n0, KPOS, KDOC, Sk, qk_scale, wl, wr,
                                           s_layout, BLOCK_N, True, CAUSAL, WINDOW, DOCS, HEAD_ATTRS, ROWB)

        for j in range(1, n_masked):
            p, acc, m_i, l_i = _kv_step(j, j0, lo, flo, fhi, hi, q2, k_smem, v_smem, k_ready, v_ready,
                                        k_empty, v_empty, turn, p, acc, m_i, l_i, s_zero, qp, qd,
                                        KPOS, KDOC, Sk, qk_scale, wl, wr, s_layout, o_layout, p_layout,
                                        BLOCK_N, HEAD_DIM, STAGES, True, CAUSAL, WINDOW, DOCS, HEAD_ATTRS,
                                        PINGPONG, WG, ROWB)
        for j in range(gl.maximum(n_masked, 1), n):
            p, acc, m_i, l_i = _kv_step(j, j0, lo, flo, fhi, hi, q2, k_smem, v_smem, k_ready, v_ready,
                                        k_empty, v_empty, turn, p, acc, m_i, l_i, s_zero, qp, qd,
                                        KPOS, KDOC, Sk, qk_scale, wl, wr, s_layout, o_layout, p_layout,
                                        BLOCK_N, HEAD_DIM, STAGES, False, CAUSAL, WINDOW, DOCS, HEAD_ATTRS,
                                        PINGPONG, WG, ROWB)

        # Every QK^T of this item has retired: the producer may load the next item's Q.
        if PERSISTENT:
            cta_barrier()
            mbarrier.arrive(q_empties.index(qs))
        # The last PV.
        jl = j0 + n - 1
        sl = jl % STAGES
        v2 = v_smem.index(sl).reshape([BLOCK_N, HEAD_DIM])
        _my_turn(turn, n, WG, PINGPONG)
        mbarrier.wait(v_ready.index(sl), (jl // STAGES) & 1)
        p_op = gl.convert_layout(p.to(v2.dtype), p_layout)
        o_tok = warpgroup_mma(p_op, v2, acc, is_async=True)
        _pass_turn(turn, WG, PINGPONG)
        acc, p_op = warpgroup_mma_wait(num_outstanding=0, deps=(o_tok, p_op))
        cta_barrier()
        mbarrier.arrive(v_empty.index(sl))
    elif PERSISTENT:
        mbarrier.arrive(q_empties.index(qs))

    # A row that saw no key: O = 0, LSE = -inf.
    orow_layout: gl.constexpr = gl.SliceLayout(1, o_layout)
    l_o = gl.convert_layout(l_i, orow_layout)
    m_o = gl.convert_layout(m_i, orow_layout)
    empty = l_o == 0.0
    l_safe = gl.where(empty, 1.0, l_o)
    lse = gl.where(empty, float("-inf"), (m_o + gl.log2(l_safe)) * LN2)
    o = acc / l_safe[:, None]

    rows_o = m0 + gl.arange(0, ROWS, layout=orow_layout)
    cols_o = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, o_layout))
    row_ok = rows_o < Sq
    o_ptrs = (OUT + b.to(gl.int64) * stride_ob + h.to(gl.int64) * stride_oh
              + rows_o.to(gl.int64)[:, None] * stride_os + cols_o[None, :])
    l_ptrs = LSE + b.to(gl.int64) * stride_lb + h.to(gl.int64) * stride_lh + rows_o
    o_mask = row_ok[:, None] & (cols_o < HEAD_DIM)[None, :]
    if FOLD:
        # The online-softmax merge with the running state of earlier key blocks, in float32
        # (:func:`._common._merge_states`).
        lse_old = gl.load(l_ptrs, mask=row_ok, other=float("-inf"))
        o_old = gl.load(o_ptrs, mask=o_mask, other=0.0)
        lse_new = lse
        mx = gl.maximum(lse_old, lse_new)
        mx = gl.where(mx == float("-inf"), 0.0, mx)
        lse = mx + gl.log(gl.exp(lse_old - mx) + gl.exp(lse_new - mx))
        ref = gl.where(lse == float("-inf"), 0.0, lse)
        o = o_old * gl.exp(lse_old - ref)[:, None] + o * gl.exp(lse_new - ref)[:, None]
    gl.store(o_ptrs, o.to(OUT.dtype.element_ty), mask=o_mask)  # float32, or the inputs' dtype
    gl.store(l_ptrs, lse, mask=row_ok)
    return j0 + n


@gluon.jit
def _consumer(q_desc, k_desc, v_desc, QPOS, KPOS, QDOC, KDOC, RANGES, BOUNDS, OUT, LSE,
              q_smem, k_smem, v_smem, q_bars, q_empties, k_ready, v_ready, k_empty, v_empty, turn,
              qk_scale, wl, wr, stride_ab, stride_ah, stride_kab, stride_kah,
              stride_ob, stride_os, stride_oh, stride_lb, stride_lh,
              H, G, Sq, Sk, N_ITEMS, COUNTER, SWIZZLE,
              BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr,
              STAGES: gl.constexpr, CAUSAL: gl.constexpr, WINDOW: gl.constexpr, DOCS: gl.constexpr,
              RANGED: gl.constexpr, HEAD_ATTRS: gl.constexpr, ROWB: gl.constexpr,
              FOLD: gl.constexpr, CONSUMER_WARPS: gl.constexpr,
              SPLIT: gl.constexpr, PINGPONG: gl.constexpr, PERSISTENT: gl.constexpr, WG: gl.constexpr):
    # With SPLIT = 2 this partition is one warpgroup and owns ROWS = 64 of the tile's rows.
    NW: gl.constexpr = CONSUMER_WARPS // SPLIT
    ROWS: gl.constexpr = BLOCK_M // SPLIT
    # wgmma accumulators: [16, N, 16] instructions, warps stacked along the rows.
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NW, 1],
                                                       instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NW, 1],
                                                       instr_shape=[16, HEAD_DIM, 16])
    # P stays in registers as the A operand of the PV wgmma.
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    row_layout: gl.constexpr = gl.SliceLayout(1, s_layout)

    if PERSISTENT:
        # The producer's items, in turn from the two Q slots, until the index N_ITEMS.
        t = 0
        j0 = 0
        mbarrier.wait(q_bars.index(0), 0)
        it = _read_item(COUNTER, 0)
        while it < N_ITEMS:
            qs = t % 2
            b, h, hk, m0, pid_m = item_program(it, N_ITEMS, H, G, Sq, SWIZZLE, BLOCK_M, CAUSAL)
            qpos, kpos, qdoc, kdoc, ranges_h = head_attrs(b, h, hk, H, Sq, QPOS, KPOS, QDOC, KDOC, RANGES, stride_ab,
                                                          stride_ah, stride_kab, stride_kah, BLOCK_M, HEAD_ATTRS)
            bounds_h = _row_bounds_of(BOUNDS, b, h, H, Sq, HEAD_ATTRS)
            j0 = _consumer_item(b, h, m0, pid_m, qs, (t // 2) & 1, j0, qpos, kpos, qdoc, kdoc, ranges_h,
                                bounds_h, OUT, LSE,
                                q_smem, k_smem, v_smem, q_bars, q_empties, k_ready, v_ready, k_empty, v_empty, turn,
                                qk_scale, wl, wr, stride_ob, stride_os, stride_oh, stride_lb, stride_lh, Sq, Sk,
                                s_layout, o_layout, p_layout, row_layout, ROWS, SPLIT, BLOCK_N, HEAD_DIM, STAGES,
                                CAUSAL, WINDOW, DOCS, RANGED, HEAD_ATTRS, ROWB, FOLD, PINGPONG, PERSISTENT, WG)
            t += 1
            mbarrier.wait(q_bars.index(t % 2), (t // 2) & 1)
            it = _read_item(COUNTER, t % 2)
    else:
        b, h, hk, m0, pid_m = query_program(H, G, Sq, SWIZZLE, BLOCK_M, CAUSAL)
        qpos, kpos, qdoc, kdoc, ranges_h = head_attrs(b, h, hk, H, Sq, QPOS, KPOS, QDOC, KDOC, RANGES, stride_ab,
                                                      stride_ah, stride_kab, stride_kah, BLOCK_M, HEAD_ATTRS)
        bounds_h = _row_bounds_of(BOUNDS, b, h, H, Sq, HEAD_ATTRS)
        _consumer_item(b, h, m0, pid_m, 0, 0, 0, qpos, kpos, qdoc, kdoc, ranges_h, bounds_h, OUT, LSE,
                       q_smem, k_smem, v_smem, q_bars, q_empties, k_ready, v_ready, k_empty, v_empty, turn,
                       qk_scale, wl, wr, stride_ob, stride_os, stride_oh, stride_lb, stride_lh, Sq, Sk,
                       s_layout, o_layout, p_layout, row_layout, ROWS, SPLIT, BLOCK_N, HEAD_DIM, STAGES,
                       CAUSAL, WINDOW, DOCS, RANGED, HEAD_ATTRS, ROWB, FOLD, PINGPONG, PERSISTENT, WG)


@gluon.jit
def _attn_fwd_hopper(q_desc, k_desc, v_desc, QPOS, KPOS, QDOC, KDOC, RANGES, BOUNDS, OUT, LSE,
                     qk_scale, wl, wr, stride_ab, stride_ah, stride_kab, stride_kah,
                     stride_ob, stride_os, stride_oh, stride_lb, stride_lh,
                     H, G, Sq, Sk, N_ITEMS, COUNTER, SWIZZLE,
                     BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr,
                     STAGES: gl.constexpr, CAUSAL: gl.constexpr, WINDOW: gl.constexpr,
                     DOCS: gl.constexpr, RANGED: gl.constexpr, HEAD_ATTRS: gl.constexpr, ROWB: gl.constexpr,
                     FOLD: gl.constexpr,
                     PRODUCER_WARPS: gl.constexpr, PRODUCER_REGS: gl.constexpr,
                     CONSUMER_WARPS: gl.constexpr, CONSUMER_REGS: gl.constexpr, SPLIT: gl.constexpr,
                     PINGPONG: gl.constexpr, PERSISTENT: gl.constexpr):
    dtype: gl.constexpr = q_desc.dtype
    Q_SLOTS: gl.constexpr = 2 if PERSISTENT else 1  # PERSISTENT: the next item's Q beside this one's
    q_smem = gl.allocate_shared_memory(dtype, [Q_SLOTS * SPLIT] + q_desc.block_type.shape, q_desc.layout)
    k_smem = gl.allocate_shared_memory(dtype, [STAGES] + k_desc.block_type.shape, k_desc.layout)
    v_smem = gl.allocate_shared_memory(dtype, [STAGES] + v_desc.block_type.shape, v_desc.layout)

    q_bars = barriers(Q_SLOTS, 1)  # Q slot s landed (PERSISTENT: and its item index, after COUNTER, was written)
    q_empties = barriers(Q_SLOTS, SPLIT)  # PERSISTENT: every consumer partition is done reading Q slot s
    k_ready = barriers(STAGES, 1)
    v_ready = barriers(STAGES, 1)
    k_empty = barriers(STAGES, SPLIT)  # one arrive per consumer partition frees a slot
    v_empty = barriers(STAGES, SPLIT)
    turn = barriers(2, 1)  # PINGPONG: turn[w] completes when the other warpgroup has issued its products
    fence_async_shared()

    # The argument tuples are written out in the call: a tuple bound to a local first would turn
    # its constexpr members into runtime scalars (Triton's assignment rule) and break the layouts.
    if SPLIT == 1:
        gl.warp_specialize(
            [
                (_consumer, (q_desc, k_desc, v_desc, QPOS, KPOS, QDOC, KDOC, RANGES, BOUNDS, OUT, LSE,
                             q_smem, k_smem, v_smem, q_bars, q_empties, k_ready, v_ready, k_empty, v_empty, turn,
                             qk_scale, wl, wr, stride_ab, stride_ah, stride_kab, stride_kah,
                             stride_ob, stride_os, stride_oh, stride_lb, stride_lh,
                             H, G, Sq, Sk, N_ITEMS, COUNTER, SWIZZLE, BLOCK_M, BLOCK_N, HEAD_DIM, STAGES, CAUSAL, WINDOW, DOCS,
                             RANGED, HEAD_ATTRS, ROWB, FOLD, CONSUMER_WARPS, SPLIT, PINGPONG, PERSISTENT, 0)),
                (_producer, (q_desc, k_desc, v_desc, QPOS, KPOS, QDOC, KDOC, RANGES, BOUNDS, OUT, LSE,
                             q_smem, k_smem, v_smem, q_bars, q_empties, k_ready, v_ready, k_empty, v_empty, turn,
                             qk_scale, wl, wr, stride_ab, stride_ah, stride_kab, stride_kah,
                             stride_ob, stride_os, stride_oh, stride_lb, stride_lh,
                             H, G, Sq, Sk, N_ITEMS, COUNTER, SWIZZLE, BLOCK_M, BLOCK_N, HEAD_DIM, STAGES, CAUSAL, WINDOW, DOCS,
                             RANGED, HEAD_ATTRS, ROWB, FOLD, CONSUMER_WARPS, SPLIT, PINGPONG, PERSISTENT, 0)),
            ],
            [PRODUCER_WARPS], [PRODUCER_REGS])
    elif SPLIT == 2:
        # One partition per consumer warpgroup: each hands slots back on its own (count-2 empty
        # barriers), so the two need not pass a common barrier every tile and can drift apart,
        # one's softmax beside the other's matrix products.
        gl.warp_specialize(
            [
                (_consumer, (q_desc, k_desc, v_desc, QPOS, KPOS, QDOC, KDOC, RANGES, BOUNDS, OUT, LSE,
                             q_smem, k_smem, v_smem, q_bars, q_empties, k_ready, v_ready, k_empty, v_empty, turn,
                             qk_scale, wl, wr, stride_ab, stride_ah, stride_kab, stride_kah,
                             stride_ob, stride_os, stride_oh, stride_lb, stride_lh,
                             H, G, Sq, Sk, N_ITEMS, COUNTER, SWIZZLE, BLOCK_M, BLOCK_N, HEAD_DIM, STAGES, CAUSAL, WINDOW, DOCS,
                             RANGED, HEAD_ATTRS, ROWB, FOLD, CONSUMER_WARPS, SPLIT, PINGPONG, PERSISTENT, 0)),
                (_consumer, (q_desc, k_desc, v_desc, QPOS, KPOS, QDOC, KDOC, RANGES, BOUNDS, OUT, LSE,
                             q_smem, k_smem, v_smem, q_bars, q_empties, k_ready, v_ready, k_empty, v_empty, turn,
                             qk_scale, wl, wr, stride_ab, stride_ah, stride_kab, stride_kah,
                             stride_ob, stride_os, stride_oh, stride_lb, stride_lh,
                             H, G, Sq, Sk, N_ITEMS, COUNTER, SWIZZLE, BLOCK_M, BLOCK_N, HEAD_DIM, STAGES, CAUSAL, WINDOW, DOCS,
                             RANGED, HEAD_ATTRS, ROWB, FOLD, CONSUMER_WARPS, SPLIT, PINGPONG, PERSISTENT, 1)),
                (_producer, (q_desc, k_desc, v_desc, QPOS, KPOS, QDOC, KDOC, RANGES, BOUNDS, OUT, LSE,
                             q_smem, k_smem, v_smem, q_bars, q_empties, k_ready, v_ready, k_empty, v_empty, turn,
                             qk_scale, wl, wr, stride_ab, stride_ah, stride_kab, stride_kah,
                             stride_ob, stride_os, stride_oh, stride_lb, stride_lh,
                             H, G, Sq, Sk, N_ITEMS, COUNTER, SWIZZLE, BLOCK_M, BLOCK_N, HEAD_DIM, STAGES, CAUSAL, WINDOW, DOCS,
                             RANGED, HEAD_ATTRS, ROWB, FOLD, CONSUMER_WARPS, SPLIT, PINGPONG, PERSISTENT, 0)),
            ],
            [CONSUMER_WARPS // SPLIT, PRODUCER_WARPS], [CONSUMER_REGS, PRODUCER_REGS])

    else:
        # SPLIT = 3: three consumer warpgroups of 64 rows (D = 64, FA3's 192-row tiles), as above.
        gl.warp_specialize(
            [
                (_consumer, (q_desc, k_desc, v_desc, QPOS, KPOS, QDOC, KDOC, RANGES, BOUNDS, OUT, LSE,
                             q_smem, k_smem, v_smem, q_bars, q_empties, k_ready, v_ready, k_empty, v_empty, turn,
                             qk_scale, wl, wr, stride_ab, stride_ah, stride_kab, stride_kah,
                             stride_ob, stride_os, stride_oh, stride_lb, stride_lh,
                             H, G, Sq, Sk, N_ITEMS, COUNTER, SWIZZLE, BLOCK_M, BLOCK_N, HEAD_DIM, STAGES, CAUSAL, WINDOW, DOCS,
                             RANGED, HEAD_ATTRS, ROWB, FOLD, CONSUMER_WARPS, SPLIT, PINGPONG, PERSISTENT, 0)),
                (_consumer, (q_desc, k_desc, v_desc, QPOS, KPOS, QDOC, KDOC, RANGES, BOUNDS, OUT, LSE,
                             q_smem, k_smem, v_smem, q_bars, q_empties, k_ready, v_ready, k_empty, v_empty, turn,
                             qk_scale, wl, wr, stride_ab, stride_ah, stride_kab, stride_kah,
                             stride_ob, stride_os, stride_oh, stride_lb, stride_lh,
                             H, G, Sq, Sk, N_ITEMS, COUNTER, SWIZZLE, BLOCK_M, BLOCK_N, HEAD_DIM, STAGES, CAUSAL, WINDOW, DOCS,
                             RANGED, HEAD_ATTRS, ROWB, FOLD, CONSUMER_WARPS, SPLIT, PINGPONG, PERSISTENT, 1)),
                (_consumer, (q_desc, k_desc, v_desc, QPOS, KPOS, QDOC, KDOC, RANGES, BOUNDS, OUT, LSE,
                             q_smem, k_smem, v_smem, q_bars, q_empties, k_ready, v_ready, k_empty, v_empty, turn,
                             qk_scale, wl, wr, stride_ab, stride_ah, stride_kab, stride_kah,
                             stride_ob, stride_os, stride_oh, stride_lb, stride_lh,
                             H, G, Sq, Sk, N_ITEMS, COUNTER, SWIZZLE, BLOCK_M, BLOCK_N, HEAD_DIM, STAGES, CAUSAL, WINDOW, DOCS,
                             RANGED, HEAD_ATTRS, ROWB, FOLD, CONSUMER_WARPS, SPLIT, PINGPONG, PERSISTENT, 2)),
                (_producer, (q_desc, k_desc, v_desc, QPOS, KPOS, QDOC, KDOC, RANGES, BOUNDS, OUT, LSE,
                             q_smem, k_smem, v_smem, q_bars, q_empties, k_ready, v_ready, k_empty, v_empty, turn,
                             qk_scale, wl, wr, stride_ab, stride_ah, stride_kab, stride_kah,
                             stride_ob, stride_os, stride_oh, stride_lb, stride_lh,
                             H, G, Sq, Sk, N_ITEMS, COUNTER, SWIZZLE, BLOCK_M, BLOCK_N, HEAD_DIM, STAGES, CAUSAL, WINDOW, DOCS,
                             RANGED, HEAD_ATTRS, ROWB, FOLD, CONSUMER_WARPS, SPLIT, PINGPONG, PERSISTENT, 0)),
            ],
            [CONSUMER_WARPS // SPLIT, CONSUMER_WARPS // SPLIT, PRODUCER_WARPS],
            [CONSUMER_REGS, CONSUMER_REGS, PRODUCER_REGS])

    invalidate(q_bars, Q_SLOTS)
    invalidate(q_empties, Q_SLOTS)
    invalidate(k_ready, STAGES)
    invalidate(v_ready, STAGES)
    invalidate(k_empty, STAGES)
    invalidate(v_empty, STAGES)
    invalidate(turn, 2)
