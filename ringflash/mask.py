"""The visibility rule of every attention call: causal, sliding windows, packed documents.

A query at global position ``p`` sees a key at global position ``k`` iff every rule that is on
holds:

* causal: ``k <= p``;
* window ``(left, right)`` (flash-attn's ``window_size``): ``p - left <= k <= p + right``, where
  ``-1`` leaves that side unbounded;
* documents ``cu_seqlens = [0, end_0, ..., S]`` (flash-attn's varlen convention, over the whole
  packed sequence): ``doc(p) == doc(k)``, with ``doc(x) = d`` for ``cu[d] <= x < cu[d + 1]``;
* a block pattern (:class:`ringflash.sparse.BlockSparse`): ``pattern[p // bs, k // bs]``.

QK-dropping and hash buckets (:mod:`ringflash.sparse`) are the documents rule on per-head
composite positions and documents, so the same three grains serve them.

Layouts only change which tokens a rank holds, never the rule, so every mask works with every
layout and world size. The rule is used at three grains:

* here, on the host: whether a ring step (the queries of one rank against the keys of
  another) has any visible pair (:func:`block_visible`), decided once per batch shape;
* in the kernels, per tile, from the first and last position and document id of each tile
  (positions increase and document ids never decrease along every layout's local order);
* element-wise (:func:`visible`), on boundary tiles only and in the reference backend.
"""

from __future__ import annotations

import operator
from typing import NamedTuple

import torch

__all__ = ["Mask", "make_mask", "check_window", "check_cu_seqlens", "doc_ids", "doc_positions", "visible",
           "block_visible"]


def _is_int(x) -> bool:
    """An integer that is not a bool (Python and NumPy integers, 0-d integer tensors)."""
    if isinstance(x, bool):
        return False
    try:
        operator.index(x)
    except TypeError:
        return False
    return True


def check_window(window) -> tuple[int, int] | None:
    """``window`` as ``(left, right)`` ints, or None for no window (also for ``(-1, -1)``).

    Raises ``ValueError`` for anything but a pair of ints each ``>= 0`` or ``-1``.
    """
    if window is None:
        return None
    if isinstance(window, torch.Tensor):
        window = window.tolist()
    if not isinstance(window, (tuple, list)) or len(window) != 2 or not all(_is_int(w) for w in window):
        raise ValueError(
            f"window must be a pair of ints (left, right), -1 for unbounded on that side "
            f"(flash-attn's window_size); got {window!r}"
        )
    left, right = (int(w) for w in window)
    if left < -1 or right < -1:
        raise ValueError(
            f"window sides must be >= 0, or -1 for unbounded; got (left, right) = ({left}, {right})"
        )
    if left == -1 and right == -1:
        return None
    return left, right


def check_cu_seqlens(cu_seqlens, seqlen: int | None = None) -> tuple[int, ...] | None:
    """Document boundaries as a tuple of host ints, or None for one document (or none given).

    ``cu_seqlens``: ``[0, end_0, ..., seqlen]``, strictly increasing; a list or tuple of ints, or
    a 1-D integer tensor or NumPy array (a CUDA tensor is copied to the host: one device
    synchronisation).
    ``seqlen``: the global sequence length the last boundary must equal (None: not checked).

    Raises ``ValueError`` (``TypeError`` for a non-sequence) naming what to change.
    """
    if cu_seqlens is None:
        return None
    if _is_int(cu_seqlens):
        raise ValueError(f"cu_seqlens must be 1-D, [0, end_0, ..., seqlen]; got the single number {cu_seqlens!r}")
    if not isinstance(cu_seqlens, (torch.Tensor, list, tuple)) and hasattr(cu_seqlens, "__array__"):
        cu_seqlens = torch.as_tensor(cu_seqlens)  # a NumPy array
    if isinstance(cu_seqlens, torch.Tensor):
        if cu_seqlens.is_floating_point() or cu_seqlens.is_complex() or cu_seqlens.dtype == torch.bool:
            raise ValueError(f"cu_seqlens must be an integer tensor (int32 or int64); got {cu_seqlens.dtype}")
        if cu_seqlens.dim() != 1:
            raise ValueError(
                f"cu_seqlens must be 1-D, [0, end_0, ..., seqlen], the same for every row of the batch; "
                f"got shape {tuple(cu_seqlens.shape)}"
            )
        cu = cu_seqlens.tolist()
    elif isinstance(cu_seqlens, (list, tuple)):
        cu = list(cu_seqlens)
        if any(isinstance(c, (list, tuple)) for c in cu):
            raise ValueError("cu_seqlens must be 1-D, [0, end_0, ..., seqlen]; got a nested sequence")
        if not all(_is_int(c) for c in cu):
            bad = next(c for c in cu if not _is_int(c))
            raise ValueError(f"cu_seqlens must hold ints; got {bad!r} ({type(bad).__name__})")
        cu = [int(c) for c in cu]
    else:
        raise TypeError(
            f"cu_seqlens must be a list of ints or a 1-D integer tensor; got {type(cu_seqlens).__name__}"
        )
    if len(cu) < 2:
        raise ValueError(f"cu_seqlens needs at least two boundaries, [0, seqlen]; got {cu}")
    if cu[0] != 0:
        raise ValueError(f"cu_seqlens must start at 0; got {cu[0]} (cu_seqlens[:4] = {cu[:4]})")
    if seqlen is not None and cu[-1] != seqlen:
        raise ValueError(
            f"cu_seqlens must end at the global sequence length {seqlen}; got {cu[-1]}. Pass the boundaries "
            f"of the whole packed sequence (not of this rank's shard)"
        )
    for i in range(1, len(cu)):
        if cu[i] <= cu[i - 1]:
            raise ValueError(
                f"cu_seqlens must be strictly increasing (no empty documents); cu_seqlens[{i - 1}] = "
                f"{cu[i - 1]}, cu_seqlens[{i}] = {cu[i]}"
            )
    if len(cu) == 2:
        return None
    return tuple(cu)


class Mask(NamedTuple):
    """A checked, normalised mask: what the ring plans with and the engines are handed.

    ``window`` is None when both sides are unbounded; ``cu_seqlens`` is None for one document.
    """

    causal: bool
    window: tuple[int, int] | None = None
    cu_seqlens: tuple[int, ...] | None = None
    blocks: object = None  # a ringflash.sparse.BlockSparse, or None

    @property
    def dense(self) -> bool:
        """Only causal or full attention: what every engine serves."""
        return self.window is None and self.cu_seqlens is None and self.blocks is None

    def describe(self) -> str:
        parts = ["causal" if self.causal else "full"]
        if self.window is not None:
            parts.append(f"window={self.window}")
        if self.cu_seqlens is not None:
            parts.append(f"{len(self.cu_seqlens) - 1} documents")
        if self.blocks is not None:
            parts.append("block-sparse")
        return ", ".join(parts)


def make_mask(causal: bool, window=None, cu_seqlens=None, seqlen: int | None = None, blocks=None) -> Mask:
    """Check and normalise a call's mask arguments (``ValueError`` naming what to change).
    ``blocks``: a :class:`ringflash.sparse.BlockSparse` that must tile ``seqlen`` tokens."""
    if blocks is not None and seqlen is not None:
        blocks.check(seqlen)
    return Mask(bool(causal), check_window(window), check_cu_seqlens(cu_seqlens, seqlen), blocks)


def doc_ids(cu_seqlens, positions: torch.Tensor) -> torch.Tensor:
    """The document of every position (int32, on ``positions``' device): ``d`` with
    ``cu[d] <= p < cu[d + 1]``."""
    bounds = torch.as_tensor(cu_seqlens, dtype=torch.int64, device=positions.device)[1:-1]
    return torch.bucketize(positions.to(torch.int64), bounds, right=True).to(torch.int32)


def doc_positions(cu_seqlens, positions: torch.Tensor) -> torch.Tensor:
    """Each position's offset inside its document, ``p - cu[doc(p)]`` (int64, on ``positions``'
    device): the positions rotary embeddings restart from at every document."""
    starts = torch.as_tensor(cu_seqlens, dtype=torch.int64, device=positions.device)
    return positions.to(torch.int64) - starts[doc_ids(starts, positions).long()]


def visible(q_pos: torch.Tensor, k_pos: torch.Tensor, *, causal: bool, window=None,
            q_doc: torch.Tensor | None = None, k_doc: torch.Tensor | None = None,
            blocks=None) -> torch.Tensor | None:
    """The (..., Sq, Sk) boolean matrix of the rule, or None when every pair is visible.

    Attributes are (..., Sq) and (..., Sk), broadcast against each other over the leading dims
    (per-head attributes); ``blocks`` a :class:`ringflash.sparse.BlockSparse`."""
    vis = None

    def both(a, b):
        return b if a is None else a & b

    qp, kp = (None, None) if q_pos is None else (q_pos[..., :, None], k_pos[..., None, :])
    if causal:
        vis = qp >= kp
    if window is not None:
        left, right = window
        if left >= 0:
            vis = both(vis, kp >= qp - left)
        if right >= 0:
            vis = both(vis, kp <= qp + right)
    if q_doc is not None:
        vis = both(vis, q_doc[..., :, None] == k_doc[..., None, :])
    if blocks is not None:
        pattern, bs = blocks.on(q_pos.device).bool(), blocks.block_size
        vis = both(vis, pattern[torch.div(qp, bs, rounding_mode="floor"), torch.div(kp, bs, rounding_mode="floor")])
    return vis


def _window_visible(q_pos: torch.Tensor, k_pos: torch.Tensor, causal: bool, window) -> bool:
    """Exact: whether some key of ``k_pos`` lies in some query's interval of causal and window."""
    lo = q_pos - window[0] if window is not None and window[0] >= 0 else torch.full_like(q_pos, -2**62)
    hi = q_pos + window[1] if window is not None and window[1] >= 0 else torch.full_like(q_pos, 2**62)
    if causal:
        hi = torch.minimum(hi, q_pos)
    first = torch.searchsorted(k_pos, lo)  # the first key at or after each interval's start
    inside = first < k_pos.numel()
    return bool((k_pos[first.clamp(max=k_pos.numel() - 1)] <= hi)[inside].any())


def _docs_visible(q_pos: torch.Tensor, k_pos: torch.Tensor, causal: bool, cu) -> bool:
    """Exact for documents (with or without causal): per document, the latest query of it is the
    one that sees the most keys of it."""
    cu_t = torch.as_tensor(cu, dtype=torch.int64)
    q_end = torch.searchsorted(q_pos, cu_t[1:])  # one past the last query of each document
    q_start = torch.searchsorted(q_pos, cu_t[:-1])
    has_q = q_end > q_start
    if causal:
        last_q = q_pos[(q_end - 1).clamp(min=0)]
        hi = torch.minimum(last_q, cu_t[1:] - 1)
    else:
        hi = cu_t[1:] - 1
    first = torch.searchsorted(k_pos, cu_t[:-1])
    inside = first < k_pos.numel()
    ok = has_q & inside & (k_pos[first.clamp(max=k_pos.numel() - 1)] <= hi)
    return bool(ok.any())


def block_visible(mask: Mask, q_pos: torch.Tensor, k_pos: torch.Tensor) -> bool:
    """Whether any query of ``q_pos`` sees any key of ``k_pos`` (host int64 tensors, each strictly
    increasing). Exact for each rule alone; with a window *and* documents, True when each rule
    alone lets some pair through (a step that turns out empty is computed, and its tiles skipped)."""
    if q_pos.numel() == 0 or k_pos.numel() == 0:
        return False
    if mask.causal and int(q_pos[-1]) < int(k_pos[0]):
        return False
    if mask.window is not None and not _window_visible(q_pos, k_pos, mask.causal, mask.window):
        return False
    if mask.cu_seqlens is not None and not _docs_visible(q_pos, k_pos, mask.causal, mask.cu_seqlens):
        return False
    if mask.blocks is not None and not _blocks_visible(q_pos, k_pos, mask.causal, mask.blocks):
        return False
    return True


def _blocks_visible(q_pos: torch.Tensor, k_pos: torch.Tensor, causal: bool, blocks) -> bool:
    """Whether the pattern keeps some (query block, key block) pair of these tokens (with causal,
    one whose key block starts at or before the query block's last query here): exact for the
    pattern with causal, since a block pair's earliest key and latest query decide it."""
    bs = blocks.block_size
    qb = torch.unique(torch.div(q_pos, bs, rounding_mode="floor"))
    kb = torch.unique(torch.div(k_pos, bs, rounding_mode="floor"))
    sub = blocks.pattern[qb][:, kb]
    if causal:
        # The latest query of each query block against the earliest key of each key block.
        q_max = torch.zeros(blocks.num_blocks, dtype=torch.int64).scatter_reduce(
            0, torch.div(q_pos, bs, rounding_mode="floor"), q_pos, "amax", include_self=False)[qb]
        k_min = torch.full((blocks.num_blocks,), 2**62, dtype=torch.int64).scatter_reduce(
            0, torch.div(k_pos, bs, rounding_mode="floor"), k_pos, "amin", include_self=False)[kb]
        sub = sub & (q_max[:, None] >= k_min[None, :])
    return bool(sub.any())
