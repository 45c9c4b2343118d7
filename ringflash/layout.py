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

import torch
import torch.distributed as dist

from .comm import all_gather_tensor, resolve_group, world_and_rank
from .mask import _is_int

__all__ = ["Layout", "Contiguous", "Striped", "Zigzag", "get_layout", "LAYOUTS"]


class Layout:
    """Which global tokens each rank of a context-parallel group holds (base class).

    A layout maps (rank, local index) to a global token position; subclasses define
    :meth:`multiple` and :meth:`positions`, and everything else (:meth:`shard`,
    :meth:`assemble`, :meth:`unshard`, :meth:`local_positions`) follows from them. With
    ``P`` ranks and a global length ``S``, every rank holds ``S / P`` tokens, at strictly
    increasing global positions. On one rank every layout is the identity.

    Layouts compare equal when they are of the same class with the same attributes (so
    ``Striped(1) == get_layout("striped")``) and are hashable.

    Cross-rank contract: the shards that every rank passes to ring attention (and to the
    modules of :mod:`ringflash.nn`) must be cut by the layout that the call names, on every
    rank, with the same ``world_size`` as the group. A shard cut by another layout with the
    same local length is not detected, not even by ``RINGFLASH_CHECK_CONSISTENCY=1`` (which
    compares what the ranks *pass*, not how their data was cut): the result is silently wrong.
    """

    name: str = "layout"

    def multiple(self, world_size: int) -> int:
        """The number that the global sequence length must be a multiple of.

        Args:
            world_size: the number of ranks ``P`` the sequence is split over (more than one;
                a group of one takes any length).

        Returns:
            ``P`` for :class:`Contiguous`, ``P * stripe`` for :class:`Striped`, ``2 * P`` for
            :class:`Zigzag`.
        """
        raise NotImplementedError

    def positions(self, seqlen: int, *, rank: int, world_size: int, device=None) -> torch.Tensor:
        """Global positions of the tokens that ``rank`` holds, in the order the shard holds them.

        Args:
            seqlen: the *global* sequence length ``S``.
            rank: the rank within the context-parallel group, ``0 <= rank < world_size`` (not the
                global rank).
            world_size: the number of ranks ``P`` of that group.
            device: where the result is made (default: the current default device).

        Returns:
            (S // P,) int64, strictly increasing. ``shard(x, rank=r, world_size=P)`` is
            ``x.index_select(dim, positions(S, rank=r, world_size=P))``.

        Raises:
            ValueError: ``world_size`` is not a positive int; ``rank`` is not an int in
                ``[0, world_size)`` (bools are refused); ``seqlen`` is not positive, or (for
                ``world_size > 1``) not a multiple of :meth:`multiple`.
        """
        raise NotImplementedError

    # -- derived ---------------------------------------------------------------------------

    @staticmethod
    def check_rank(rank: int, world_size: int) -> None:
        """Check that ``rank`` is a rank of a group of ``world_size`` ranks.

        Raises:
            ValueError: ``world_size`` is not a positive int, or ``rank`` is not an int with
                ``0 <= rank < world_size`` (e.g. a global rank passed where the rank within the
                context-parallel group was meant). Bools count as neither.
        """
        if not _is_int(world_size) or world_size < 1:
            raise ValueError(f"world_size must be a positive int, got {world_size!r}")
        if not _is_int(rank) or not 0 <= rank < world_size:
            raise ValueError(
                f"rank must be an int in [0, {world_size}), got {rank!r}; pass the rank within the "
                f"group that shares the sequence (e.g. dist.get_rank(cp_group)), not the global rank"
            )

    def check_seqlen(self, seqlen: int, world_size: int) -> None:
        """Check that a global sequence of ``seqlen`` tokens can be split over ``world_size`` ranks.

        Raises:
            ValueError: ``seqlen <= 0``, or (for ``world_size > 1``) ``seqlen`` is not a multiple
                of :meth:`multiple`; the message says what to pad to.
        """
        m = self.multiple(world_size) if world_size > 1 else 1
        if seqlen <= 0 or seqlen % m != 0:
            raise ValueError(
                f"layout {self!r} over {world_size} ranks needs a sequence length that is a "
                f"multiple of {m}; got {seqlen}. Pad the sequence to a multiple of {m}."
            )

    def grouped(self, inner: int) -> "Layout":
        """The layout over ``P / inner`` ranks whose shard ``r`` holds the tokens of ranks
        ``r * inner, ..., r * inner + inner - 1`` of this layout over ``P`` ranks.

        What a :class:`~ringflash.comm.HybridGroup` runs its ring with: after the all-to-all of
        a Ulysses group of ``inner`` ranks, each rank holds the union of their shards.
        :class:`Contiguous` gives :class:`Contiguous`, :class:`Striped` with stripe ``s`` gives
        ``Striped(s * inner)``, :class:`Zigzag` gives :class:`Zigzag` (chunks ``inner`` times
        longer).

        Raises:
            ValueError: a layout whose groups of consecutive ranks form no layout.
        """
        if inner == 1:
            return self
        raise ValueError(f"layout {self!r} has no grouped form: it cannot serve a HybridGroup")

    def gather_order(self, seqlen: int, *, inner: int, outer_rank: int, world_size: int, device=None) -> torch.Tensor:
        """The order that turns the concatenated shards of ranks ``outer_rank * inner + u``
        (``u = 0 .. inner - 1``, in that order) into the shard of ``grouped(inner)`` at ``outer_rank``.

        Returns:
            (inner * seqlen // world_size,) int64 indices into the concatenation.
        """
        # On the host whatever the default device is (torch.set_default_device, `with torch.device(...)`).
        parts = [self.positions(seqlen, rank=outer_rank * inner + u, world_size=world_size, device="cpu")
                 for u in range(inner)]
        cat = torch.cat(parts)
        order = torch.argsort(cat)
        want = self.grouped(inner).positions(seqlen, rank=outer_rank, world_size=world_size // inner, device="cpu")
        assert torch.equal(cat[order], want), (self, inner, outer_rank)
        return order.to(device)

    def check_local_seqlen(self, local_seqlen: int, world_size: int) -> None:
        """Check that a shard of ``local_seqlen`` tokens can come from this layout over ``world_size`` ranks.

        A purely local check: it cannot tell whether the shard was really cut by this layout.

        Raises:
            ValueError: ``local_seqlen <= 0``, or ``local_seqlen`` is not a multiple of
                ``multiple(world_size) // world_size`` (e.g. an odd shard under :class:`Zigzag`,
                which gives every rank two equal chunks).
        """
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
        """Global positions of this rank's tokens, from the *local* length.

        Args:
            local_seqlen: the length of this rank's shard; the global length is
                ``local_seqlen * world_size``.
            rank: the rank within the context-parallel group.
            world_size: the number of ranks of that group.
            device: where the result is made.

        Returns:
            (local_seqlen,) int64, strictly increasing: ``positions(local_seqlen * world_size,
            rank=rank, world_size=world_size)``; ``arange(local_seqlen)`` when ``world_size == 1``.
            These are the positions rotary embeddings and the causal mask use.

        Raises:
            ValueError: a bad ``rank`` / ``world_size`` (as :meth:`check_rank`), or a global length
                ``local_seqlen * world_size`` that the layout cannot split (as :meth:`positions`).
        """
        self.check_rank(rank, world_size)
        if world_size == 1:
            return torch.arange(local_seqlen, device=device)
        return self.positions(local_seqlen * world_size, rank=rank, world_size=world_size, device=device)

    def shard(self, x: torch.Tensor, *, rank: int, world_size: int, dim: int = 1) -> torch.Tensor:
        """This rank's shard of the full tensor ``x`` along ``dim``.

        Purely local (no communication): every rank calls it on the same full tensor with its
        own ``rank``. Differentiable (an ``index_select``; a ``clone`` on one rank).

        Args:
            x: the full tensor, e.g. q (batch_size, seqlen, nheads, headdim) or input_ids
                (batch_size, seqlen), with the global sequence along ``dim``.
            rank: the rank within the context-parallel group (e.g. ``dist.get_rank(cp_group)``),
                not the global rank.
            world_size: the number of ranks of that group.
            dim: the sequence dimension (1 for the flash-attn layout).

        Returns:
            A new tensor of ``x``'s shape with ``x.shape[dim] // world_size`` along ``dim``: the
            tokens at :meth:`positions`, in that order (e.g. q (batch_size, local_seqlen, nheads,
            headdim)).

        Raises:
            ValueError: ``world_size`` is not a positive int; ``rank`` is not an int in
                ``[0, world_size)``; ``x.shape[dim]`` is 0, or (for ``world_size > 1``) not a
                multiple of :meth:`multiple` (pad it first, e.g. ``shard_batch(..., pad_id=)``).
        """
        self.check_rank(rank, world_size)
        self.check_seqlen(x.shape[dim], world_size)
        if world_size == 1:
            return x.clone(memory_format=torch.contiguous_format)
        pos = self.positions(x.shape[dim], rank=rank, world_size=world_size, device=x.device)
        return x.index_select(dim, pos)

    def assemble(self, shards: list[torch.Tensor], *, dim: int = 1) -> torch.Tensor:
        """Inverse of :meth:`shard`: the full tensor from the list of every rank's shard.

        Local (no communication); differentiable (an ``index_copy`` into a new tensor).

        Args:
            shards: ``[shard of rank 0, ..., shard of rank P-1]``, all of the same shape, each
                cut by this layout with ``world_size = len(shards)``.
            dim: the sequence dimension.

        Returns:
            The full tensor, ``len(shards)`` times longer along ``dim``, tokens in global order.

        Raises:
            ValueError: the shards differ in length along ``dim``, or ``len(shards) * local``
                is not a length this layout can split over ``len(shards)`` ranks.
        """
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
        """The full tensor on every rank, from each rank's own shard (an all-gather, then :meth:`assemble`).

        A collective: every rank of ``group`` must call it, with its own shard of the same shape,
        dtype and device, cut by this layout. Otherwise the all-gather may fail, hang, or
        assemble a wrong tensor; this is not checked (``RINGFLASH_CHECK_CONSISTENCY`` covers ring
        attention only).

        **Not differentiable** across ranks: ``torch.distributed.all_gather`` is not tracked by
        autograd, so the result does not require grad even when ``x`` does (use it for inspection
        or evaluation, not for a training loss). Without an initialised process group, or in a
        group of one, ``x`` itself is returned.

        Args:
            x: this rank's shard (not a list of shards, not an already gathered tensor; for a
                list use :meth:`assemble`), e.g. (batch_size, local_seqlen, nheads, headdim).
            group: the context-parallel group: a ProcessGroup, a 1-D DeviceMesh, or None for the
                default group.
            dim: the sequence dimension.

        Returns:
            The full tensor, ``world_size`` times longer along ``dim``, the same on every rank.

        Raises:
            ValueError: ``group`` is a DeviceMesh of more than one dimension, or this rank is not
                a member of it; ``local_seqlen * world_size`` is not a length this layout can split.
        """
        if not dist.is_available() or not dist.is_initialized():
            return x
        group = resolve_group(group)
        world_size, _ = world_and_rank(group)
        if world_size == 1:
            return x
        return self.assemble(list(all_gather_tensor(x.contiguous(), group).unbind(0)), dim=dim)

    def __eq__(self, other) -> bool:
        return type(self) is type(other) and vars(self) == vars(other)

    def __hash__(self) -> int:
        return hash((type(self), tuple(sorted(vars(self).items()))))

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Contiguous(Layout):
    """One contiguous block per rank: rank ``r`` holds tokens ``[r*L, (r+1)*L)``, ``L = S / P``.

    The global length must be a multiple of ``P``. Example, ``S = 8``, ``P = 2``: rank 0 holds
    ``[0, 1, 2, 3]``, rank 1 holds ``[4, 5, 6, 7]``. Under a causal mask the work is unbalanced
    (the last rank sees every key, the first only its own).
    """

    name = "contiguous"

    def multiple(self, world_size: int) -> int:
        return world_size

    def grouped(self, inner: int) -> Layout:
        return self

    def positions(self, seqlen: int, *, rank: int, world_size: int, device=None) -> torch.Tensor:
        self.check_rank(rank, world_size)
        self.check_seqlen(seqlen, world_size)
        if world_size == 1:
            return torch.arange(seqlen, device=device)
        local = seqlen // world_size
        return torch.arange(rank * local, (rank + 1) * local, device=device)


class Striped(Layout):
    """Stripes of ``stripe`` tokens dealt out round-robin: stripe ``s`` goes to rank ``s % P``.

    Rank ``r`` holds tokens ``t`` with ``(t // stripe) % P == r``; with ``stripe = 1``, tokens
    ``r, r+P, r+2P, ...`` (Brandon et al., 2023). The global length must be a multiple of
    ``P * stripe``. Example, ``S = 8``, ``P = 2``: ``Striped()`` gives rank 0 ``[0, 2, 4, 6]``
    and rank 1 ``[1, 3, 5, 7]``; ``Striped(2)`` gives rank 0 ``[0, 1, 4, 5]`` and rank 1
    ``[2, 3, 6, 7]``. Balances causal work across ranks. ``get_layout("striped")`` is
    ``Striped(1)``.

    Args:
        stripe: tokens per stripe, a positive int (default 1).

    Raises:
        ValueError: ``stripe`` is not an int or is less than 1.
    """

    name = "striped"

    def __init__(self, stripe: int = 1):
        if isinstance(stripe, bool) or not isinstance(stripe, int) or stripe < 1:
            raise ValueError(f"stripe must be a positive int, got {stripe!r}")
        self.stripe = stripe

    def multiple(self, world_size: int) -> int:
        return world_size * self.stripe

    def grouped(self, inner: int) -> Layout:
        return Striped(self.stripe * inner)

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
    """``2P`` equal chunks; rank ``r`` holds chunk ``r`` then chunk ``2P-1-r``.

    The "head-tail" layout of ring-flash-attention, Megatron and PyTorch context parallel; it
    balances causal work across ranks. The global length must be a multiple of ``2P`` (a shard
    has an even length). Example, ``S = 8``, ``P = 2`` (chunks of 2): rank 0 holds
    ``[0, 1, 6, 7]``, rank 1 holds ``[2, 3, 4, 5]``.
    """

    name = "zigzag"

    def multiple(self, world_size: int) -> int:
        return 2 * world_size

    def grouped(self, inner: int) -> Layout:
        return self

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
    """A layout object from its name, or the layout itself.

    Args:
        layout: ``"contiguous"``, ``"striped"`` (stripe 1), ``"zigzag"``, or a :class:`Layout`
            (returned as it is).

    Returns:
        A :class:`Layout`.

    Raises:
        ValueError: an unknown name, or anything that is neither a name nor a Layout.
    """
    if isinstance(layout, Layout):
        return layout
    if isinstance(layout, str) and layout in LAYOUTS:
        return LAYOUTS[layout]()
    raise ValueError(f"unknown layout {layout!r}; use one of {sorted(LAYOUTS)} or a Layout object")
