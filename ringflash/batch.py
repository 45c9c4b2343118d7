"""A batch for a sharded sequence: shard ids and labels, compute the loss in sharded order.

A layout only permutes tokens, so a language model never needs its outputs un-permuted to
be trained: :func:`shard_batch` shifts the labels on the *full* sequence (the target of
token ``t`` is token ``t + 1`` of the full sequence, wherever the layout puts the two), then
cuts ids, labels and positions with the same layout; every rank computes the loss of its own
tokens; :func:`sharded_cross_entropy` turns the local sums into the mean over the whole
sequence.

Gradients. ``sharded_cross_entropy`` returns the global mean on every rank of the
context-parallel group; its gradient is scaled so that **averaging** parameter gradients over
the context-parallel group gives the gradient of that mean. That is what data parallelism
already does, so: run DDP or FSDP over the flattened data-parallel x context-parallel ranks
(e.g. the whole world for a ``("dp", "cp")`` mesh), or, with DDP/FSDP over ``dp`` only, call
:func:`average_gradients` over the context-parallel group after ``backward``.

    input_ids, labels, positions = shard_batch(input_ids, layout="striped", group=cp)
    logits, loss = model(input_ids, labels)   # loss: global mean over the cp group
    loss.backward()                           # then average gradients over dp x cp
"""

from __future__ import annotations

import zlib

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .comm import HybridGroup, all_gather_tensor, all_reduce_sum, resolve_group, world_and_rank
from .layout import Layout, get_layout
from .mask import check_cu_seqlens, doc_positions

__all__ = ["shard_batch", "shift_labels", "unshard", "sharded_cross_entropy", "average_gradients", "IGNORE_INDEX"]

IGNORE_INDEX = -100


def shard_batch(
    input_ids: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    layout: str | Layout = "striped",
    group=None,
    shift: bool = True,
    pad_id: int | None = None,
    ignore_index: int = IGNORE_INDEX,
    cu_seqlens=None,
    check: bool = True,
) -> tuple[torch.Tensor, ...]:
    """This rank's shard of a batch of full sequences: ids, their targets, their global positions.

    Local (no communication). The labels are shifted on the *full* sequence before it is cut,
    so the target of every token is the next token of the full sequence, wherever the layout
    puts it; no rank needs its neighbour's tokens.

    Cross-rank contract: every rank of ``group`` must call it with the same full ``input_ids``
    (and ``labels``), the same ``layout`` (the one the model's attention uses) and the same
    ``shift`` / ``pad_id`` / ``ignore_index``. Nothing checks this: other data, or another
    layout, gives every rank a valid-looking shard and a silently wrong model input or loss.

    Args:
        input_ids: (batch_size, seqlen), the full sequences (the same on every rank of ``group``).
        labels: (batch_size, seqlen) or None for ``input_ids`` (language modelling). With
            ``shift=True`` they are aligned with ``input_ids`` and shifted here, on the full
            sequence: the target of token ``t`` is ``labels[:, t + 1]``, the last token gets
            ``ignore_index``. With ``shift=False`` they are used as given (already targets).
        shift: shift the labels by one on the full sequence (default True), see ``labels``.
        layout: ``"contiguous"``, ``"striped"``, ``"zigzag"`` or a Layout (the model's layout).
        group: the context-parallel group (ProcessGroup, 1-D DeviceMesh, or None for the
            default group; without an initialised process group nothing is cut).
        pad_id: if given, pad the sequences at the end to a length the layout can split
            (ids with ``pad_id``, labels with ``ignore_index``); causal attention keeps the
            real tokens unaffected. Without it a length the layout cannot split is a ValueError.
        ignore_index: the label that the loss ignores (default ``IGNORE_INDEX = -100``); it fills
            the last target and the padding.
        cu_seqlens: document boundaries of the packed full sequences, ``[0, end_0, ..., seqlen]``
            (flash-attn's convention; the same for every row; a list or a 1-D integer tensor).
            With ``shift``, the last token of each document gets ``ignore_index`` as its target
            (the next document's first token is not its continuation). With ``pad_id``, the
            padding becomes one more document, so the real tokens never see it.
        check: with more than one rank, compare every rank's sequence length and
            ``cu_seqlens`` (one all-gather of four integers, on ``input_ids``' device, or on
            this rank's GPU for CPU ids in an NCCL group) and
            raise ``ValueError`` on every rank if they differ: a silent mismatch would give wrong
            attention. A collective when on: every rank of the group must call it.

    Returns:
        input_ids: (batch_size, local_seqlen); labels: (batch_size, local_seqlen), the targets
        of these tokens; positions: (local_seqlen,) int64, their global positions (the layout's
        :meth:`~ringflash.layout.Layout.positions`), on ``input_ids``' device.
        ``local_seqlen = seqlen / world_size`` (after padding).
        With ``cu_seqlens`` a fourth tensor: doc_positions (local_seqlen,) int64, each token's
        position inside its document (what rotary embeddings restart from), and the boundaries
        to pass on are the padded ones when ``pad_id`` added a document (``cu_seqlens`` of the
        padded length, ``list(cu_seqlens) + [padded_seqlen]``).

    Raises:
        ValueError: ``input_ids`` is not 2-D; ``labels`` has another shape; an unknown
            ``layout``; ``group`` is a DeviceMesh of more than one dimension, a group this rank
            is not a member of, or a group given while torch.distributed is not initialised;
            without ``pad_id``, a sequence length the layout cannot split over the group (a
            multiple of ``layout.multiple(world_size)`` is needed); a bad ``cu_seqlens`` (not
            starting at 0, not ending at the sequence length, not strictly increasing, float or
            not 1-D; with ``check`` and more than one rank, every rank raises: the rank with bad
            boundaries their own error, the others a ``ValueError`` naming it); with ``check``,
            ranks holding different lengths or boundaries.
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be 2-D (batch, seqlen); got shape {tuple(input_ids.shape)}")
    if labels is None:
        labels = input_ids
    if labels.shape != input_ids.shape:
        raise ValueError(f"labels must have input_ids' shape {tuple(input_ids.shape)}; got {tuple(labels.shape)}")
    layout = get_layout(layout)
    group = resolve_group(group)
    world_size, rank = world_and_rank(group)
    seqlen = input_ids.shape[1]
    checked = check and world_size > 1
    cu, problem = None, None
    if cu_seqlens is not None:
        try:
            cu = check_cu_seqlens(cu_seqlens, seqlen)
        except (TypeError, ValueError) as e:
            if not checked:
                raise
            problem = e  # raised after the check below, which tells the other ranks too
    if checked:
        _check_same_batch(seqlen, cu, group, world_size, input_ids.device, problem)
    if shift:
        labels = shift_labels(labels, cu, ignore_index)
    if pad_id is not None:
        m = layout.multiple(world_size) if world_size > 1 else 1  # one rank: any length
        pad = -seqlen % m
        if pad:
            input_ids = F.pad(input_ids, (0, pad), value=pad_id)
            labels = F.pad(labels, (0, pad), value=ignore_index)
            seqlen += pad
            if cu is not None:
                cu = (*cu, seqlen)
    layout.check_seqlen(seqlen, world_size)
    positions = layout.positions(seqlen, rank=rank, world_size=world_size, device=input_ids.device)
    out = (input_ids.index_select(1, positions), labels.index_select(1, positions), positions)
    if cu_seqlens is not None:
        out += (positions if cu is None else doc_positions(cu, positions),)
    return out


def shift_labels(labels: torch.Tensor, cu_seqlens=None, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """The targets of full sequences ``(batch, seqlen)``: each token's next token, ``ignore_index``
    for the last token and, with ``cu_seqlens`` (host ints), for the last token of every document."""
    fill = torch.full_like(labels[:, :1], ignore_index)
    labels = torch.cat([labels[:, 1:], fill], dim=1)
    if cu_seqlens is not None:
        # The last token of a document has no next token of its own document to predict.
        ends = torch.tensor(cu_seqlens[1:-1], dtype=torch.int64, device=labels.device) - 1
        labels = labels.index_fill(1, ends, ignore_index)
    return labels


def _check_same_batch(seqlen: int, cu, group, world_size: int, device, problem: Exception | None = None) -> None:
    """Raise on every rank unless every rank holds the same length and valid, equal boundaries:
    this rank's own ``problem`` (its boundaries' error) where it has one, else ``ValueError``."""
    digest = zlib.crc32(repr(cu).encode())
    mine = torch.tensor([seqlen, 0 if cu is None else len(cu), digest, problem is not None], dtype=torch.int64,
                        device=device)
    rows = [tuple(t) for t in all_gather_tensor(mine, group).tolist()]
    if problem is not None:
        raise problem
    bad = [r for r, row in enumerate(rows) if row[3]]
    if bad:
        raise ValueError(f"shard_batch was given bad cu_seqlens on rank(s) {bad} of its group (see the error "
                         f"there); every rank of the context-parallel group must pass the same valid boundaries")
    if len(set(rows)) > 1:
        detail = ", ".join(f"rank {r}: seqlen {n}, {max(c - 1, 0)} documents" for r, (n, c, _, _) in enumerate(rows))
        raise ValueError(
            f"shard_batch was given different batches on the ranks of its group ({detail}; boundaries "
            f"{'equal' if len({row[2] for row in rows}) == 1 else 'differ'}). Every rank of the "
            f"context-parallel group must pass the same full sequences and the same cu_seqlens"
        )


def unshard(x: torch.Tensor, *, layout: str | Layout = "striped", group=None, dim: int = 1) -> torch.Tensor:
    """The full tensor, on every rank, from every rank's shard along ``dim`` (an all-gather).

    Not differentiable (``torch.distributed.all_gather`` is not tracked by autograd: the result
    does not require grad); for inspection or evaluation, not for the training loss. A
    collective: every rank of ``group`` must call it with a shard of the same shape and dtype,
    cut by ``layout``; otherwise it may fail, hang or return a wrong tensor (not checked).
    See :meth:`ringflash.layout.Layout.unshard`.

    Args:
        x: this rank's shard, e.g. logits (batch_size, local_seqlen, vocab_size).
        layout: the layout the shards were cut with.
        group: the context-parallel group (ProcessGroup, 1-D DeviceMesh or None); without an
            initialised process group, or in a group of one, ``x`` is returned as it is.
        dim: the sequence dimension.

    Returns:
        The full tensor, ``world_size`` times longer along ``dim``, in global token order.

    Raises:
        ValueError: an unknown ``layout``; a bad ``group`` (a mesh of more than one dimension,
            or a group this rank is not a member of); a global length the layout cannot split.
    """
    return get_layout(layout).unshard(x, group=resolve_group(group), dim=dim)


def _all_reduce_sum(t: torch.Tensor, group) -> torch.Tensor:
    if torch.compiler.is_compiling():
        # A functional collective: torch.compile keeps it in the graph.
        import torch.distributed._functional_collectives as funcol

        for g in (group.ulysses, group.ring) if isinstance(group, HybridGroup) else (group,):
            t = funcol.all_reduce(t, "sum", g if g is not None else dist.group.WORLD)
        return t
    return all_reduce_sum(t, group)


def sharded_cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    group=None,
    *,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """Mean cross-entropy over the tokens of every rank of ``group`` (labels == ignore_index skipped).

    The labels must already be the targets of this rank's tokens, shifted on the full sequence
    (:func:`shard_batch` does it); nothing is shifted here.

    Gradient scaling for data x context parallelism: the gradient on each rank is that of
    ``world_size / total_count`` times its local sum (``world_size`` of ``group``), so the
    *average* of the parameter gradients over the context-parallel ranks is the gradient of the
    global mean. Average (do not sum) gradients over the flattened dp x cp ranks (DDP/FSDP over
    both, the default averaging), or over dp with DDP/FSDP and over cp with
    :func:`average_gradients`: the result is the gradient of the mean over dp of each
    sequence group's mean loss.

    Cross-rank contract: with more than one rank, a collective (one all-reduce): every rank of
    ``group`` must call it, with the same ``group`` and ``ignore_index``. A rank that skips it
    hangs the others; this is not checked (``RINGFLASH_CHECK_CONSISTENCY`` covers ring attention
    only).

    Args:
        logits: (batch_size, local_seqlen, vocab_size), this rank's tokens.
        labels: (batch_size, local_seqlen), their targets (from :func:`shard_batch`).
        group: the context-parallel group (ProcessGroup, 1-D DeviceMesh or None).
        ignore_index: the label whose tokens are left out of the sum and the count.

    Returns:
        a scalar, float32 (float64 for float64 logits): the same value on every rank, the mean
        over all non-ignored tokens of the full sequences (0 when there are none). Its gradient on this rank is
        ``world_size`` times the gradient of this rank's share of the sum, so that the
        average of the ranks' parameter gradients is the gradient of the mean (see the module
        docstring); one all-reduce of two numbers in the forward, none in the backward.

    Raises:
        ValueError: ``logits`` is not 3-D or ``labels`` is not ``logits.shape[:2]``; ``group`` is
            a DeviceMesh of more than one dimension, a group this rank is not a member of, or a
            group given while torch.distributed is not initialised.
    """
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(
            f"logits must be (batch, local_seqlen, vocab) and labels (batch, local_seqlen); got "
            f"{tuple(logits.shape)} and {tuple(labels.shape)}"
        )
    cd = torch.promote_types(logits.dtype, torch.float32)  # the loss of bf16 logits in float32
    local_sum = F.cross_entropy(
        logits.flatten(0, 1).to(cd), labels.flatten(), ignore_index=ignore_index, reduction="sum"
    )
    local_count = (labels != ignore_index).sum()
    group = resolve_group(group)
    world_size, _ = world_and_rank(group)
    if world_size == 1:
        return local_sum / local_count.clamp(min=1)
    # Sum and count in float64: exact counts, and a sum that does not depend on the order of ranks.
    stats = torch.stack([local_sum.detach().double(), local_count.double()])
    total_sum, total_count = _all_reduce_sum(stats, group).unbind()
    total_count = total_count.clamp(min=1)
    scaled = local_sum * (world_size / total_count).to(cd)
    # The value is the global mean; the gradient is that of the scaled local term.
    return scaled + ((total_sum / total_count).to(cd) - scaled).detach()


@torch.no_grad()
def average_gradients(parameters, group=None) -> None:
    """Average ``.grad`` of ``parameters`` over ``group`` in place (one all-reduce per tensor).

    For models whose data parallelism does not cover the context-parallel ranks: after
    ``loss.backward()`` with :func:`sharded_cross_entropy`, the average over the
    context-parallel group is the gradient of the global mean loss.

    A collective: every rank of ``group`` must call it with the same parameters in the same
    order, each with a ``.grad`` on every rank or on none (not checked; a mismatch hangs or
    mixes gradients of different tensors).

    Args:
        parameters: an iterable of tensors (e.g. ``model.parameters()``); those without
            ``.grad`` are skipped.
        group: the context-parallel group (ProcessGroup, 1-D DeviceMesh or None); a no-op in a
            group of one or without torch.distributed.

    Raises:
        ValueError: a bad ``group``, as :func:`sharded_cross_entropy`.
    """
    group = resolve_group(group)
    world_size, _ = world_and_rank(group)
    if world_size == 1:
        return
    for p in parameters:
        if p.grad is not None:
            all_reduce_sum(p.grad, group, inplace=True)
            p.grad.div_(world_size)
