"""Hugging Face ``transformers`` models with ring attention: the ``"ring_attention"`` implementation.

Importing this module registers ``"ring_attention"`` with transformers' ``AttentionInterface``,
so any model whose attention layers go through that interface (Llama, Qwen2, Mistral and most
current decoder models) runs every attention layer as :func:`ringflash.ring_attention` over the
context-parallel group::

    import ringflash.hf as rhf
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="ring_attention")
    batch = rhf.shard_inputs(input_ids)   # this rank's shard, global position_ids, shifted labels
    loss = model(**batch).loss            # this rank's share; its mean over the group is the loss
    loss.backward()                       # then average gradients over the group (DDP does it)

The model sees only this rank's tokens: the layout (striped by default) decides which; the
``position_ids`` carry the tokens' global positions (or their positions inside their
documents), so the model's own rotary embeddings are right on every rank; and the labels are
shifted on the full sequence before it is cut (transformers' ``shift_labels``).

Configuration: :func:`configure` sets the group, layout and engine for every model of the
process, and restores the previous ones when used as a context manager::

    rhf.configure(group=mesh["cp"], layout="zigzag")       # from now on
    with rhf.configure(group=cp, layout="contiguous"):     # inside the block only
        ...

With nothing set: the default process group, the striped layout, the default engine (Triton on
CUDA, the reference engine on the CPU). The settings are read when an attention layer runs, so
a forward recomputed during backward (gradient checkpointing) must run under the same settings:
set them with a plain ``configure(...)`` call, or call ``backward`` inside the ``with`` block.

What the model's attention layers ask for is served as they ask: causal or not
(``module.is_causal``), grouped-query heads (only the K/V heads travel), the module's
``scaling``, a sliding window (Mistral, Qwen2 ``sliding_window``; transformers' convention, a
causal window of ``w`` sees ``w`` keys: itself and ``w - 1`` before), and packed documents
(``cu_seq_lens_q`` / ``cu_seq_lens_k`` holding the boundaries of the *whole* packed sequence,
as :func:`shard_inputs` gives them). What cannot be served raises ``ValueError``: attention
dropout, logit soft-capping, attention sinks, position biases, returned attention weights,
cross-attention and decoding with a cache (queries and keys of different lengths), and a padding
``attention_mask`` (pack the sequences as documents instead).

Needs ``transformers`` (``pip install -e ".[hf]"``).
"""

from __future__ import annotations

import weakref
import zlib
from dataclasses import dataclass

import torch

try:
    from transformers import AttentionInterface
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
        "ringflash.hf needs Hugging Face transformers 4.53 or newer (AttentionInterface and its mask functions): "
        'pip install -e ".[hf]" (or pip install transformers)'
    ) from e

try:  # transformers drops the attention_mask of an implementation without a mask function
    from transformers.masking_utils import AttentionMaskInterface
except ImportError:  # pragma: no cover - depends on the environment
    AttentionMaskInterface = None

from .batch import IGNORE_INDEX, shard_batch, shift_labels
from .comm import all_gather_tensor, resolve_group, world_and_rank
from .layout import Layout, get_layout
from .mask import check_cu_seqlens, doc_positions
from .ring import ring_attention

__all__ = ["ATTENTION", "configure", "settings", "RingSettings", "ring_attention_forward", "shard_inputs"]

ATTENTION = "ring_attention"
"""The name to pass as ``attn_implementation``."""


@dataclass(frozen=True)
class RingSettings:
    """What every ``"ring_attention"`` layer of the process uses (see :func:`configure`)."""

    group: object = None
    layout: Layout = get_layout("striped")
    backend: str | None = None
    check: bool = True


_settings = RingSettings()


def settings() -> RingSettings:
    """The settings in effect now."""
    return _settings


class configure:
    """Set the context-parallel group, layout and engine of every ``"ring_attention"`` layer.

    A call sets them for the process from now on; used as a context manager, the previous
    settings come back when the block ends. Every argument left out takes its default (not
    the value set before).

    Args:
        group: the context-parallel group: a ProcessGroup, a 1-D DeviceMesh (``mesh["cp"]``) or
            None for the default group (without an initialised process group, one process:
            plain attention).
        layout: ``"striped"`` (default), ``"zigzag"``, ``"contiguous"`` or a
            :class:`~ringflash.layout.Layout`: how the batches were cut (:func:`shard_inputs`
            cuts them with this layout).
        backend: the local engine, as for :func:`ringflash.ring_attention` (None: the default).
        check: once per forward, compare every rank's ``position_ids`` with the positions the
            layout gives it in this group, and every rank's length and document boundaries with
            the others' (one all-gather of a few integers and one device synchronisation per
            forward), raising ``ValueError`` on every rank if the shards do not match the group
            (default True). A padding ``attention_mask`` is refused whether or not this is on.

    Raises:
        ValueError: an unknown layout; a DeviceMesh of more than one dimension; a group this
            rank is not a member of.
    """

    def __init__(self, *, group=None, layout: str | Layout = "striped", backend: str | None = None,
                 check: bool = True):
        global _settings
        new = RingSettings(group=resolve_group(group), layout=get_layout(layout), backend=backend,
                           check=bool(check))
        self.previous, _settings = _settings, new

    def __enter__(self) -> RingSettings:
        return _settings

    def __exit__(self, *exc) -> None:
        global _settings
        _settings = self.previous


# -- the attention function ------------------------------------------------------------------------

_REFUSED = {
    "softcap": "logit soft-capping (softcap)",
    "s_aux": "attention sinks (s_aux)",
    "sinks": "attention sinks",
    "position_bias": "an additive position bias",
}


def ring_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    sliding_window: int | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature, served by :func:`ringflash.ring_attention`.

    Args:
        module: the attention layer (its ``is_causal`` decides causality unless ``is_causal`` is given).
        query: (batch_size, nheads, local_seqlen, headdim), this rank's tokens.
        key, value: (batch_size, nheads_kv, local_seqlen, headdim).
        attention_mask: None or a 2-D mask of ones (no padding).
        dropout: must be 0.
        scaling: the softmax scale (default ``1 / sqrt(headdim)``).
        is_causal: overrides ``module.is_causal``.
        sliding_window: transformers' window size ``w`` (a causal query sees itself and the
            ``w - 1`` keys before it; without causality, keys at distance ``<= w``).
        kwargs: ``cu_seq_lens_q`` / ``cu_seq_lens_k``: boundaries of the whole packed sequence;
            ``position_ids``: checked against the layout (see :func:`configure`); other
            transformers keyword arguments are accepted and ignored, except those that ask
            for something ring attention does not compute (``ValueError``).

    Returns:
        (attn_output (batch_size, local_seqlen, nheads, headdim), None): no attention weights.
    """
    s = _settings
    name = type(module).__name__
    for key_name, what in _REFUSED.items():
        if kwargs.get(key_name) is not None:
            raise ValueError(f"ring_attention cannot serve {what}, which {name} asks for")
    if dropout:
        raise ValueError(
            f"ring_attention has no attention dropout; {name} asks for p={dropout} (set the config's "
            f"attention_dropout to 0)"
        )
    if kwargs.get("output_attentions"):
        raise ValueError("ring_attention does not return attention weights (output_attentions=True)")
    if query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
        raise ValueError(f"{name}: ring_attention takes 4-D (batch, heads, seqlen, headdim) query, key and value")
    if query.shape[2] != key.shape[2]:
        raise ValueError(
            f"ring_attention serves self-attention over the sharded sequence: {name} has {query.shape[2]} "
            f"queries and {key.shape[2]} keys (cross-attention, or decoding with a cache: pass use_cache=False)"
        )
    causal = bool(getattr(module, "is_causal", True) if is_causal is None else is_causal)
    world_size, rank = world_and_rank(s.group)
    seqlen = query.shape[2] * world_size
    cu = _cu_seqlens(kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k"), seqlen)
    window = _window(sliding_window, causal, seqlen)
    if attention_mask is not None:
        if attention_mask.dim() != 2:
            raise ValueError(
                f"ring_attention builds its mask from causality, the window and the document boundaries; "
                f"it cannot take a prepared {attention_mask.dim()}-D attention_mask"
            )
        _check_padding(attention_mask, s)  # only where transformers has no mask functions
    if s.check:
        _check_batch(kwargs.get("position_ids"), cu, query.shape[2], s, world_size, rank)
    out = ring_attention(
        query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), causal=causal, window=window,
        cu_seqlens=cu, layout=s.layout, softmax_scale=scaling, group=s.group, backend=s.backend,
    )
    return out, None


def _window(sliding_window, causal: bool, seqlen: int):
    """transformers' ``sliding_window`` as ring attention's ``(left, right)`` (None: no window)."""
    if sliding_window is None:
        return None
    w = int(sliding_window)
    if w <= 0:
        raise ValueError(f"sliding_window must be a positive int; got {sliding_window!r}")
    if causal:  # transformers: kv_idx > q_idx - w
        return None if w >= seqlen else (w - 1, 0)
    return None if w >= seqlen - 1 else (w, w)  # transformers: |q_idx - kv_idx| <= w


def _cu_seqlens(cu_q, cu_k, seqlen: int):
    if cu_q is None and cu_k is None:
        return None
    cu_q = check_cu_seqlens(cu_q if cu_q is not None else cu_k, seqlen)
    if cu_k is not None and check_cu_seqlens(cu_k, seqlen) != cu_q:
        raise ValueError("ring_attention needs the same document boundaries for queries and keys "
                         "(cu_seq_lens_q == cu_seq_lens_k)")
    return cu_q


# One check per forward: every layer of a model gets the same position_ids tensor, so the check
# runs on the first layer and the others find it done (on every rank alike).
_checked: list = [None]


def _check_batch(position_ids, cu, local_seqlen: int, s: RingSettings, world_size: int, rank: int) -> None:
    """Raise ``ValueError`` on every rank if the shards do not fit the group and layout.

    Compares this rank's ``position_ids`` with the positions the layout gives it (inside its
    documents, with ``cu``), and every rank's global length and boundaries with the others'
    (one all-gather of three integers). Nothing to compare without ``position_ids``.
    """
    if position_ids is None or (_checked[0] is not None and _checked[0]() is position_ids):
        return
    seqlen = local_seqlen * world_size
    try:
        s.layout.check_seqlen(seqlen, world_size)
        expect = s.layout.positions(seqlen, rank=rank, world_size=world_size, device=position_ids.device)
    except ValueError:
        bad = torch.ones((), dtype=torch.bool, device=position_ids.device)
    else:
        if cu is not None:
            expect = doc_positions(cu, expect)
        bad = (position_ids.reshape(-1, local_seqlen) != expect).any()
    digest = zlib.crc32(repr((seqlen, cu)).encode()) & 0x7FFFFFFF
    mine = torch.stack([bad.to(torch.int64), bad.new_tensor(digest, dtype=torch.int64)])
    rows = all_gather_tensor(mine, s.group).tolist()
    if len({r[1] for r in rows}) > 1:
        raise ValueError(
            "the ranks of the context-parallel group hold batches of different lengths or document "
            "boundaries: every rank must run the same batch, cut by ringflash.hf.shard_inputs"
        )
    if any(r[0] for r in rows):
        who = [r for r, row in enumerate(rows) if row[0]]
        docs = "their positions inside their documents, " if cu is not None else ""
        raise ValueError(
            f"position_ids on rank(s) {who} are not {docs}the positions the {s.layout!r} layout gives "
            f"them over a group of {world_size} (global length {seqlen}): the shards do not match the "
            f"group or the layout. Cut the batch with ringflash.hf.shard_inputs under the same "
            f"configure(group=..., layout=...) as the model"
            + ("" if cu is not None else "; packed documents need cu_seq_lens_q/cu_seq_lens_k")
        )
    _checked[0] = weakref.ref(position_ids)


# -- batches ---------------------------------------------------------------------------------------

_UNSET = object()


def shard_inputs(
    input_ids: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    position_ids: torch.Tensor | None = None,
    cu_seqlens=None,
    attention_mask: torch.Tensor | None = None,
    group=_UNSET,
    layout=_UNSET,
    pad_id: int | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> dict:
    """This rank's shard of a batch of full sequences, as keyword arguments of the model.

    Every rank of the group passes the same full batch; each gets its own tokens (the layout's
    cut), their position ids, and their targets, shifted on the full sequence. Local: no
    communication beyond one small all-gather that checks that every rank got the same length
    and boundaries.

    Args:
        input_ids: (batch_size, seqlen), the full sequences.
        labels: (batch_size, seqlen) aligned with ``input_ids`` (the model's convention: shifted
            here), or None for ``input_ids``.
        position_ids: (batch_size or 1, seqlen) of the full sequences, or None. Positions that
            restart at 0 mark packed documents (what ``DataCollatorWithFlattening`` gives), and
            become ``cu_seqlens``; they must be the same for every row.
        cu_seqlens: document boundaries of the full sequences, ``[0, end_0, ..., seqlen]``
            (the same for every row), instead of restarting ``position_ids``.
        attention_mask: (batch_size, seqlen) or None: must be all ones (padding inside a
            sharded batch cannot be served: pack the sequences instead).
        group, layout: default to the current :func:`configure` settings.
        pad_id: pad the sequences at the end to a length the layout can split (the padding
            gets ``ignore_index`` targets; with documents it is a document of its own).
        ignore_index: the target that the loss ignores.

    Returns:
        A dict for ``model(**batch)``: ``input_ids`` (batch_size, local_seqlen); ``position_ids``
        (batch_size, local_seqlen): global positions, or positions inside each document;
        ``shift_labels`` (the targets of these tokens) and ``labels`` (the same tensor: it only
        makes the model compute its loss); ``num_items_in_batch``: the number of targets of the
        whole batch divided by the group size, so that the model's loss is this rank's share of
        the full-sequence mean times the group size (its mean over the group is that mean, and
        averaging gradients over the group gives its gradient, as
        :func:`ringflash.sharded_cross_entropy` does); with documents, ``cu_seq_lens_q`` and
        ``cu_seq_lens_k`` (int64, on the CPU): the boundaries of the whole packed sequence.

    Raises:
        ValueError: padding in ``attention_mask``; ``position_ids`` or ``cu_seqlens`` that differ
            between rows or do not describe the sequence; everything
            :func:`ringflash.shard_batch` raises (a length the layout cannot split without
            ``pad_id``, ranks holding different lengths or boundaries, ...).
    """
    s = _settings
    group = s.group if group is _UNSET else resolve_group(group)
    layout = s.layout if layout is _UNSET else get_layout(layout)
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be 2-D (batch, seqlen); got shape {tuple(input_ids.shape)}")
    if attention_mask is not None:
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask must have input_ids' shape {tuple(input_ids.shape)}; "
                             f"got {tuple(attention_mask.shape)}")
        if (attention_mask == 0).any():
            raise ValueError(
                "ring_attention cannot take padding inside a sharded batch (attention_mask has zeros): "
                "pack the sequences as documents (position_ids restarting at 0, or cu_seqlens) and pad "
                "only at the end with pad_id"
            )
    if position_ids is not None:
        cu_from_pos = _documents_from_positions(position_ids, input_ids.shape[1])
        if cu_seqlens is None:
            cu_seqlens = cu_from_pos
        elif cu_from_pos is not None and check_cu_seqlens(cu_seqlens, input_ids.shape[1]) != cu_from_pos:
            raise ValueError("position_ids and cu_seqlens describe different documents")
    world_size, _ = world_and_rank(group)
    if cu_seqlens is not None:
        ids, targets, positions, doc_pos = shard_batch(
            input_ids, labels, layout=layout, group=group, pad_id=pad_id, ignore_index=ignore_index,
            cu_seqlens=cu_seqlens,
        )
        cu = list(check_cu_seqlens(cu_seqlens, input_ids.shape[1]))
        padded = ids.shape[1] * world_size
        if padded != cu[-1]:
            cu.append(padded)
        pos = doc_pos
    else:
        ids, targets, pos = shard_batch(input_ids, labels, layout=layout, group=group, pad_id=pad_id,
                                        ignore_index=ignore_index)
        cu = None
    full_cu = None if cu is None else check_cu_seqlens(cu_seqlens, input_ids.shape[1])
    every_target = shift_labels(labels if labels is not None else input_ids, full_cu, ignore_index)
    n_items = int((every_target != ignore_index).sum())  # what the loss averages over, whole batch
    batch = {
        "input_ids": ids,
        "position_ids": pos.unsqueeze(0).expand(ids.shape[0], -1).contiguous(),
        "labels": targets,
        "shift_labels": targets,
        "num_items_in_batch": torch.tensor(n_items / world_size, dtype=torch.float32, device=ids.device),
    }
    if cu is not None:
        batch["cu_seq_lens_q"] = batch["cu_seq_lens_k"] = torch.tensor(cu, dtype=torch.int64)
    return batch


def _documents_from_positions(position_ids: torch.Tensor, seqlen: int):
    """Boundaries from positions that restart at 0, or None for one sequence counted from 0."""
    if position_ids.dim() == 1:
        position_ids = position_ids.unsqueeze(0)
    if position_ids.dim() != 2 or position_ids.shape[1] != seqlen:
        raise ValueError(f"position_ids must be (batch, {seqlen}) for the full sequences; got "
                         f"{tuple(position_ids.shape)}")
    if (position_ids != position_ids[:1]).any():
        raise ValueError("position_ids must be the same for every row: ring attention takes one set of "
                         "document boundaries for the batch")
    pos = position_ids[0].cpu()
    starts = (pos == 0).nonzero().flatten().tolist()
    if not starts or starts[0] != 0:
        raise ValueError("position_ids of the full sequence must start at 0")
    cu = [*starts, seqlen]
    expect = torch.cat([torch.arange(b - a) for a, b in zip(cu[:-1], cu[1:])])
    if not torch.equal(pos, expect):
        raise ValueError("position_ids must count 0, 1, 2, ... inside each document (restarting at 0 "
                         "where a document starts)")
    return None if len(cu) == 2 else cu


def _ring_mask(*args, attention_mask=None, **kwargs):
    """transformers' mask function for ``"ring_attention"``, called once per forward and mask kind.

    Ring attention builds its mask itself; the only thing to do with the model's 2-D
    ``attention_mask`` is to refuse padding, on every rank: each rank's flag is all-gathered
    (the same number of calls on every rank, whatever the mask's dtype), and the layers get
    None. Without a mask function registered, transformers would drop the mask unseen.
    """
    if attention_mask is None:
        return None
    _check_padding(attention_mask, _settings)
    return None


def _check_padding(attention_mask, s: RingSettings) -> None:
    """Raise ``ValueError`` on every rank of the group if any rank's mask has a zero."""
    flag = (attention_mask == 0).any().to(torch.int64).reshape(1)
    flags = all_gather_tensor(flag, s.group).flatten().tolist()
    if any(flags):
        who = [r for r, f in enumerate(flags) if f]
        raise ValueError(
            f"ring_attention cannot take padding inside a sharded batch (attention_mask has zeros on "
            f"rank(s) {who}): pack the sequences as documents (cu_seqlens, see ringflash.hf.shard_inputs) "
            f"or give every row the same length"
        )


AttentionInterface.register(ATTENTION, ring_attention_forward)
if AttentionMaskInterface is not None:
    AttentionMaskInterface.register(ATTENTION, _ring_mask)
