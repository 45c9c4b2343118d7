"""Launchers of the attention kernels: input checks, launch configurations, the grid.

The functions here share :mod:`ringflash.reference`'s signatures and contract (see there for
the shapes): ``forward`` returns float32 partials and a natural-log LSE and can fold into a
running ``out``/``lse`` in place; ``backward`` adds one block's gradients into float32
accumulators from the global LSE and delta; ``backward_delta`` is ``rowsum(dO * O)``.

Launch configurations come from a table per head dimension, not from autotuning: a ring
calls the kernels with a new key block every step and a model with new sequence lengths,
and neither should trigger a re-tune. The tables are module-level dicts so a benchmark can
try other entries.
"""

from __future__ import annotations

import functools
import math
import os
import warnings
import weakref
from collections import OrderedDict
from typing import NamedTuple

import torch
import triton
from triton.errors import TritonError
from triton.runtime.errors import OutOfResources

from ._bwd import _attn_bwd, _bwd_delta, _bwd_dq_finish
from ._common import FP_FUSION, LOG2E, _ranges_kernel, _row_bounds_kernel
from ._fwd import _attn_fwd
from .blocks import tile_lists

__all__ = [
    "forward",
    "backward",
    "backward_delta",
    "check_inputs",
    "KernelConfig",
    "FWD_CONFIGS",
    "HOPPER_FWD_CONFIGS",
    "HOPPER_BWD_DKDV_CONFIGS",
    "HOPPER_BWD_DQ_CONFIGS",
    "HOPPER_FWD_HEAD_DIMS",
    "BWD_DKDV_CONFIGS",
    "BWD_DKDV_MASKED_CONFIGS",
    "BWD_DQ_CONFIGS",
    "INTERPRETED",
    "SUPPORTED_DTYPES",
]

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256

# The kernels run under Triton's CPU interpreter when TRITON_INTERPRET=1 was set before this
# module was imported (triton.jit decides at definition time).
INTERPRETED = type(_attn_fwd).__name__ == "InterpretedFunction"


class KernelConfig(NamedTuple):
    block_m: int  # query rows per tile
    block_n: int  # keys per tile
    num_warps: int
    num_stages: int


# Keyed by the padded head dim (next power of two, at least 16), or by (padded head dim,
# causal) where the masked and unmasked cases want different tiles. Backward: dK/dV programs own
# block_n keys and step over block_m queries; dQ programs own block_m queries and step over
# block_n keys. Measured on H100/H200 (docs/design.md, docs/performance.md).
FWD_CONFIGS: dict = {
    16: KernelConfig(128, 64, 4, 3),
    32: KernelConfig(128, 64, 4, 3),
    64: KernelConfig(128, 64, 4, 3),
    128: KernelConfig(128, 128, 8, 3),
    256: KernelConfig(64, 32, 4, 2),
}
BWD_DKDV_CONFIGS: dict = {
    # With the masked loops first, 64 x 128 tiles ran the D = 64 backward at 95 against
    # 330-370 TFLOP/s for 64 x 64 (benchmarks/results/kernels_h100_loop_order/); at D = 16
    # and 32 they stay the faster tiles: 1.07-1.13x 64 x 64 on H100 (tiles_small_d.jsonl there).
    16: KernelConfig(64, 128, 4, 3),
    32: KernelConfig(64, 128, 4, 3),
    64: KernelConfig(64, 64, 4, 3),
    128: KernelConfig(64, 128, 8, 3),
    256: KernelConfig(64, 64, 8, 2),  # 2.2x the 32 x 32 tiles at S = 16k (benchmarks/results/kernels_h200_headdims/)
}
# dK/dV programs with grouped queries (GQA) walk the query tiles once per query head of the
# group, in a loop around the tile loops. With 4 warps and 64 x 128 tiles that nest ran 4x
# slower on H200 at D = 64 (87 against 355 TFLOP/s, S = 32k, 16 query heads over 4); 64 x 64
# tiles run the nest at full speed. Measured: benchmarks/results/kernels_h200_gqa_d64/.
# At D = 16 and 32, 128 query rows per tile over 64 keys ran grouped queries 1.17-1.21x
# faster than 64 x 64 on H100 (S = 16k, 32 query heads over 8; tiles_small_d.jsonl above).
BWD_DKDV_GROUPED_CONFIGS: dict = {
    16: KernelConfig(128, 64, 4, 3),
    32: KernelConfig(128, 64, 4, 3),
    64: KernelConfig(64, 64, 4, 3),
}
# dK/dV programs under windows and documents (and the per-head attributes of QK-dropping and
# hashing), whose key tiles see few query tiles each: 4 warps over 64 x 64 tiles leave room
# for two programs per SM, so one's loads and epilogue overlap the other's products. At S = 32k,
# H = 32, bf16 (benchmarks/results/masks_h100_bwd_tiles/, masks_h200_bwd_tiles/), the backward
# took 0.94-0.95x (H100) / 0.93-0.94x (H200) the time of the table's 64 x 128 tiles with
# log-normal documents (median 4k) and a 4k window, 0.82-0.83x with documents of 512 tokens;
# dense causal ran 0.95-0.98x as fast, so it keeps the table's.
BWD_DKDV_MASKED_CONFIGS: dict = {
    128: KernelConfig(64, 64, 4, 2),
}
BWD_DQ_CONFIGS: dict = {
    16: KernelConfig(128, 64, 4, 3),
    32: KernelConfig(128, 64, 4, 3),
    64: KernelConfig(128, 64, 4, 3),
    128: KernelConfig(128, 64, 8, 3),
    256: KernelConfig(128, 32, 8, 2),
}
# The Hopper forward (_fwd_hopper.py, Gluon, sm_90 only), by head dim: block_m query rows over
# two consumer warpgroups (num_warps = 8, plus one producer warp), block_n keys, num_stages
# K/V slots. Shapes must be powers of two in Gluon, so FA3's 128 x 176 (D = 128) tile is out; 3
# stages do not fit the shared memory at D = 128. 12 warps make three consumer partitions of 64
# rows (FA3's 192 x 128 at D = 64; with 160 registers a thread ptxas spills there, 192 x 64 does not):
# checked against float64 on an H100, not timed yet (benchmarks/results/kernels_d64_tiles/).
HOPPER_FWD_CONFIGS: dict = {
    64: KernelConfig(128, 128, 8, 2),
    128: KernelConfig(128, 128, 8, 2),
}
# The Hopper backward (_bwd_dkdv_hopper.py, _bwd_dq_hopper.py): dK/dV programs own block_n
# keys (two warpgroups of 64) and step over block_m queries; dQ programs own block_m queries
# and step over block_n keys. The consumers have 240 registers a thread: at D = 128 a dK/dV
# program holds dK and dV (64 + 64 a thread) beside its key x query products, and with 64
# queries a step ptxas spilled 356-700 bytes; 32 queries a step spill nothing. The dQ program
# holds dQ and two 128 x 64 products (128 x 128 ones spilled at D = 64 with masks).
HOPPER_BWD_DKDV_CONFIGS: dict = {
    64: KernelConfig(64, 128, 8, 3),
    128: KernelConfig(32, 128, 8, 3),
}
# HOPPER_BWD_SMEM_P: the dK/dV program computes S and dP with the queries as rows and feeds the dV
# and dK products with P and dS from shared memory (FA3's routes) instead of from registers, so
# that a step of 64 queries fits the registers at D = 128 (HOPPER_BWD_DKDV_SMEM_P_CONFIGS).
# Off (RINGFLASH_HOPPER_BWD_SMEM_P=1 turns it on): on an H100 it ran 0.96-1.01x the Triton backward at
# D = 128 and 0.77-0.90x at D = 64 (benchmarks/results/kernels_h100_fa3_bwd/).
HOPPER_BWD_SMEM_P = os.environ.get("RINGFLASH_HOPPER_BWD_SMEM_P", "0") == "1"
# HOPPER_BWD_DQ: where the Hopper backward computes dQ. "kernel": the dQ kernel (seven tile
# products in two kernels). "atomic": the dK/dV programs in FA3's form (as with HOPPER_BWD_SMEM_P)
# also compute each step's dQ tile = dS K and add it into a float32 dQ with one bulk TMA reduction
# from shared memory, in whatever order the programs come (five products in one kernel; not
# bitwise repeatable). "ordered": those reductions in a fixed order, each program waiting on a
# counter per (head, query tile) for the higher key tiles (FA3's deterministic form; bitwise
# repeatable): the default, 0.93-1.18x the Triton backward at D = 128 on an H100 (atomic:
# 1.10-1.18x; benchmarks/results/kernels_h100_hopper_tma_dq/). RINGFLASH_HOPPER_BWD_DQ sets it.
HOPPER_BWD_DQ = os.environ.get("RINGFLASH_HOPPER_BWD_DQ", "ordered")
# HOPPER_BWD_DQ_WRITERS: writer warps adding the dK/dV programs' dQ tiles (HOPPER_BWD_DQ "atomic" or
# "ordered"). 1: one writer, which under "ordered" waits for each addition to land before the
# next, so it sets the pace once an addition takes longer to land than a step takes (a schedule
# model, benchmarks/model_dq_writer.py). 2 (the default): two writers take the even and the odd
# steps, so that two additions are in flight; the order of the additions into each query tile,
# and so the result, stays the same (bitwise, tests/test_kernels_hopper_gpu.py). On an H100 the
# ordered backward ran 1.16x faster at 16k causal (two calls), 1.09x at 64k causal, 0.98-1.06x
# elsewhere at 8k-32k (benchmarks/results/kernels_h100_dq_writers/). RINGFLASH_HOPPER_BWD_DQ_WRITERS
# sets it.
HOPPER_BWD_DQ_WRITERS = os.environ.get("RINGFLASH_HOPPER_BWD_DQ_WRITERS", "2")
HOPPER_BWD_DKDV_SMEM_P_CONFIGS: dict = {
    64: KernelConfig(64, 128, 8, 3),
    128: KernelConfig(64, 128, 8, 2),
}
HOPPER_BWD_DQ_CONFIGS: dict = {
    64: KernelConfig(128, 64, 8, 2),
    128: KernelConfig(128, 64, 8, 2),
}
HOPPER_PRODUCER = (1, 24)  # the TMA producer partition: warps, registers per thread
# Registers a thread of each consumer partition but the first gets, by the number of consumer
# partitions (SPLIT > 1; the first gets what is left of the 64K, the producer's warpgroup counted whole):
# with three, 160 (the first gets 168).
HOPPER_CONSUMER_REGS = {2: 240, 3: 160}
# The forward's consumers: 1, one 8-warp partition whose two warpgroups pass a common barrier
# before each slot is handed back; 2, a partition per warpgroup, each handing slots back itself.
# On an H100 (S = 8k, H = 32, D = 128, bf16) 2 ran 1.18-1.19x faster than 1
# (benchmarks/results/kernels_hopper/).
HOPPER_FWD_SPLIT = 2
# With HOPPER_FWD_SPLIT = 2: the two warpgroups take turns issuing their matrix products (FA3's
# ping-pong), so that one's softmax runs while the other's products do. Measured no faster.
HOPPER_FWD_PINGPONG = False
# A persistent forward: one program per SM draws (query tile, head) items from a global counter,
# and its producer loads the next item's Q (a second Q slot) and K/V while the consumers finish
# the last one, so that an item's start-up and epilogue overlap the work around it. Not with
# PINGPONG. On an H100 (S = 32k, H = 32, D = 128, one run, benchmarks/results/masks_h100_persistent/)
# it took 0.90-0.96x the time of one program per query tile under causal sliding windows of
# 512-16k keys, 0.98x dense causal, and 1.02-1.08x with documents of 512-16k tokens (the items
# are short there, and the draw from the counter is one more step per item). So it serves windows
# without documents; RINGFLASH_HOPPER_FWD_PERSISTENT=1 takes it for every call, =0 never
# (None: the rule above).
_PERSISTENT_ENV = os.environ.get("RINGFLASH_HOPPER_FWD_PERSISTENT")
HOPPER_FWD_PERSISTENT = None if _PERSISTENT_ENV is None else _PERSISTENT_ENV == "1"
# Whether forward() / backward() take the Hopper kernels where they serve the call
# (bfloat16/float16, a head dim they have, no block pattern or per-head attributes, an sm_90
# GPU). Each is on by default at the head dims where it was measured faster than the Triton
# kernels: the forward at D = 128 (1.2x; at D = 64 it runs at the Triton forward's speed); the
# backward, one kernel adding dQ in a fixed order (HOPPER_BWD_DQ), at D = 128 (forward + backward
# 1.01-1.15x on an H100, benchmarks/results/kernels_h100_hopper_tma_dq/; FA3's order since,
# 0.99-1.07x that, benchmarks/results/kernels_h100_spt_dq/) and at D = 64 (forward + backward
# 1.00-1.17x dense at 8k-32k, 1.10-1.12x with documents and a window at 16k, on an H100:
# benchmarks/results/kernels_h100_sass_loops/). RINGFLASH_HOPPER_FORWARD / RINGFLASH_HOPPER_BACKWARD
# =1 takes the kernel at every head dim it has, =0 never.
_HOPPER_ENV = os.environ.get("RINGFLASH_HOPPER_FORWARD", "")
HOPPER_FORWARD = _HOPPER_ENV != "0"
HOPPER_FWD_HEAD_DIMS: tuple = tuple(HOPPER_FWD_CONFIGS) if _HOPPER_ENV == "1" else (128,)
_HOPPER_BWD_ENV = os.environ.get("RINGFLASH_HOPPER_BACKWARD", "")
HOPPER_BACKWARD = _HOPPER_BWD_ENV != "0"
HOPPER_BWD_HEAD_DIMS: tuple = tuple(HOPPER_FWD_CONFIGS) if _HOPPER_BWD_ENV == "1" else (64, 128)
# Small tiles under the interpreter: tests then cross many tile boundaries on short inputs.
_INTERPRET_FWD = KernelConfig(32, 16, 1, 1)
_INTERPRET_DKDV = KernelConfig(16, 32, 1, 1)
_INTERPRET_DQ = KernelConfig(32, 16, 1, 1)
_DELTA_BLOCK_M = 64
# Launch the dK/dV and dQ programs as one grid (when their warps/stages agree) instead of two.
# Measured 6-7% slower on H200 at S=16k (docs/performance.md), so off by default.
BWD_FUSED = False


_INT32_SPAN = 2**31


def _wide(*tensors: torch.Tensor) -> bool:
    """Whether some tensor spans 2**31 elements or more (from its first to its last element),
    so that the kernels must take their tile offsets in 64 bits (``WIDE``; a separate compile)."""
    return any(1 + sum((n - 1) * st for n, st in zip(t.shape, t.stride())) >= _INT32_SPAN
               for t in tensors if t.numel())


def _block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


# A dK/dV grid smaller than this many programs per SM splits the query heads of each group
# over several programs (see _bwd.py); each split costs one float32 slab of dK and dV.
DKDV_PROGRAMS_PER_SM = 2
_SM_COUNT: dict = {}


def _sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA ``device`` (cached)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNT[index]


# Causal grids run their tiles longest first across a section of rows (batch x head) whose
# operands fit in this much L2 together (_common._lpt_item; FlashAttention-3's tile scheduler
# takes 32 MB of the 50 MB L2 for K and V). On an H200 (B = 1, H = 32, bf16, three interleaved
# rounds; benchmarks/results/kernels_h200_tile_order/), 16 MB ran causal calls 1.02-1.07x faster
# than each head's tiles in turn (0) at 4k-8k, forward and backward, D = 128 and 64, and
# 0.99-1.00x as fast at 16k; 32 MB gained less and ran the 16k forward at 0.98x.
LPT_L2_BYTES = 16 << 20


def _lpt_swizzle(bytes_per_row: int, share: int = 1) -> int:
    """Rows per section of a causal grid's order: the largest power of two of rows whose
    operands (``bytes_per_row``) fit in LPT_L2_BYTES (at least one), times ``share``, the
    adjacent rows that read the same operands (the query heads of a K/V head)."""
    fit = LPT_L2_BYTES // max(1, bytes_per_row)
    return (1 << (fit.bit_length() - 1) if fit >= 1 else 1) * share


def _kv_swizzle(k: torch.Tensor, group: int) -> int:
    """:func:`_lpt_swizzle` of a grid of query tiles (forward, dQ): each row reads one K/V head's
    K and V, shared by the ``group`` query heads of that K/V head."""
    return _lpt_swizzle(2 * k.shape[1] * k.shape[3] * k.element_size(), group)


def _min_programs(device: torch.device) -> int:
    """dK/dV programs wanted to fill ``device``; 0 under the interpreter (no split)."""
    if INTERPRETED or device.type != "cuda":
        return 0
    return DKDV_PROGRAMS_PER_SM * _sm_count(device)


def _group_split(n_programs: int, group: int, device: torch.device) -> int:
    """How many programs share each key tile's query-head group: the smallest divisor of
    ``group`` that brings the dK/dV grid of ``n_programs`` up to the device's fill."""
    want = _min_programs(device)
    for split in range(1, group + 1):
        if group % split == 0 and (n_programs * split >= want or split == group):
            return split
    return 1


def _config(table: dict, interp: KernelConfig, head_dim: int, dtype, causal: bool,
            grouped: dict | None = None, masked: dict | None = None) -> KernelConfig:
    """The launch config for this head dim; ``grouped`` (GQA), then ``masked`` (windows and
    documents): tables that take precedence where they have the head dim."""
    if INTERPRETED:
        return interp
    bd = _block_d(head_dim)
    cfg = (grouped or {}).get(bd) or (masked or {}).get(bd) or table.get((bd, causal)) or table[bd]
    if dtype == torch.float32:
        # float32 (a testing dtype) needs twice the shared memory per tile.
        cap = 64 if bd <= 128 else 32
        cfg = KernelConfig(min(cfg.block_m, cap), min(cfg.block_n, cap), cfg.num_warps, min(cfg.num_stages, 2))
    return cfg


def _dot_precision(dtype) -> str:
    # float32 inputs are for testing: keep them exact instead of letting tf32 round them.
    return "ieee" if dtype == torch.float32 else "tf32"


def check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Raise ``TypeError``/``ValueError`` naming what to change if the kernels cannot take q, k, v."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D (batch, seqlen, heads, head_dim); got shape {tuple(t.shape)}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(
                f"the triton kernels take float16 or bfloat16 (float32 for testing); {name} is {t.dtype}"
            )
        if t.stride(-1) != 1 and t.shape[-1] != 1:
            raise ValueError(
                f"the triton kernels need the head_dim of {name} to be contiguous (stride 1); "
                f"got strides {t.stride()}. Call .contiguous() first."
            )
        if INTERPRETED:
            if t.dtype == torch.bfloat16:
                raise TypeError(
                    f"{name} is bfloat16, which Triton's interpreter (TRITON_INTERPRET) computes wrongly "
                    "in tl.dot; under the interpreter use float16 or float32, or backend='reference'"
                )
            if t.device.type != "cpu":
                raise ValueError(
                    f"the triton kernels were loaded under TRITON_INTERPRET=1 and take CPU tensors; "
                    f"{name} is on {t.device}"
                )
        elif t.device.type != "cuda":
            raise ValueError(
                f"the triton kernels need CUDA tensors; {name} is on {t.device}. Use the "
                "reference backend on the CPU, or set TRITON_INTERPRET=1 before importing ringflash"
            )
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device; got {q.device}, {k.device}, {v.device}")
    if q.shape[0] != k.shape[0] or k.shape[:3] != v.shape[:3]:
        raise ValueError(
            f"q (B, Sq, H, D) and k, v (B, Sk, Hkv, D) do not fit: {tuple(q.shape)}, "
            f"{tuple(k.shape)}, {tuple(v.shape)}"
        )
    D = q.shape[3]
    if not (D == k.shape[3] == v.shape[3]):
        raise ValueError(f"q, k, v must share head_dim; got {D}, {k.shape[3]}, {v.shape[3]}")
    if D > MAX_HEAD_DIM or D % 8 != 0 or D == 0:
        raise ValueError(
            f"the triton kernels support head_dim a multiple of 8 up to {MAX_HEAD_DIM} "
            f"(64 and 128 fastest; 32, 80, 96, 256 tested); got {D}"
        )
    if k.shape[2] == 0 or q.shape[2] % k.shape[2] != 0:
        raise ValueError(
            f"the number of query heads ({q.shape[2]}) must be a multiple of the number of "
            f"key/value heads ({k.shape[2]}, at least one)"
        )


_DEFAULT_POSITIONS: dict = {}
_DERIVED: OrderedDict = OrderedDict()  # _cached: what was made from attribute tensors
# A masked ring step derives up to four tables a layer reuses (the forward's tile ranges and row
# bounds, the backward's ranges by keys and the ordered dQ's rank table): 128 entries keep every
# step of a ring of 32 ranks (the entries are small: row bounds, the largest, are 8 bytes a token).
_DERIVED_KEPT = 128


def _cached(tensors: tuple, key: tuple, make):
    """``make()``, kept while the same tensors (the same objects, not modified in place since)
    come back with the same ``key``; tensors without a version counter (made under inference
    mode) are not cached by."""
    try:
        full = (tuple((id(t), t._version) for t in tensors), key)
    except RuntimeError:
        return make()
    hit = _DERIVED.get(full)
    if hit is not None and all(a is b for a, b in zip(hit[0], tensors)):
        _DERIVED.move_to_end(full)
        return hit[1]
    value = make()
    _DERIVED[full] = (tensors, value)
    while len(_DERIVED) > _DERIVED_KEPT:
        _DERIVED.popitem(last=False)
    return value


def _positions(q_pos, k_pos, Sq, Sk, device):
    """Position tensors for a causal call: the given ones (checked), or the default alignment.

    Each must be strictly increasing (every layout's are); that is not checked, since it would
    cost a device synchronisation, and other orders give wrong results."""
    if (q_pos is None) != (k_pos is None):
        raise ValueError("pass both q_pos and k_pos, or neither (the default alignment)")
    if q_pos is None:
        # reference.default_positions: keys 0..Sk-1, queries aligned to the end (bottom-right).
        # Made once per shape, so that what is cached by position tensors (a block pattern's
        # tile lists) is reused by single-device calls too.
        key = (Sq, Sk, torch.device(device))
        hit = _DEFAULT_POSITIONS.get(key)
        if hit is None:
            if len(_DEFAULT_POSITIONS) > 64:
                _DEFAULT_POSITIONS.clear()
            with torch.inference_mode(False):
                hit = (torch.arange(Sk - Sq, Sk, device=device), torch.arange(Sk, device=device))
            _DEFAULT_POSITIONS[key] = hit
        return hit
    for name, p, n in (("q_pos", q_pos, Sq), ("k_pos", k_pos, Sk)):
        if not isinstance(p, torch.Tensor) or p.dim() != 1 or p.shape[0] != n:
            raise ValueError(f"{name} must be a 1-D tensor of {n} positions; got {getattr(p, 'shape', p)}")
        if p.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"{name} must be int64 or int32, got {p.dtype}")
        if p.device != device:
            raise ValueError(f"{name} must be on {device}, got {p.device}")
    return q_pos.contiguous(), k_pos.contiguous()


class _MaskArgs(NamedTuple):
    q_pos: torch.Tensor | None
    k_pos: torch.Tensor | None
    q_doc: torch.Tensor | None
    k_doc: torch.Tensor | None
    wl: int
    wr: int
    window: int  # the WINDOW bit set
    docs: bool
    strides: tuple  # per-head attribute strides (q batch, q head, k batch, k head); zeros when shared
    blocks: object  # a BlockSparse, or None


def _per_head_attrs(q_pos, k_pos, q_doc, k_doc, B, H, Hkv, Sq, Sk, device):
    """Check per-head attributes (QK-dropping, hash buckets): positions and documents of shapes
    (B, H, Sq) and (B, Hkv, Sk), contiguous; returns them with their strides."""
    if q_doc is None or k_doc is None:
        raise ValueError("per-head positions need per-head document ids (q_doc, k_doc) too")
    for name, t, shape in (("q_pos", q_pos, (B, H, Sq)), ("k_pos", k_pos, (B, Hkv, Sk)),
                           ("q_doc", q_doc, (B, H, Sq)), ("k_doc", k_doc, (B, Hkv, Sk))):
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape:
            raise ValueError(f"per-head {name} must have shape {shape}; got {getattr(t, 'shape', t)}")
        if t.device != device:
            raise ValueError(f"{name} must be on {device}, got {t.device}")
    q_pos, k_pos = q_pos.to(torch.int64).contiguous(), k_pos.to(torch.int64).contiguous()
    q_doc, k_doc = q_doc.to(torch.int32).contiguous(), k_doc.to(torch.int32).contiguous()
    return q_pos, k_pos, q_doc, k_doc, (H * Sq, Sq, Hkv * Sk, Sk)


def _mask_args(q_pos, k_pos, causal, window, q_doc, k_doc, Sq, Sk, device, blocks=None, shape=None):
    """What the kernels take for a call's mask (:class:`_MaskArgs`).

    Positions where causal, a window or a block pattern reads them (default: bottom-right
    aligned), document ids (int32, one per token) where given; unused pointers are any tensor
    (never read). ``shape``: (B, H, Hkv), for per-head (3-D) attributes."""
    # WINDOW: 1 the left side bounds the keys, 2 the right side (with causal it never does).
    flags, wl, wr = 0, 0, 0
    if window is not None:
        left, right = window
        if left >= 0:
            flags, wl = flags | 1, int(left)
        if right >= 0 and not causal:
            flags, wr = flags | 2, int(right)
    if (q_doc is None) != (k_doc is None):
        raise ValueError("pass both q_doc and k_doc (document ids), or neither")
    if isinstance(q_pos, torch.Tensor) and q_pos.dim() == 3:
        if blocks is not None:
            raise ValueError("a block pattern takes the shared positions of the layout, not per-head ones")
        q_pos, k_pos, q_doc, k_doc, strides = _per_head_attrs(q_pos, k_pos, q_doc, k_doc, *shape, Sq, Sk, device)
        return _MaskArgs(q_pos, k_pos, q_doc, k_doc, wl, wr, flags, True, strides, None)
    if causal or flags or blocks is not None:
        q_pos, k_pos = _positions(q_pos, k_pos, Sq, Sk, device)
    else:
        q_pos = k_pos = None
    docs = q_doc is not None
    if docs:
        for name, d, n in (("q_doc", q_doc, Sq), ("k_doc", k_doc, Sk)):
            if not isinstance(d, torch.Tensor) or d.dim() != 1 or d.shape[0] != n:
                raise ValueError(f"{name} must be a 1-D tensor of {n} document ids; got {getattr(d, 'shape', d)}")
            if d.dtype not in (torch.int32, torch.int64) or d.device != device:
                raise ValueError(f"{name} must be an int32/int64 tensor on {device}; got {d.dtype} on {d.device}")
        q_doc, k_doc = q_doc.contiguous(), k_doc.contiguous()
    if blocks is not None and q_pos.dtype != torch.int64:
        q_pos, k_pos = q_pos.to(torch.int64), k_pos.to(torch.int64)
    return _MaskArgs(q_pos, k_pos, q_doc, k_doc, wl, wr, flags, docs, (0, 0, 0, 0), blocks)


def _derived(m: _MaskArgs, key: tuple, make):
    """``make()`` of a mask's derived tensor: for shared attributes made once while the same
    attribute tensors come back with the same ``key`` (the ring makes them once per step for a
    whole stack of layers, as FlexAttention's BlockMask is made once); for per-head ones (new
    tensors every call) kept with the attribute tensors themselves, so that a call's backward
    reuses what its forward made (:func:`_attached`)."""
    tensors = tuple(t for t in (m.q_pos, m.k_pos, m.q_doc, m.k_doc) if t is not None)
    if m.strides[1]:
        return _attached(tensors, key, make)
    return _cached(tensors, key, make)


def _attached(tensors: tuple, key: tuple, make):
    """``make()``, kept in an attribute of ``tensors[0]`` while it and the other tensors (the
    same objects, not modified in place since) come back with the same ``key``. It lives exactly
    as long as that tensor: per-head attributes are saved for the backward and freed with the
    autograd graph, and so is what was made from them. The other tensors are held weakly (no
    reference cycle through the attribute). One entry a key: queries used with several key
    blocks (a ring's steps) keep the last block's, so the memory stays one table a kind."""
    try:
        versions = tuple(t._version for t in tensors)
    except RuntimeError:  # inference tensors: no version counter
        return make()
    store = tensors[0].__dict__.setdefault("_ringflash_derived", {})
    hit = store.get(key)
    if hit is not None and hit[0] == versions and all(r() is t for r, t in zip(hit[1], tensors)):
        return hit[2]
    value = make()
    store[key] = (versions, tuple(weakref.ref(t) for t in tensors), value)
    return value


def _attr_args(m: _MaskArgs, dummy: torch.Tensor) -> tuple:
    """(q_pos, q_doc, k_pos, k_doc) for a launch, ``dummy`` where the mask has none (never read)."""
    q_pos, k_pos = (m.q_pos, m.k_pos) if m.q_pos is not None else (dummy, dummy)
    q_doc, k_doc = (m.q_doc, m.k_doc) if m.q_doc is not None else (dummy, dummy)
    return q_pos, q_doc, k_pos, k_doc


def _tile_ranges(m: _MaskArgs, causal, Sq, Sk, block_m, block_n, *, by_keys: bool, device,
                 heads: tuple = (1, 1, 1)) -> torch.Tensor:
    """(B * H, tiles, 4) int32 ranges of every query tile (key tile with ``by_keys``) for the
    mask, with ``heads`` = (B, H, G) for per-head attributes; for shared ones (1, tiles, 4),
    shared by every batch row and head of the attention launch that reads it, and made once
    while the same attribute tensors come back (:func:`_derived`). One small launch."""
    return _derived(m, (bool(causal), m.wl, m.wr, m.window, m.docs, Sq, Sk, block_m, block_n, by_keys, str(device)),
                    lambda: _make_ranges(m, causal, Sq, Sk, block_m, block_n, by_keys, device, heads))


def _make_ranges(m: _MaskArgs, causal, Sq, Sk, block_m, block_n, by_keys, device, heads) -> torch.Tensor:
    tiles = triton.cdiv(Sk if by_keys else Sq, block_n if by_keys else block_m)
    B, H, G = heads if m.strides[1] else (1, 1, 1)
    ranges = torch.empty((B * H, tiles, 4), dtype=torch.int32, device=device)
    _ranges_kernel[(tiles, B * H)](
        *_attr_args(m, ranges), ranges, Sq, Sk, m.wl, m.wr, *m.strides, H, G,
        BLOCK_M=block_m, BLOCK_N=block_n, CAUSAL=bool(causal), WINDOW=m.window, DOCS=m.docs, BY_KEYS=by_keys,
        num_warps=4, **FP_FUSION,
    )
    return ranges


def _row_bounds(m: _MaskArgs, causal, Sq, Sk, *, device, heads: tuple = (1, 1, 1)) -> torch.Tensor:
    """(B * H, Sq, 2) int32 ``[first, end)`` of the keys each query row sees
    (``_row_bounds_kernel``), made as :func:`_tile_ranges` makes its ranges; (1, Sq, 2) for shared
    attributes. Not for block patterns (their visible keys are not one run)."""
    assert m.blocks is None, "a block pattern's visible keys are not one run a row"

    def make():
        B, H, G = heads if m.strides[1] else (1, 1, 1)
        bounds = torch.empty((B * H, Sq, 2), dtype=torch.int32, device=device)
        block = 128
        _row_bounds_kernel[(triton.cdiv(Sq, block), B * H)](
            *_attr_args(m, bounds), bounds, Sq, Sk, max(1, int(Sk).bit_length()), m.wl, m.wr, *m.strides, H, G,
            BLOCK=block, CAUSAL=bool(causal), WINDOW=m.window, DOCS=m.docs, HEAD_ATTRS=bool(m.strides[1]),
            num_warps=4, **FP_FUSION)
        return bounds

    return _derived(m, ("rows", bool(causal), m.wl, m.wr, m.window, m.docs, Sq, Sk, str(device)), make)


# The Triton kernels' boundary tiles under windows, documents and the sparse modes' per-head
# attributes masked by each query row's run of visible keys (:func:`_row_bounds`), as the Hopper
# forward's (HOPPER_FWD_ROW_BOUNDS); RINGFLASH_ROW_BOUNDS=0 turns it off. Causal-only and full
# calls and block patterns keep their own masks.
ROW_BOUNDS = os.environ.get("RINGFLASH_ROW_BOUNDS", "1") != "0"


def _triton_row_bounds(m: _MaskArgs, causal, Sq, Sk, device, heads) -> torch.Tensor | None:
    """The row bounds a Triton forward or backward launch takes (ROW_BOUNDS), or None."""
    if not ROW_BOUNDS or m.blocks is not None or not (m.window or m.docs):
        return None
    return _row_bounds(m, causal, Sq, Sk, device=device, heads=heads)


def _sparse_stages(cfg: KernelConfig, m: _MaskArgs) -> KernelConfig:
    """Block-sparse launches pipeline two stages: with the tile list's indirection, three stages
    of 128 x 128 tiles at D = 128 asked for 235520 bytes of shared memory on H100 (232448 there)."""
    return cfg._replace(num_stages=min(cfg.num_stages, 2)) if m.blocks is not None else cfg


def _lists(m: _MaskArgs, causal, Sq, Sk, block_m, block_n, *, by_keys: bool, device):
    """The block pattern's tile lists and counts for one launch (:mod:`.blocks`), cached while
    the same attribute tensors come back."""
    tensors = tuple(t for t in (m.q_pos, m.k_pos, m.q_doc, m.k_doc) if t is not None)
    key = ("lists", bool(causal), m.window, m.wl, m.wr, m.docs, m.blocks, block_m, block_n, by_keys)
    return _cached(tensors, key, lambda: tile_lists(
        _tile_ranges(m, causal, Sq, Sk, block_m, block_n, by_keys=by_keys, device=device),
        m.q_pos, m.k_pos, m.blocks, block_m, block_n, by_keys=by_keys))


def _check_accumulator(name, t, shape, device):
    if t.dtype != torch.float32 or tuple(t.shape) != tuple(shape) or t.device != device:
        raise ValueError(
            f"{name} must be a float32 tensor of shape {tuple(shape)} on {device}; got "
            f"{t.dtype} {tuple(t.shape)} on {t.device}"
        )
    if t.stride(-1) != 1:
        raise ValueError(f"{name} must have a contiguous last dim; got strides {t.stride()}")


def _check_out_dtype(name, dtype, input_dtype):
    if dtype is not None and dtype not in (torch.float32, input_dtype):
        raise ValueError(f"{name} must be torch.float32 or the inputs' dtype {input_dtype}; got {dtype}")


# The stage counts that fit, per (kernel, constexprs, stages asked for): see _launch.
_STAGES_FIT: dict = {}


def _launch(kernel, grid, *args, num_warps: int, num_stages: int, **constexprs) -> None:
    """``kernel[grid](*args, **constexprs)`` with ``num_stages`` lowered one at a time while the
    compiled kernel needs more shared memory than the GPU has. The tables' stage counts fit the
    plain kernels; some mask combinations (a window with documents at D = 128) need a few
    hundred bytes more. Triton raises before launching, so a retry has no side effects; the
    count that fits is remembered per constexpr set."""
    key = (kernel, num_warps, num_stages, tuple(sorted(constexprs.items())))
    stages = _STAGES_FIT.get(key, num_stages)
    while True:
        try:
            kernel[grid](*args, **constexprs, num_warps=num_warps, num_stages=stages, **FP_FUSION)
        except OutOfResources:
            if stages <= 1:
                raise
            stages -= 1
            continue
        _STAGES_FIT[key] = stages
        return


_HOPPER_DEVICES: dict = {}


def _hopper_serves(q: torch.Tensor, m: _MaskArgs, enabled: bool, head_dims=None, per_head: bool = False) -> bool:
    """Whether the Hopper kernels take this call (``enabled``: HOPPER_FORWARD or HOPPER_BACKWARD;
    ``head_dims``: those taken, default every one the kernels have; ``per_head``: the kernel
    takes per-head attributes, as the forward does)."""
    if not enabled or INTERPRETED or q.device.type != "cuda":
        return False
    if q.dtype not in (torch.float16, torch.bfloat16) or q.shape[3] not in (HOPPER_FWD_CONFIGS if head_dims is None else head_dims):
        return False
    if m.blocks is not None or (m.strides[1] and not per_head) or q.shape[0] * q.shape[2] > 65535:
        return False
    index = q.device.index if q.device.index is not None else torch.cuda.current_device()
    if index not in _HOPPER_DEVICES:
        ok = torch.cuda.get_device_capability(index) == (9, 0)
        if ok:
            try:
                from . import _bwd_dkdv_hopper, _bwd_dq_hopper, _fwd_hopper  # noqa: F401  (Gluon: Triton 3.6 or newer)
            except ImportError:
                ok = False
        _HOPPER_DEVICES[index] = ok
    return _HOPPER_DEVICES[index]


_HOPPER_BWD_FAILED: set = set()  # devices where the Hopper backward did not compile


def _device_index(q: torch.Tensor) -> int:
    index = q.device.index
    if index is None:
        index = torch.cuda.current_device() if q.device.type == "cuda" else -1
    return index


def _hopper_failed(q: torch.Tensor, error: Exception, kind: str = "forward") -> None:
    """A Hopper kernel did not compile here (a Triton whose Gluon it does not build on, say):
    warn once and leave this GPU's calls of that kind (``kind``: "forward", which also turns the
    backward off, or "backward") to the Triton kernels. Both are on by default, so a failure to
    build one must not fail calls that the Triton kernels serve."""
    index = _device_index(q)
    if kind == "forward":
        _HOPPER_DEVICES[index] = False
    else:
        _HOPPER_BWD_FAILED.add(index)
    warnings.warn(
        f"ringflash: the Hopper {kind} kernel did not compile on this GPU with Triton {triton.__version__} "
        f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}); using the Triton kernels. "
        f"RINGFLASH_HOPPER_{kind.upper()}=0 skips the attempt.", RuntimeWarning, stacklevel=3)


def _tma_addressable(t: torch.Tensor) -> bool:
    """Whether TMA can address ``t`` (B, S, H, D) as it is: 16-byte aligned base and strides, a
    contiguous last dim."""
    return (t.data_ptr() % 16 == 0 and all(st * t.element_size() % 16 == 0 for st in t.stride()[:3])
            and t.stride(3) == 1)


def _tma_ready(t: torch.Tensor) -> torch.Tensor:
    """``t``, or a contiguous copy where TMA cannot read it (:func:`_tma_addressable`)."""
    # clone, not contiguous(): a contiguous view at an unaligned address would come back as is
    return t if _tma_addressable(t) else t.clone(memory_format=torch.contiguous_format)


@functools.lru_cache(maxsize=None)
def _smem_layout(rows: int, head_dim: int, dtype: torch.dtype):
    """The shared-memory layout of a [1, rows, 1, head_dim] TMA box (made once per shape: the ring
    builds descriptors on every step)."""
    from triton.experimental.gluon import language as gl

    gdt = {torch.bfloat16: gl.bfloat16, torch.float16: gl.float16, torch.float32: gl.float32}[dtype]
    return gl.NVMMASharedLayout.get_default_for([1, rows, 1, head_dim], gdt)


# HOPPER_BWD_STATS_SMEM: the Hopper dK/dV program's producer loads each step's LSE and delta rows
# into shared memory with the step's Q and dO (FA3's route), instead of the consumers loading them
# from global memory after issuing the step's first products. An ncu profile of the backward
# without it (H100, 8k causal, benchmarks/results/kernels_h100_dq_store/) found the consumers'
# most sampled stall on those loads (the multiply of LSE by log2(e), 6.3% of all samples). With
# it the dK/dV kernel takes 0.89-0.99x the time (8k and 16k, full and causal; the backward
# 1.03-1.14x faster, benchmarks/results/kernels_h100_stats_smem/), with the same gradients bit for
# bit. Needs FA3's routes (HOPPER_BWD_SMEM_P or dQ in the program), and LSE and delta rows TMA can
# address (a sequence length that is a multiple of 4); other calls load them as before. 1 KB of
# shared memory at two stages. On by default; RINGFLASH_HOPPER_BWD_STATS_SMEM=0 turns it off.
HOPPER_BWD_STATS_SMEM = os.environ.get("RINGFLASH_HOPPER_BWD_STATS_SMEM", "1") == "1"


def _dq_mode() -> int:
    """HOPPER_BWD_DQ as the dK/dV kernel's DQ_MODE: 0 (the dQ kernel), 1 (atomic), 2 (ordered)."""
    modes = {"kernel": 0, "atomic": 1, "ordered": 2}
    if HOPPER_BWD_DQ not in modes:
        raise ValueError(f"RINGFLASH_HOPPER_BWD_DQ must be one of {sorted(modes)}; got {HOPPER_BWD_DQ!r}")
    return modes[HOPPER_BWD_DQ]


def _dq_writers() -> int:
    """HOPPER_BWD_DQ_WRITERS as the dK/dV kernel's DQ_WRITERS: 1 or 2."""
    if str(HOPPER_BWD_DQ_WRITERS) not in ("1", "2"):
        raise ValueError(f"RINGFLASH_HOPPER_BWD_DQ_WRITERS must be 1 or 2; got {HOPPER_BWD_DQ_WRITERS!r}")
    return int(HOPPER_BWD_DQ_WRITERS)


def _smem_p() -> bool:
    """Whether the dK/dV program takes FA3's operand routes (HOPPER_BWD_SMEM_P, or dQ in it)."""
    return HOPPER_BWD_SMEM_P or _dq_mode() > 0


def _dkdv_config(D: int) -> KernelConfig:
    return (HOPPER_BWD_DKDV_SMEM_P_CONFIGS if _smem_p() else HOPPER_BWD_DKDV_CONFIGS)[D]


def _dq_order(ranges_kv, n_k: int, n_q: int, block_m: int, device) -> torch.Tensor:
    """(n_k, n_q) int32: for key tile n and query tile m (of ``block_m`` queries, the dK/dV
    program's step), how many higher key tiles add into query tile m before n does (the ordered
    dQ's order, last key tile first), from the query range [lo, hi) each key tile walks
    (``ranges_kv`` rows (lo, flo, fhi, hi), in queries). Made on the device from the ranges the
    programs walk, so every count a program waits for is reached."""
    starts = torch.arange(n_q, device=device, dtype=torch.int32)[None, :] * block_m
    visits = ((starts >= ranges_kv[0, :, 0:1]) & (starts < ranges_kv[0, :, 3:4])).to(torch.int32)
    return (visits.sum(0, keepdim=True, dtype=torch.int32) - torch.cumsum(visits, 0, dtype=torch.int32)).contiguous()


@functools.lru_cache(maxsize=None)
def _p_layout(rows: int, cols: int, dtype: torch.dtype):
    """The shared-memory layout of the dK/dV program's P and dS tiles (HOPPER_BWD_SMEM_P)."""
    from triton.experimental.gluon import language as gl

    gdt = gl.bfloat16 if dtype == torch.bfloat16 else gl.float16
    return gl.NVMMASharedLayout.get_default_for([rows, cols], gdt)


def _descriptors(tensors_rows):
    """Host TMA descriptors, 4-D over (B, S, H, D) with boxes [1, rows, 1, D]: rows past a
    batch's sequence end are zero-filled on load, never the next batch's rows."""
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    descs = []
    for t, rows in tensors_rows:
        t = _tma_ready(t)
        block = [1, rows, 1, t.shape[3]]
        layout = _smem_layout(rows, t.shape[3], t.dtype)
        descs.append(TensorDescriptor(t, list(t.shape), list(t.stride()), block, layout))
    return descs


# The Hopper forward's boundary tiles masked by each row's run of visible keys (_row_bounds, two
# compares of a column index an element) instead of the keys' positions and documents loaded per
# tile and compared with the rows' (an ncu profile: a boundary tile cost 3.6x the instructions of a
# fully visible one, benchmarks/results/sparse_h100_ncu/). On an H100 the forward ran 1.12x / 1.25x
# faster with documents at 32k / 128k, 1.37-1.63x with hash:8, 0.99-1.05x causal and windowed
# (benchmarks/results/masks_h100_row_bounds/). RINGFLASH_HOPPER_FWD_ROW_BOUNDS=0 turns it off.
HOPPER_FWD_ROW_BOUNDS = os.environ.get("RINGFLASH_HOPPER_FWD_ROW_BOUNDS", "1") != "0"


# The same in the Hopper backward's dK/dV program (FA3's routes): a boundary tile's P masked by its
# query rows' runs of visible keys, two loads a row, instead of both sides' positions and
# documents. "auto" (the default): under a window bounded on both sides (a causal mask bounds
# the right) whose span is at most HOPPER_BWD_ROW_BOUNDS_SPAN keys; "1": under every mask; "0":
# never. With the dQ additions in a fixed order, long walks ran much slower with them (causal
# backward 1.58x the time at 64k, 1.95x at 128k; the same kernel adding dQ in any order did not
# slow down), while a window's walks are short (benchmarks/results/kernels_h100_bwd_row_bounds/;
# the span: masks_h100_bwd_row_bounds_windows/). RINGFLASH_HOPPER_BWD_ROW_BOUNDS sets it.
HOPPER_BWD_ROW_BOUNDS = os.environ.get("RINGFLASH_HOPPER_BWD_ROW_BOUNDS", "auto")
HOPPER_BWD_ROW_BOUNDS_SPAN = 16384


def _hopper_bwd_row_bounds(m: _MaskArgs, causal) -> bool:
    """HOPPER_BWD_ROW_BOUNDS for a backward call's mask."""
    if HOPPER_BWD_ROW_BOUNDS not in ("auto", "0", "1"):
        raise ValueError(f"RINGFLASH_HOPPER_BWD_ROW_BOUNDS must be auto, 0 or 1; got {HOPPER_BWD_ROW_BOUNDS!r}")
    if HOPPER_BWD_ROW_BOUNDS != "auto":
        return HOPPER_BWD_ROW_BOUNDS == "1"
    bounded = bool(m.window & 1) and (bool(m.window & 2) or bool(causal))
    return bounded and m.wl + m.wr <= HOPPER_BWD_ROW_BOUNDS_SPAN


def _hopper_launch(q, k, v, m: _MaskArgs, causal, scale, out, lse, fold, ranges, bounds=None):
    """The Hopper kernel's grid, arguments, constexprs and warps (_fwd_hopper.py) for a forward
    call; ``ranges``: the query tiles' key ranges (_tile_ranges) where the mask has any."""
    B, Sq, H, D = q.shape
    Sk, Hkv = k.shape[1], k.shape[2]
    cfg = HOPPER_FWD_CONFIGS[D]
    split = 1 if HOPPER_FWD_SPLIT == 1 else cfg.num_warps // 4  # a partition per consumer warpgroup
    if not ((split == 1 and cfg.num_warps == 8 and cfg.block_m == 128)
            or (split in (2, 3) and cfg.num_warps == 4 * split and cfg.block_m == 64 * split)):
        raise ValueError(f"HOPPER_FWD_CONFIGS[{D}] = {cfg} does not suit HOPPER_FWD_SPLIT = {HOPPER_FWD_SPLIT}: a "
                         "consumer warpgroup (4 warps) owns 64 query rows; 8 warps in one partition, or 8 or 12 in "
                         "partitions of one warpgroup")
    pingpong = bool(HOPPER_FWD_PINGPONG) and split == 2
    n_items = triton.cdiv(Sq, cfg.block_m) * B * H
    persistent = bool(m.window and not m.docs) if HOPPER_FWD_PERSISTENT is None else bool(HOPPER_FWD_PERSISTENT)
    persistent = persistent and not pingpong
    if persistent:
        grid = (min(n_items, _sm_count(q.device)),)
        # the next item to draw, then each program's two item slots
        counter = torch.zeros(1 + 2 * grid[0], dtype=torch.int32, device=q.device)
    else:
        grid = (triton.cdiv(Sq, cfg.block_m), B * H)
        counter = lse  # never read
    descs = _descriptors(((q, cfg.block_m // split), (k, cfg.block_n), (v, cfg.block_n)))
    q_pos, k_pos = (lse, lse) if m.q_pos is None else (m.q_pos, m.k_pos)  # None: never read
    q_doc, k_doc = (lse, lse) if m.q_doc is None else (m.q_doc, m.k_doc)
    args = (*descs, q_pos, k_pos, q_doc, k_doc, lse if ranges is None else ranges,
            lse if bounds is None else bounds, out, lse,
            float(scale) * math.log2(math.e), m.wl, m.wr, *m.strides,
            out.stride(0), out.stride(1), out.stride(2), lse.stride(0), lse.stride(1),
            H, H // Hkv, Sq, Sk, n_items, counter, _kv_swizzle(k, H // Hkv))
    constexprs = dict(
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, HEAD_DIM=D, STAGES=cfg.num_stages,
        CAUSAL=bool(causal), WINDOW=m.window, DOCS=m.docs, RANGED=ranges is not None,
        HEAD_ATTRS=bool(m.strides[1]), ROWB=bounds is not None, FOLD=fold,
        PRODUCER_WARPS=HOPPER_PRODUCER[0], PRODUCER_REGS=HOPPER_PRODUCER[1], CONSUMER_WARPS=cfg.num_warps,
        CONSUMER_REGS=HOPPER_CONSUMER_REGS.get(split, 0), SPLIT=split, PINGPONG=pingpong, PERSISTENT=persistent,
    )
    return grid, args, constexprs, cfg.num_warps // split


def _forward_hopper(q, k, v, m: _MaskArgs, causal, scale, out, lse, fold):
    """forward() on the Hopper kernel: same arguments and results."""
    from ._fwd_hopper import _attn_fwd_hopper

    ranges = None
    if causal or m.window or m.docs:
        cfg = HOPPER_FWD_CONFIGS[q.shape[3]]
        ranges = _tile_ranges(m, causal, q.shape[1], k.shape[1], cfg.block_m, cfg.block_n, by_keys=False,
                              device=q.device, heads=(q.shape[0], q.shape[2], q.shape[2] // k.shape[2]))
    bounds = None
    if ranges is not None and HOPPER_FWD_ROW_BOUNDS:
        bounds = _row_bounds(m, causal, q.shape[1], k.shape[1], device=q.device,
                             heads=(q.shape[0], q.shape[2], q.shape[2] // k.shape[2]))
    grid, args, constexprs, num_warps = _hopper_launch(q, k, v, m, causal, scale, out, lse, fold, ranges, bounds)
    _attn_fwd_hopper[grid](*args, **constexprs, num_warps=num_warps, **FP_FUSION)
    return out, lse


def forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    q_pos: torch.Tensor | None = None,
    k_pos: torch.Tensor | None = None,
    causal: bool = False,
    softmax_scale: float | None = None,
    out: torch.Tensor | None = None,
    lse: torch.Tensor | None = None,
    window: tuple[int, int] | None = None,
    q_doc: torch.Tensor | None = None,
    k_doc: torch.Tensor | None = None,
    blocks=None,
    out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of ``q`` over ``k, v`` as float32 partials (see :func:`ringflash.reference.forward`).

    q: (B, Sq, H, D); k, v: (B, Sk, Hkv, D); q_pos (Sq,), k_pos (Sk,) strictly increasing
    int64/int32 positions (with ``causal`` or a window; default: bottom-right aligned);
    ``window``: (left, right), -1 unbounded; q_doc (Sq,), k_doc (Sk,) non-decreasing document
    ids (int32; a query sees only keys of its own document); ``blocks`` a block pattern
    (:class:`ringflash.sparse.BlockSparse`) over the positions. Per-head attributes: positions
    and document ids (B, H, Sq) / (B, Hkv, Sk), each row sorted (:mod:`ringflash.sparse`). Returns
    ``out`` (B, Sq, H, D) float32 and ``lse`` (B, H, Sq) float32, natural log. If ``out`` and
    ``lse`` (float32, contiguous) are given, this block is folded into them in place.
    ``out_dtype``: a new ``out`` in this dtype instead (float32 or q's dtype; the kernels store
    it directly, so a caller that wants O in the inputs' dtype pays no cast).
    """
    check_inputs(q, k, v)
    B, Sq, H, D = q.shape
    Sk, Hkv = k.shape[1], k.shape[2]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(D)
    fold = out is not None or lse is not None
    _check_out_dtype("out_dtype", out_dtype, q.dtype)
    if fold:
        if out is None or lse is None:
            raise ValueError("pass both out and lse to fold into a running result, or neither")
        if out_dtype is not None:
            raise ValueError("out_dtype is for a new result; a fold adds into the given float32 out")
        _check_accumulator("out", out, (B, Sq, H, D), q.device)
        _check_accumulator("lse", lse, (B, H, Sq), q.device)
    else:
        out = torch.empty((B, Sq, H, D), dtype=out_dtype or torch.float32, device=q.device)
        lse = torch.empty((B, H, Sq), dtype=torch.float32, device=q.device)
    if Sq == 0 or B == 0 or H == 0:
        return out, lse
    if Sk == 0:
        if not fold:
            out.zero_()
            lse.fill_(-math.inf)
        return out, lse
    m = _mask_args(q_pos, k_pos, causal, window, q_doc, k_doc, Sq, Sk, q.device, blocks, (B, H, Hkv))
    if _hopper_serves(q, m, HOPPER_FORWARD, HOPPER_FWD_HEAD_DIMS, per_head=True):
        try:
            return _forward_hopper(q, k, v, m, causal, scale, out, lse, fold)
        except TritonError as e:  # raised while compiling, before anything ran
            _hopper_failed(q, e)

    cfg = _sparse_stages(_config(FWD_CONFIGS, _INTERPRET_FWD, D, q.dtype, bool(causal)), m)
    ranges = lists = counts = lse
    if m.blocks is not None:
        lists, counts = _lists(m, causal, Sq, Sk, cfg.block_m, cfg.block_n, by_keys=False, device=q.device)
    elif m.window or m.docs:
        ranges = _tile_ranges(m, causal, Sq, Sk, cfg.block_m, cfg.block_n, by_keys=False, device=q.device,
                              heads=(B, H, H // Hkv))
    bounds = _triton_row_bounds(m, causal, Sq, Sk, q.device, (B, H, H // Hkv))
    q_pos, k_pos = (lse, lse) if m.q_pos is None else (m.q_pos, m.k_pos)  # None: never read
    q_doc, k_doc = (lse, lse) if m.q_doc is None else (m.q_doc, m.k_doc)
    pat, nb, bs = (m.blocks.on(q.device), m.blocks.num_blocks, m.blocks.block_size) if m.blocks is not None else (lse, 1, 1)
    grid = (triton.cdiv(Sq, cfg.block_m), B * H)
    _launch(
        _attn_fwd, grid, q, k, v, q_pos, k_pos, q_doc, k_doc, ranges, out, lse,
        pat, lists, counts, lse if bounds is None else bounds,
        scale * LOG2E, m.wl, m.wr, nb, bs, *m.strides,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        lse.stride(0), lse.stride(1), lse.stride(2),
        H, H // Hkv, Sq, Sk, _kv_swizzle(k, H // Hkv),
        HEAD_DIM=D, BLOCK_D=_block_d(D),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        CAUSAL=bool(causal), FOLD=fold, DOT_PREC=_dot_precision(q.dtype), WIDE=_wide(q, k, v, out),
        WINDOW=m.window, DOCS=m.docs, SPARSE=m.blocks is not None, ROWB=bounds is not None,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out, lse


def _hopper_bwd_launches(dout, q, k, v, lse, delta, m: _MaskArgs, causal, scale, dq, dk, dv,
                         acc_dq, acc_dkdv, ranges_kv, ranges_q, bounds=None, counters=None, fresh=False):
    """(grid, args, constexprs, warps) of the Hopper dK/dV and dQ kernels for a backward call (the
    dK/dV kernel's alone where it adds dQ itself, HOPPER_BWD_DQ);
    ``ranges_kv`` / ``ranges_q``: the key tiles' query ranges and the query tiles' key ranges
    (_tile_ranges) where the mask has any, else None; ``bounds``: the rows' runs of visible keys
    (_row_bounds) for the dK/dV program's boundary tiles (FA3's routes only), or None. Ordered
    dQ additions: ``counters`` (_dq_counters; made here when None) and ``fresh``, whether dQ's
    contents may be overwritten (the first addition into each query tile is then a store)."""
    B, Sq, H, D = q.shape
    Sk, Hkv = k.shape[1], k.shape[2]
    c1, c2 = _dkdv_config(D), HOPPER_BWD_DQ_CONFIGS[D]
    q_pos, k_pos = (lse, lse) if m.q_pos is None else (m.q_pos, m.k_pos)  # None: never read
    q_doc, k_doc = (lse, lse) if m.q_doc is None else (m.q_doc, m.k_doc)
    common = dict(HEAD_DIM=D, CAUSAL=bool(causal), WINDOW=m.window, DOCS=m.docs,
                  PRODUCER_WARPS=HOPPER_PRODUCER[0], PRODUCER_REGS=HOPPER_PRODUCER[1])
    log2e = math.log2(math.e)
    launches = []
    both = ((c1, ranges_kv, True), (c2, ranges_q, False))
    for cfg, rng, by_keys in both[:1] if _dq_mode() else both:  # no dQ kernel where dQ is fused
        descs = _descriptors(((q, cfg.block_m), (k, cfg.block_n), (v, cfg.block_n), (dout, cfg.block_m)))
        head = (*descs, lse, delta, q_pos, k_pos, q_doc, k_doc, lse if rng is None else rng)
        tail = (float(scale), float(scale) * log2e, m.wl, m.wr, lse.stride(0), lse.stride(1))
        meta = dict(common, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, STAGES=cfg.num_stages,
                    RANGED=rng is not None, CONSUMER_WARPS=cfg.num_warps)
        if by_keys:
            mode = _dq_mode()
            if mode:  # dQ added by these programs: its float32 TMA descriptor, the order's counters
                dq_desc = _descriptors(((dq, cfg.block_m),))[0]
                sem = rank = lse  # never read
                if mode == 2:
                    n_q = triton.cdiv(Sq, cfg.block_m)
                    sem = _dq_counters(q) if counters is None else counters
                    assert sem.shape == (B * H, n_q)
                    if rng is not None:
                        n_k = triton.cdiv(Sk, cfg.block_n)
                        rank = _cached((rng,), ("dq_order", n_k, n_q, cfg.block_m),
                                       lambda: _dq_order(rng, n_k, n_q, cfg.block_m, q.device))
            else:
                dq_desc, sem, rank = descs[1], lse, lse  # never read
            rowb = bounds is not None and rng is not None and _smem_p()
            stats = _stats_smem(lse, delta)
            if stats:  # the producer loads LSE and delta rows by TMA: their descriptors in place of the pointers
                head = (*descs, *_stats_descriptors((lse, delta), cfg.block_m), *head[len(descs) + 2:])
            args = (*head, bounds if rowb else lse, dk, dv, *tail, dk.stride(0), dk.stride(1), dk.stride(2),
                    dv.stride(0), dv.stride(1), dv.stride(2), H, H // Hkv, Sq, Sk, dq_desc, sem, rank)
            p_layout = _p_layout(cfg.block_m, cfg.block_n, q.dtype) if _smem_p() else None
            if mode == 2 and fresh:
                mode = 3  # the ordered additions, the first into each query tile a store
            launches.append(((triton.cdiv(Sk, cfg.block_n), B * Hkv), args,
                             dict(meta, ACCUMULATE=acc_dkdv, SMEM_P=_smem_p(), P_LAYOUT=p_layout, DQ_MODE=mode,
                                  DQ_WRITERS=_dq_writers() if mode else 1, ROWB=rowb, STATS_SMEM=stats),
                             cfg.num_warps))
        else:
            args = (*head, dq, *tail, dq.stride(0), dq.stride(1), dq.stride(2), H, H // Hkv, Sq, Sk,
                    _kv_swizzle(k, H // Hkv))
            launches.append(((triton.cdiv(Sq, cfg.block_m), B * H), args, dict(meta, ACCUMULATE=acc_dq),
                             cfg.num_warps))
    return launches


def _stats_smem(lse: torch.Tensor, delta: torch.Tensor) -> bool:
    """Whether the Hopper dK/dV program's producer loads LSE and delta rows (HOPPER_BWD_STATS_SMEM):
    FA3's routes, and (B, H, S) float32 rows TMA can address (16-byte strides and base)."""
    if not (HOPPER_BWD_STATS_SMEM and _smem_p()):
        return False
    return all(t.dtype == torch.float32 and t.is_contiguous() and t.shape[-1] % 4 == 0 and t.data_ptr() % 16 == 0
               for t in (lse, delta))


def _stats_descriptors(tensors, rows: int):
    """TMA descriptors of (B, H, S) float32 rows, boxes of ``rows`` rows of one (batch, head),
    unswizzled (rows past S read as 0)."""
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    layout = gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=32, rank=3)
    return [TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 1, rows], layout) for t in tensors]


def _dq_counters(q: torch.Tensor) -> torch.Tensor:
    """The ordered dQ additions' counters, one per (batch, query head, query tile of the dK/dV
    program's step): how many key tiles have added into the tile so far."""
    B, Sq, H, D = q.shape
    return torch.zeros((B * H, triton.cdiv(Sq, _dkdv_config(D).block_m)), dtype=torch.int32, device=q.device)


_FINISH_BLOCK_M = 64


def _finish_dq(dq_sum: torch.Tensor, dq: torch.Tensor, counters: torch.Tensor, tile: int, accumulate: bool) -> None:
    """dQ after ordered additions into a dQ that was not zeroed (DQ_MODE = 3): where ``dq_sum`` is
    ``dq``, the rows of query tiles that no key tile added into (their counter is 0) are zeroed;
    otherwise ``dq`` gets ``dq_sum`` cast to its dtype (added with ``accumulate``), 0 in those
    rows (_bwd._bwd_dq_finish)."""
    B, Sq, H, D = dq.shape
    grid = (triton.cdiv(Sq, _FINISH_BLOCK_M), B * H)
    _bwd_dq_finish[grid](
        dq_sum, dq, counters,
        dq_sum.stride(0), dq_sum.stride(1), dq_sum.stride(2),
        dq.stride(0), dq.stride(1), dq.stride(2),
        H, Sq, counters.shape[1],
        HEAD_DIM=D, BLOCK_D=_block_d(D), BLOCK_M=_FINISH_BLOCK_M, TILE=tile,
        IN_PLACE=dq_sum is dq, ACCUMULATE=accumulate, num_warps=4, **FP_FUSION,
    )


def _backward_hopper(dout, q, k, v, lse, delta, m: _MaskArgs, causal, scale, dq, dk, dv, acc_dq, acc_dkdv,
                     after_dkdv):
    """backward() on the Hopper kernels: same arguments and results."""
    from ._bwd_dkdv_hopper import _attn_bwd_dkdv_hopper
    from ._bwd_dq_hopper import _attn_bwd_dq_hopper

    Sq, D, Sk = q.shape[1], q.shape[3], k.shape[1]
    fused = _dq_mode() > 0
    ranges_kv = ranges_q = None
    if causal or m.window or m.docs:
        c1, c2 = _dkdv_config(D), HOPPER_BWD_DQ_CONFIGS[D]
        ranges_kv = _tile_ranges(m, causal, Sq, Sk, c1.block_m, c1.block_n, by_keys=True, device=q.device)
        if not fused:
            ranges_q = _tile_ranges(m, causal, Sq, Sk, c2.block_m, c2.block_n, by_keys=False, device=q.device)
    dq_sum = dq
    ordered = _dq_mode() == 2
    counters = _dq_counters(q) if fused and ordered else None
    fresh = False  # dQ's contents may be overwritten: the ordered additions start with a store
    if fused:
        # The reductions add into a float32 dQ that TMA can address: the given one, or a new one
        # that is added (or cast) into it afterwards. Ordered, the first addition into each query
        # tile is a store, so neither needs zeros first: _finish_dq zeros the tiles none walked.
        if dq.dtype == torch.float32 and _tma_addressable(dq):
            if not acc_dq:
                fresh = ordered
                if not ordered:
                    dq.zero_()
        else:
            fresh = ordered
            dq_sum = (torch.empty if ordered else torch.zeros)(q.shape, dtype=torch.float32, device=q.device)
    bounds = None
    if ranges_kv is not None and _smem_p() and _hopper_bwd_row_bounds(m, causal):
        bounds = _row_bounds(m, causal, Sq, Sk, device=q.device)
    launches = _hopper_bwd_launches(dout, q, k, v, lse, delta, m, causal, scale, dq_sum, dk, dv, acc_dq, acc_dkdv,
                                    ranges_kv, ranges_q, bounds, counters, fresh)
    g1, a1, m1, w1 = launches[0]
    _attn_bwd_dkdv_hopper[g1](*a1, **m1, num_warps=w1, **FP_FUSION)
    if after_dkdv is not None:
        after_dkdv()
    if not fused:
        g2, a2, m2, w2 = launches[1]
        _attn_bwd_dq_hopper[g2](*a2, **m2, num_warps=w2, **FP_FUSION)
    elif fresh:
        _finish_dq(dq_sum, dq, counters, _dkdv_config(D).block_m, acc_dq)
    elif dq_sum is not dq:
        if acc_dq:
            dq += dq_sum
        else:
            dq.copy_(dq_sum)
    return dq, dk, dv


def backward_delta(out: torch.Tensor, dout: torch.Tensor) -> torch.Tensor:
    """``delta = rowsum(dO * O)``: out, dout (B, S, H, D) -> (B, H, S) float32."""
    if out.shape != dout.shape or out.dim() != 4:
        raise ValueError(f"out and dout must be (B, S, H, D) of one shape; got {tuple(out.shape)}, {tuple(dout.shape)}")
    if out.stride(-1) != 1:
        out = out.contiguous()
    if dout.stride(-1) != 1:
        dout = dout.contiguous()
    B, S, H, D = out.shape
    delta = torch.empty((B, H, S), dtype=torch.float32, device=out.device)
    if delta.numel() == 0:
        return delta
    grid = (triton.cdiv(S, _DELTA_BLOCK_M), B * H)
    _bwd_delta[grid](
        out, dout, delta,
        out.stride(0), out.stride(1), out.stride(2),
        dout.stride(0), dout.stride(1), dout.stride(2),
        H, S,
        HEAD_DIM=D, BLOCK_D=_block_d(D), BLOCK_M=_DELTA_BLOCK_M, WIDE=_wide(out, dout),
        num_warps=4, **FP_FUSION,
    )
    return delta


def backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lse: torch.Tensor,
    delta: torch.Tensor,
    *,
    q_pos: torch.Tensor | None = None,
    k_pos: torch.Tensor | None = None,
    causal: bool = False,
    softmax_scale: float | None = None,
    dq: torch.Tensor | None = None,
    dk: torch.Tensor | None = None,
    dv: torch.Tensor | None = None,
    after_dkdv=None,
    store_dkdv: bool = False,
    window: tuple[int, int] | None = None,
    q_doc: torch.Tensor | None = None,
    k_doc: torch.Tensor | None = None,
    blocks=None,
    grad_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Add one block pair's gradients into float32 accumulators (see :func:`ringflash.reference.backward`).

    dout, q: (B, Sq, H, D); k, v: (B, Sk, Hkv, D); lse, delta: (B, H, Sq) of the whole
    attention. dq (B, Sq, H, D), dk/dv (B, Sk, Hkv, D) float32 accumulators are allocated
    as zeros when not given. Deterministic: no atomics.

    ``after_dkdv``: called once, after the dK/dV work is queued and before the dQ work (the
    ring posts the transfer of dK/dV there, so that it overlaps the dQ kernel).

    ``store_dkdv``: the given ``dk``/``dv`` are overwritten with this block's gradients instead
    of added into, so a buffer reused across blocks needs no zero fill and is not read.

    ``grad_dtype``: the gradients not passed in are new tensors of this dtype instead of float32
    (float32 or q's dtype; stored directly by the kernels, so no cast follows).
    """
    check_inputs(q, k, v)
    B, Sq, H, D = q.shape
    Sk, Hkv = k.shape[1], k.shape[2]
    if dout.shape != q.shape:
        raise ValueError(f"dout must have q's shape {tuple(q.shape)}; got {tuple(dout.shape)}")
    for name, t in (("lse", lse), ("delta", delta)):
        if tuple(t.shape) != (B, H, Sq):
            raise ValueError(f"{name} must be (B, H, Sq) = {(B, H, Sq)}; got {tuple(t.shape)}")
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(D)
    dout = dout.to(q.dtype)
    if dout.stride(-1) != 1:
        dout = dout.contiguous()
    lse = lse.to(torch.float32).contiguous()
    delta = delta.to(torch.float32).contiguous()
    _check_out_dtype("grad_dtype", grad_dtype, q.dtype)
    for name, t, like in (("dq", dq, q), ("dk", dk, k), ("dv", dv, v)):
        if t is not None:
            _check_accumulator(name, t, like.shape, q.device)
    # Without accumulators the kernels store their result: no zero fill, no read of zeros.
    acc_dq = dq is not None
    acc_dkdv = (dk is not None or dv is not None) and not store_dkdv
    new = grad_dtype or torch.float32
    if dq is None:
        dq = torch.empty(q.shape, dtype=new, device=q.device)
    if dk is None:
        dk = torch.zeros(k.shape, dtype=torch.float32, device=k.device) if acc_dkdv else torch.empty(k.shape, dtype=new, device=k.device)
    if dv is None:
        dv = torch.zeros(v.shape, dtype=torch.float32, device=v.device) if acc_dkdv else torch.empty(v.shape, dtype=new, device=v.device)
    if Sq == 0 or Sk == 0 or B == 0 or H == 0:
        if not acc_dq:
            dq.zero_()
        if not acc_dkdv:
            dk.zero_()
            dv.zero_()
        if after_dkdv is not None:
            after_dkdv()
        return dq, dk, dv
    m = _mask_args(q_pos, k_pos, causal, window, q_doc, k_doc, Sq, Sk, q.device, blocks, (B, H, Hkv))
    if _hopper_serves(q, m, HOPPER_BACKWARD, HOPPER_BWD_HEAD_DIMS) and _device_index(q) not in _HOPPER_BWD_FAILED:
        try:
            return _backward_hopper(dout, q, k, v, lse, delta, m, causal, scale, dq, dk, dv, acc_dq, acc_dkdv,
                                    after_dkdv)
        except TritonError as e:  # raised while compiling, before any kernel ran
            _hopper_failed(q, e, "backward")

    c1 = _config(BWD_DKDV_CONFIGS, _INTERPRET_DKDV, D, q.dtype, bool(causal),
                 grouped=BWD_DKDV_GROUPED_CONFIGS if Hkv < H else None,
                 masked=BWD_DKDV_MASKED_CONFIGS if (m.window or m.docs) and m.blocks is None else None)
    c2 = _config(BWD_DQ_CONFIGS, _INTERPRET_DQ, D, q.dtype, bool(causal))
    c1, c2 = _sparse_stages(c1, m), _sparse_stages(c2, m)
    ranges_kv = ranges_q = lists_kv = counts_kv = lists_q = counts_q = lse
    if m.blocks is not None:
        lists_kv, counts_kv = _lists(m, causal, Sq, Sk, c1.block_m, c1.block_n, by_keys=True, device=q.device)
        lists_q, counts_q = _lists(m, causal, Sq, Sk, c2.block_m, c2.block_n, by_keys=False, device=q.device)
    elif m.window or m.docs:
        heads = (B, H, H // Hkv)
        ranges_kv = _tile_ranges(m, causal, Sq, Sk, c1.block_m, c1.block_n, by_keys=True, device=q.device,
                                 heads=heads)
        ranges_q = _tile_ranges(m, causal, Sq, Sk, c2.block_m, c2.block_n, by_keys=False, device=q.device,
                                heads=heads)
    bounds = _triton_row_bounds(m, causal, Sq, Sk, q.device, (B, H, H // Hkv))
    q_pos, k_pos = (lse, lse) if m.q_pos is None else (m.q_pos, m.k_pos)  # None: never read
    q_doc, k_doc = (lse, lse) if m.q_doc is None else (m.q_doc, m.k_doc)
    pat, nb, bs = (m.blocks.on(q.device), m.blocks.num_blocks, m.blocks.block_size) if m.blocks is not None else (lse, 1, 1)
    n_dkdv = triton.cdiv(Sk, c1.block_n) * B * Hkv
    split = _group_split(n_dkdv, H // Hkv, q.device)
    if split > 1:
        # Each split stores its part in its own slab; the slabs are summed below, in order.
        dk_out, dv_out = torch.empty((2, split, *k.shape), dtype=torch.float32, device=k.device)
    else:
        dk_out, dv_out = dk[None], dv[None]
    args = (
        q, k, v, dout, lse, delta, q_pos, k_pos, q_doc, k_doc, ranges_kv, ranges_q, dq, dk_out[0], dv_out[0],
        pat, lists_kv, counts_kv, lists_q, counts_q, lse if bounds is None else bounds,
        scale, scale * LOG2E, m.wl, m.wr, nb, bs, *m.strides,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        dout.stride(0), dout.stride(1), dout.stride(2),
        dq.stride(0), dq.stride(1), dq.stride(2),
        dk_out.stride(1), dk_out.stride(2), dk_out.stride(3),
        dv_out.stride(1), dv_out.stride(2), dv_out.stride(3),
        dk_out.stride(0), dv_out.stride(0),
        B, H, H // Hkv, split, Sq, Sk,
        # dK/dV rows (batch, K/V head, split) read their query heads' Q and dO; dQ rows read K/V
        _lpt_swizzle(2 * (H // Hkv // split) * Sq * D * q.element_size()),
        _kv_swizzle(k, H // Hkv),
    )
    meta = dict(
        HEAD_DIM=D, BLOCK_D=_block_d(D),
        BLOCK_M1=c1.block_m, BLOCK_N1=c1.block_n, BLOCK_M2=c2.block_m, BLOCK_N2=c2.block_n,
        CAUSAL=bool(causal), ACC_DKDV=acc_dkdv and split == 1, ACC_DQ=acc_dq, DOT_PREC=_dot_precision(q.dtype),
        WIDE=_wide(q, k, v, dout, dq, dk_out[0], dv_out[0]),
        WINDOW=m.window, DOCS=m.docs, SPARSE=m.blocks is not None, ROWB=bounds is not None,
    )

    def sum_splits():
        if split > 1:
            for acc, parts in ((dk, dk_out), (dv, dv_out)):
                if acc_dkdv:
                    acc += parts.sum(0)
                elif acc.dtype == parts.dtype:
                    torch.sum(parts, 0, out=acc)
                else:
                    acc.copy_(parts.sum(0))

    n_dkdv *= split
    n_dq = triton.cdiv(Sq, c2.block_m) * B * H
    if BWD_FUSED and (c1.num_warps, c1.num_stages) == (c2.num_warps, c2.num_stages):
        _launch(_attn_bwd, (n_dkdv + n_dq,), *args, **meta, DO_DKDV=True, DO_DQ=True,
                num_warps=c1.num_warps, num_stages=c1.num_stages)
        sum_splits()
        if after_dkdv is not None:
            after_dkdv()
    else:
        _launch(_attn_bwd, (n_dkdv,), *args, **meta, DO_DKDV=True, DO_DQ=False,
                num_warps=c1.num_warps, num_stages=c1.num_stages)
        sum_splits()
        if after_dkdv is not None:
            after_dkdv()
        _launch(_attn_bwd, (n_dq,), *args, **meta, DO_DKDV=False, DO_DQ=True,
                num_warps=c2.num_warps, num_stages=c2.num_stages)
    return dq, dk, dv
