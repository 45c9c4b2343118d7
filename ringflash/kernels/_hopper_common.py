"""Gluon helpers shared by the Hopper kernels (``_fwd_hopper.py``, ``_bwd_dkdv_hopper.py``,
``_bwd_dq_hopper.py``): the names that moved between Triton releases, row reductions that
compile under ``TRITON_INTERPRET``, the order in which a program walks its tiles, the
visibility rule of a boundary tile, and the bulk reduction, wait and fence of the backward's
dQ writer.
"""

from __future__ import annotations

from triton._C.libtriton import ir
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language import _core as gl_core
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma

# Triton 3.6 (the GPU machines) and the newer releases on PyPI name these differently.
tma_load = tma.async_load if hasattr(tma, "async_load") else tma.async_copy_global_to_shared
tma_store = tma.async_store if hasattr(tma, "async_store") else tma.async_copy_shared_to_global
cta_barrier = gl.thread_barrier if hasattr(gl, "thread_barrier") else gl.barrier


@gl_core.builtin
def tma_reduce_add(tensor_desc, coord, src, _semantic=None):
    """Add the shared-memory tile ``src`` into global memory at ``coord`` of ``tensor_desc`` with
    one bulk TMA reduction (``cp.reduce.async.bulk.tensor ... .add``), issued by one thread and
    committed as a bulk group (:func:`bulk_wait` / ``tma.store_wait`` wait for it). Newer Triton
    releases name it ``tma.async_atomic_add``; Triton 3.6 has the operation in its Gluon builder
    only."""
    coord = _semantic._convert_to_ir_values(coord, require_i64=False)
    _semantic.builder.create_async_tma_reduce(ir.DESCRIPTOR_REDUCE_KIND.ADD, tensor_desc.handle, coord, src.handle)


LOG2E: gl.constexpr = gl.constexpr(1.4426950408889634)
LN2: gl.constexpr = gl.constexpr(0.6931471805599453)


# gl.max / gl.sum combine with Triton-language functions, which TRITON_INTERPRET (set for the
# CPU tests) turns into interpreter objects that no compiler takes; these combine in Gluon.
@gluon.jit
def max_of(a, b):
    return gl.maximum(a, b)


@gluon.jit
def sum_of(a, b):
    return a + b


@gluon.jit
def barriers(N: gl.constexpr, COUNT: gl.constexpr):
    """``N`` mbarriers in shared memory, each completing after ``COUNT`` arrivals."""
    bars = gl.allocate_shared_memory(gl.int64, [N, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(N):
        mbarrier.init(bars.index(i), count=COUNT)
    return bars


@gluon.jit
def invalidate(bars, N: gl.constexpr):
    for i in gl.static_range(N):
        mbarrier.invalidate(bars.index(i))


@gluon.jit
def load_acquire(ptr):
    """``ld.acquire.gpu`` of the int32 at ``ptr`` (a plain load, not a read-modify-write): what a
    spin on a counter polls."""
    layout: gl.constexpr = gl.BlockedLayout([1], [32], [gl.num_warps()], [0])
    v = gl.inline_asm_elementwise("ld.acquire.gpu.global.b32 $0, [$1];", "=r,l",
                                  [ptr + gl.full([1], 0, gl.int32, layout)], dtype=gl.int32, is_pure=False, pack=1)
    return gl.reduce(v, 0, max_of)


@gluon.jit
def query_program(H, G, Sq, SWIZZLE, BLOCK_M: gl.constexpr, CAUSAL: gl.constexpr):
    """(b, h, K/V head, first query row, query tile) of a program that owns a query tile, on a
    (query tiles, batch x heads) grid; the order is :func:`item_program`'s."""
    num_m = (Sq + BLOCK_M - 1) // BLOCK_M
    return item_program(gl.program_id(1) * num_m + gl.program_id(0), num_m * gl.num_programs(1), H, G, Sq,
                        SWIZZLE, BLOCK_M, CAUSAL)


@gluon.jit
def item_program(it, n_items, H, G, Sq, SWIZZLE, BLOCK_M: gl.constexpr, CAUSAL: gl.constexpr):
    """:func:`query_program` for work item ``it`` of ``n_items`` (a persistent grid's, or a
    program's own): the query tiles of one (batch, head) after another, so that the programs
    running at once read the same head's K/V (from L2); under ``CAUSAL`` the longest rows first
    across sections of ``SWIZZLE`` heads (``_common._lpt_item``, the same order)."""
    num_m = (Sq + BLOCK_M - 1) // BLOCK_M
    pid_m = it % num_m
    pid_bh = it // num_m
    if CAUSAL:
        first = it // (SWIZZLE * num_m) * SWIZZLE
        n = gl.minimum(SWIZZLE, n_items // num_m - first)
        r = it - first * num_m
        pid_m = num_m - 1 - r // n
        pid_bh = first + r % n
    b = pid_bh // H
    h = pid_bh % H
    return b, h, h // G, pid_m * BLOCK_M, pid_m


@gluon.jit
def ranges(RANGES, t, n, BLOCK: gl.constexpr, RANGED: gl.constexpr):
    """(lo, flo, fhi, hi) of tile ``t``: _ranges_kernel's (in rows of the other side), or every
    tile of the ``n`` rows, all fully visible but a partial last one."""
    if RANGED:
        base = RANGES + t * 4
        lo = gl.load(base)
        flo = gl.load(base + 1)
        fhi = gl.load(base + 2)
        hi = gl.load(base + 3)
    else:
        lo = n * 0
        flo = lo
        fhi = (n // BLOCK) * BLOCK
        hi = (n + BLOCK - 1) // BLOCK * BLOCK
    return lo, flo, fhi, hi


@gluon.jit
def tile_start(j, lo, flo, fhi, hi, BLOCK: gl.constexpr, BOUNDARY_FIRST: gl.constexpr = False):
    """First row of the j-th tile walked: [flo, fhi) (fully visible), then the boundary tiles
    [fhi, hi) and [lo, flo), as the Triton kernels walk them; with ``BOUNDARY_FIRST`` the
    boundary tiles [fhi, hi) and [lo, flo) first, then [flo, fhi)."""
    n_full = (fhi - flo) // BLOCK
    n_right = (hi - fhi) // BLOCK
    if BOUNDARY_FIRST:
        n_left = (flo - lo) // BLOCK
        start = flo + (j - n_right - n_left) * BLOCK
        start = gl.where(j < n_right + n_left, lo + (j - n_right) * BLOCK, start)
        return gl.where(j < n_right, fhi + j * BLOCK, start)
    start = lo + (j - n_full - n_right) * BLOCK
    start = gl.where(j < n_full + n_right, fhi + (j - n_full) * BLOCK, start)
    return gl.where(j < n_full, flo + j * BLOCK, start)


@gluon.jit
def load_kv_tiles(k_desc, v_desc, k_smem, v_smem, k_ready, v_ready, k_empty, v_empty, b, hk, lo, flo, fhi, hi,
                  BLOCK_N: gl.constexpr, STAGES: gl.constexpr, j0=0, BOUNDARY_FIRST: gl.constexpr = False):
    """The producer's loop of a program that owns a query tile: K and V of every key tile it
    walks (:func:`tile_start`'s order) into slot ``(j0 + j) % STAGES``, each once both its readers
    have handed the slot back (the empty barriers, waited with the parity flipped so that the
    first round passes at once). K first: consumers need K_j before V_j. ``j0``: the tiles this
    program loaded before (a persistent program's earlier items); returns the count after."""
    n = (hi - lo) // BLOCK_N
    for j in range(n):
        s = (j0 + j) % STAGES
        ph = ((j0 + j) // STAGES) & 1
        n0 = tile_start(j, lo, flo, fhi, hi, BLOCK_N, BOUNDARY_FIRST)
        mbarrier.wait(k_empty.index(s), ph ^ 1)
        mbarrier.expect(k_ready.index(s), k_desc.block_type.nbytes)
        tma_load(k_desc, [b, n0, hk, 0], k_ready.index(s), k_smem.index(s))
        mbarrier.wait(v_empty.index(s), ph ^ 1)
        mbarrier.expect(v_ready.index(s), v_desc.block_type.nbytes)
        tma_load(v_desc, [b, n0, hk, 0], v_ready.index(s), v_smem.index(s))
    return j0 + n


@gluon.jit
def head_attrs(b, h, hk, H, Sq, QPOS, KPOS, QDOC, KDOC, RANGES, stride_ab, stride_ah, stride_kab, stride_kah,
               BLOCK_M: gl.constexpr, HEAD_ATTRS: gl.constexpr):
    """The positions, document ids and query-tile ranges of (batch ``b``, query head ``h``, K/V
    head ``hk``) where each head has its own (``HEAD_ATTRS``: the sparse modes' tokens, sorted
    per head, :mod:`ringflash.sparse`); shared ones as they are."""
    if HEAD_ATTRS:
        qo = b.to(gl.int64) * stride_ab + h.to(gl.int64) * stride_ah
        ko = b.to(gl.int64) * stride_kab + hk.to(gl.int64) * stride_kah
        QPOS += qo
        QDOC += qo
        KPOS += ko
        KDOC += ko
        RANGES += (b * H + h).to(gl.int64) * ((Sq + BLOCK_M - 1) // BLOCK_M) * 4
    return QPOS, KPOS, QDOC, KDOC, RANGES


@gluon.jit
def load_pos(POS, idx, inside, HEAD_ATTRS: gl.constexpr, WINDOW: gl.constexpr):
    """Positions at ``idx`` as int32 (see :func:`visible`). Per-head positions are composite
    (``document << 31 | position``, int64) and a boundary tile compares them only inside one
    composite document (DOCS). There their low 32 bits order them alike (bit 31 is the same for
    both), which the causal compare needs; a window's bounds (``q - left``) need the position
    itself, the low 31 bits."""
    p = gl.load(POS + idx, mask=inside, other=0).to(gl.int32)
    if HEAD_ATTRS and WINDOW > 0:
        p = p & 0x7FFFFFFF
    return p


@gluon.jit
def visible(qp, kp, qd, kd, wl, wr, CAUSAL: gl.constexpr, WINDOW: gl.constexpr, DOCS: gl.constexpr):
    """The rule of :func:`._common._rule` on operands already broadcast against each other
    (positions as int32: one sequence stays below 2**31 tokens, and 64-bit compares over a
    128 x 128 tile spill registers)."""
    ok = qp == qp
    if DOCS:
        ok = qd == kd
    if CAUSAL:
        ok = ok & (qp >= kp)
    if WINDOW % 2 == 1:
        ok = ok & (kp >= qp - wl)
    if WINDOW >= 2:
        ok = ok & (kp <= qp + wr)
    return ok


@gluon.jit
def bulk_wait():
    """``cp.async.bulk.wait_group 0`` in every thread of the partition: the bulk TMA operations the
    thread issued have completed, their writes included (``tma.store_wait`` waits only until their
    sources are read). A no-op in threads that issued none."""
    layout: gl.constexpr = gl.BlockedLayout([1], [32], [gl.num_warps()], [0])
    gl.inline_asm_elementwise("cp.async.bulk.wait_group 0;\n mov.b32 $0, $1;", "=r,r",
                              [gl.full([1], 0, gl.int32, layout)], dtype=gl.int32, is_pure=False, pack=1)


@gluon.jit
def fence_gpu():
    """``fence.acq_rel.gpu`` in every thread of the partition: its earlier writes are ordered
    before its later ones as the whole GPU sees them."""
    layout: gl.constexpr = gl.BlockedLayout([1], [32], [gl.num_warps()], [0])
    gl.inline_asm_elementwise("fence.acq_rel.gpu;\n mov.b32 $0, $1;", "=r,r", [gl.full([1], 0, gl.int32, layout)],
                              dtype=gl.int32, is_pure=False, pack=1)
