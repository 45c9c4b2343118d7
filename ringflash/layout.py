"""Sequence layouts: which global tokens each rank of a context-parallel group holds.

A layout is a map from (rank, local index) to global token position. Everything else
(sharding, un-sharding, masks, rotary positions) is derived from that map, so the three
layouts below share one implementation and differ only in :meth:`Layout.positions`.

* ``Contiguous``: rank ``r`` holds tokens ``[r*L, (r+1)*L)``.
* ``Striped(stripe=w)``: the sequence is cut into stripes of ``w`` tokens, dealt out
  round-robin; with ``w = 1`` rank ``r`` holds tokens ``r, r+P, r+2P, ...``
  (Brandon et al., 2023).
* ``Zigzag``: the sequence is cut into ``2P`` chunks; rank ``r`` holds chunk ``r`` followed
  by chunk ``2P-1-r`` (the "head-tail" layout of ring-flash-attention, Megatron and
  PyTorch context parallel).

Positions on every rank are strictly increasing, which the kernels rely on to classify
tiles as fully visible, fully masked or on the causal boundary. On one rank every layout is the
identity (strictly increasing positions of all tokens leave no other order), so a group of one
takes any sequence length.
"""

from __future__ import annotations

import operator

import torch
import torch.distributed as dist

from .comm import resolve_group

__all__ = ["Layout", "Contiguous", "Striped", "Zigzag", "get_layout", "LAYOUTS"]


def _is_int(x) -> bool:
    """An integer that is not a bool (Python and NumPy integers, 0-d integer tensors)."""
    if isinstance(x, bool):
        return False
    try:
        operator.index(x)
    except TypeError:
        return False
    return True


class Layout:
    """Base class: subclasses define :meth:`multiple` and :meth:`positions`."""

    name: str = "layout"

    def multiple(self, world_size: int) -> int:
        """The global sequence length must be a multiple of this."""
        raise NotImplementedError

    def positions(self, seqlen: int, *, rank: int, world_size: int, device=None) -> torch.Tensor:
        """Global positions (int64, strictly increasing) of the tokens that ``rank`` holds.

        ``seqlen`` is the *global* sequence length.
        """
        raise NotImplementedError

    # -- derived ---------------------------------------------------------------------------

    @staticmethod
    def check_rank(rank: int, world_size: int) -> None:
        """Raise ``ValueError`` unless ``0 <= rank < world_size`` (e.g. a global rank passed where
        the rank within the context-parallel group was meant)."""
        if not _is_int(world_size) or world_size < 1:
            raise ValueError(f"world_size must be a positive int, got {world_size!r}")
        if not _is_int(rank) or not 0 <= rank < world_size:
            raise ValueError(
                f"rank must be an int in [0, {world_size}), got {rank!r}; pass the rank within the "
                f"group that shares the sequence (e.g. dist.get_rank(cp_group)), not the global rank"
            )

    def check_seqlen(self, seqlen: int, world_size: int) -> None:
        """Raise ``ValueError`` if ``seqlen`` tokens cannot be split over ``world_size`` ranks."""
        m = self.multiple(world_size) if world_size > 1 else 1
        if seqlen <= 0 or seqlen % m != 0:
            raise ValueError(
                f"layout {self!r} over {world_size} ranks needs a sequence length that is a "
                f"multiple of {m}; got {seqlen}. Pad the sequence to a multiple of {m}."
            )

    def check_local_seqlen(self, local_seqlen: int, world_size: int) -> None:
        """Raise ``ValueError`` if a shard of ``local_seqlen`` tokens cannot come from this layout."""
        per_rank = self.multiple(world_size) // world_size if world_size > 1 else 1
        if local_seqlen <= 0:
            raise ValueError(
                f"this rank holds no tokens (local_seqlen {local_seqlen}); layout {self!r} over "
                f"{world_size} ranks needs a global sequence of at least {per_rank * world_size} tokens."
            )
        if local_seqlen % per_rank != 0:
            raise ValueError(
                f"layout {self!r} over {world_size} ranks gives every rank a multiple of "
                f"{per_rank} tokens; this rank holds {local_seqlen}. Pad the global sequence "
                f"to a multiple of {self.multiple(world_size)} before sharding."
            )

    def local_positions(self, local_seqlen: int, *, rank: int, world_size: int, device=None) -> torch.Tensor:
        """Global positions of this rank's tokens, from the local length."""
        self.check_rank(rank, world_size)
        if world_size == 1:
            return torch.arange(local_seqlen, device=device)
        return self.positions(local_seqlen * world_size, rank=rank, world_size=world_size, device=device)

    def shard(self, x: torch.Tensor, *, rank: int, world_size: int, dim: int = 1) -> torch.Tensor:
        """This rank's shard of the full tensor ``x`` along ``dim`` (a new contiguous tensor)."""
        self.check_rank(rank, world_size)
        self.check_seqlen(x.shape[dim], world_size)
        if world_size == 1:
            return x.clone(memory_format=torch.contiguous_format)
        pos = self.positions(x.shape[dim], rank=rank, world_size=world_size, device=x.device)
        return x.index_select(dim, pos)

    def assemble(self, shards: list[torch.Tensor], *, dim: int = 1) -> torch.Tensor:
        """Inverse of :meth:`shard`: the full tensor from every rank's shard, in rank order."""
        world_size = len(shards)
        local = shards[0].shape[dim]
        if any(s.shape[dim] != local for s in shards):
            raise ValueError("all shards must have the same length along the sequence dim")
        if world_size == 1:
            return shards[0].clone(memory_format=torch.contiguous_format)
        seqlen = local * world_size
        stacked = torch.cat(shards, dim=dim)
        perm = torch.cat(
            [self.positions(seqlen, rank=r, world_size=world_size, device=stacked.device) for r in range(world_size)]
        )
        out = torch.empty_like(stacked)
        return out.index_copy_(dim, perm, stacked)

    def unshard(self, x: torch.Tensor, *, group=None, dim: int = 1) -> torch.Tensor:
        """Gather every rank's shard over ``group`` (a ProcessGroup or 1-D DeviceMesh) and return
        the full tensor on every rank."""
        if not dist.is_available() or not dist.is_initialized():
            return x
        group = resolve_group(group)
        world_size = dist.get_world_size(group)
        if world_size == 1:
            return x
        shards = [torch.empty_like(x) for _ in range(world_size)]
        dist.all_gather(shards, x.contiguous(), group=group)
        return self.assemble(shards, dim=dim)

    def __eq__(self, other) -> bool:
        return type(self) is type(other) and vars(self) == vars(other)

    def __hash__(self) -> int:
        return hash((type(self), tuple(sorted(vars(self).items()))))

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Contiguous(Layout):
    name = "contiguous"

    def multiple(self, world_size: int) -> int:
        return world_size

    def positions(self, seqlen: int, *, rank: int, world_size: int, device=None) -> torch.Tensor:
        self.check_rank(rank, world_size)
        self.check_seqlen(seqlen, world_size)
        if world_size == 1:
            return torch.arange(seqlen, device=device)
        local = seqlen // world_size
        return torch.arange(rank * local, (rank + 1) * local, device=device)


class Striped(Layout):
    """Stripes of ``stripe`` tokens dealt out round-robin: stripe ``s`` goes to rank ``s % P``."""

    name = "striped"

    def __init__(self, stripe: int = 1):
        if not isinstance(stripe, int) or stripe < 1:
            raise ValueError(f"stripe must be a positive int, got {stripe!r}")
        self.stripe = stripe

    def multiple(self, world_size: int) -> int:
        return world_size * self.stripe

    def positions(self, seqlen: int, *, rank: int, world_size: int, device=None) -> torch.Tensor:
        self.check_rank(rank, world_size)
        self.check_seqlen(seqlen, world_size)
        if world_size == 1:
            return torch.arange(seqlen, device=device)
        n_stripes = seqlen // (world_size * self.stripe)  # stripes per rank
        starts = (torch.arange(n_stripes, device=device) * world_size + rank) * self.stripe
        return (starts[:, None] + torch.arange(self.stripe, device=device)[None, :]).reshape(-1)

    def __repr__(self) -> str:
        return f"Striped(stripe={self.stripe})"


class Zigzag(Layout):
    """``2P`` chunks; rank ``r`` holds chunk ``r`` then chunk ``2P-1-r``."""

    name = "zigzag"

    def multiple(self, world_size: int) -> int:
        return 2 * world_size

    def positions(self, seqlen: int, *, rank: int, world_size: int, device=None) -> torch.Tensor:
        self.check_rank(rank, world_size)
        self.check_seqlen(seqlen, world_size)
        if world_size == 1:
            return torch.arange(seqlen, device=device)
        chunk = seqlen // (2 * world_size)
        head = torch.arange(rank * chunk, (rank + 1) * chunk, device=device)
        tail_start = (2 * world_size - 1 - rank) * chunk
        tail = torch.arange(tail_start, tail_start + chunk, device=device)
        return torch.cat([head, tail])


LAYOUTS = {"contiguous": Contiguous, "striped": Striped, "zigzag": Zigzag}


def get_layout(layout: str | Layout) -> Layout:
    """A layout object from its name (``"contiguous"``, ``"striped"``, ``"zigzag"``) or itself."""
    if isinstance(layout, Layout):
        return layout
    if isinstance(layout, str) and layout in LAYOUTS:
        return LAYOUTS[layout]()
    raise ValueError(f"unknown layout {layout!r}; use one of {sorted(LAYOUTS)} or a Layout object")
