"""A small GPT whose attention runs over a sequence sharded across a context-parallel group.

Every rank of the group holds the same weights and its own shard of the tokens, cut by the
config's layout (:func:`ringflash.batch.shard_batch`). There is no absolute position
embedding (rotary only, from global positions), so sharding is just a permutation of tokens:
the logits of a rank are the full-sequence logits at its tokens, and the loss is the mean
over the whole sequence.

    from ringflash.batch import shard_batch
    from ringflash.models import GPT, GPTConfig

    model = GPT(GPTConfig(dim=512, n_layers=8, n_heads=8), group=cp_group).cuda()
    ids, labels, _ = shard_batch(full_ids, layout=model.config.layout, group=cp_group)
    logits, loss = model(ids.cuda(), labels.cuda())
    loss.backward()   # then average gradients over data-parallel x context-parallel ranks

Gradients: see :mod:`ringflash.batch`: run DDP/FSDP over the flattened data-parallel x
context-parallel ranks (or call :func:`ringflash.batch.average_gradients` over the
context-parallel group). Every rank must start from the same weights: seed identically, or
let DDP broadcast them.

``torch.compile(model, fullgraph=True)`` works: ring attention is a custom op inside the graph
(see :mod:`ringflash.nn`), the rotary tables are computed in the graph, and the loss's
all-reduce is a functional collective, so the whole model is one graph.
``GPTConfig.checkpoint`` recomputes each block in the backward (``torch.utils.checkpoint``,
non-reentrant), ring communication included; every rank recomputes the same blocks in the
same order, so the recomputed ring steps line up.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .batch import IGNORE_INDEX, sharded_cross_entropy
from .layout import Layout
from .mask import check_cu_seqlens, check_window
from .nn import _MODULE, MultiheadAttention, _SharesGroup, _world_and_rank

__all__ = ["GPTConfig", "GPT", "Block", "MLP"]


@dataclass
class GPTConfig:
    """The shape of a :class:`GPT`; every rank of the context-parallel group must use the same one."""

    vocab_size: int = 256  # tokens; 256 = bytes
    dim: int = 256  # model width
    n_layers: int = 4  # transformer blocks
    n_heads: int = 8  # query heads; head_dim = dim // n_heads (even, for rotary)
    n_kv_heads: int | None = None  # key/value heads (GQA/MQA); None = n_heads
    mlp_ratio: float = 4.0  # MLP hidden width = mlp_ratio * dim
    layout: str | Layout = "striped"  # how the sequence is sharded: contiguous, striped, zigzag
    rope_base: float = 10000.0  # rotary base (theta); raise it for very long contexts
    norm_eps: float = 1e-5  # RMSNorm epsilon
    bias: bool = False  # biases in the Linear layers
    tie_embeddings: bool = True  # the output head shares the token embedding's weight
    checkpoint: bool = False  # activation checkpointing: recompute each block in the backward
    # Sliding-window attention: an int N, each token sees itself and the N tokens before it (N, 0);
    # or flash-attn's (left, right) on global positions (-1: unbounded; with causal, right is moot).
    window: int | tuple[int, int] | None = None
    sparsity: str | None = None  # sparse attention (ringflash.sparse): "hash:8", "qkdrop:0.5", "block:size=128,local=4"
    init_std: float = 0.02  # std of the normal init; output projections get init_std / sqrt(2 * n_layers)


def _config_window(window):
    """``GPTConfig.window`` as the attention's ``(left, right)`` or None; ``ValueError`` unless it is
    None, an int >= 0 or a window :func:`ringflash.mask.check_window` takes."""
    if window is None:
        return None
    if isinstance(window, int) and not isinstance(window, bool):
        if window < 0:
            raise ValueError(f"window must be None, an int >= 0 (keys before each token) or (left, right); got {window}")
        return (window, 0)
    return check_window(window)


class MLP(nn.Module):
    """x -> Linear -> GELU -> Linear, position-wise."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        hidden = int(config.mlp_ratio * config.dim)
        self.fc = nn.Linear(config.dim, hidden, bias=config.bias)
        self.proj = nn.Linear(hidden, config.dim, bias=config.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x)))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: GPTConfig, group=None, backend: str | None = None, index: int = 0):
        super().__init__()
        self.attn_norm = nn.RMSNorm(config.dim, eps=config.norm_eps)
        self.attn = MultiheadAttention(
            config.dim, config.n_heads, num_kv_heads=config.n_kv_heads, causal=True,
            window=_config_window(config.window), layout=config.layout,
            rope=True, rope_base=config.rope_base, bias=config.bias, group=group, backend=backend,
            sparsity=config.sparsity, sparsity_seed=index,
        )
        self.mlp_norm = nn.RMSNorm(config.dim, eps=config.norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cu_seqlens=None,
                window=_MODULE) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), rotary=(cos, sin), cu_seqlens=cu_seqlens, window=window)
        return x + self.mlp(self.mlp_norm(x))


class GPT(_SharesGroup, nn.Module):
    """A decoder-only transformer over this rank's shard of the sequence.

    Args:
        config: the model's shape (:class:`GPTConfig`).
        group: the context-parallel group (ProcessGroup, 1-D DeviceMesh such as ``mesh["cp"]``,
            or None: the default group, or one process when torch.distributed is not initialised).
            This rank must be a member of the group (``ValueError`` otherwise).
        backend: the local attention kernel (``"triton"``, ``"reference"``; default by device).

    ``copy.deepcopy(model)`` (``AveragedModel``, EMA copies) shares the group with the copy and
    copies the parameters. ``torch.save(model)`` of a model built with a ProcessGroup raises
    ``TypeError``, since a process group cannot be pickled: save ``model.state_dict()`` and build
    the model with its group where it is loaded.

    Raises:
        ValueError: ``config.n_layers < 1``; the checks of
            :class:`~ringflash.nn.MultiheadAttention` on the config: ``dim``, ``n_heads`` or
            ``n_kv_heads`` not positive, ``dim`` not a multiple of ``n_heads``, ``n_heads`` not a
            multiple of ``n_kv_heads``, an odd head_dim, a ``rope_base`` that is not finite and
            positive, an unknown ``layout``; ``group`` is a DeviceMesh of more than one dimension,
            a group this rank is not a member of, or a group given while torch.distributed is not
            initialised.

    Cross-rank contract: every rank of ``group`` must build the model from the same config and
    weights and call ``forward`` identically (same shapes, dtype, ``backend``, ``config.layout``,
    with labels on every rank or on none), on shards cut by ``config.layout``
    (:func:`~ringflash.batch.shard_batch`). Otherwise the ring exchanges buffers of different
    sizes or the loss's all-reduce is missing on some ranks: an error, a hang, or a wrong result.
    This is not detected by default; ``RINGFLASH_CHECK_CONSISTENCY=1`` makes every ring attention
    call compare the ranks' shapes, dtype, causal, softmax_scale, layout and backend first and
    raise ``ValueError`` naming what differs.
    """

    def __init__(self, config: GPTConfig, group=None, backend: str | None = None):
        super().__init__()
        if config.n_layers < 1:
            raise ValueError(f"n_layers must be at least 1; got {config.n_layers}")
        _config_window(config.window)  # ValueError here, not at the first forward
        self.config = config
        self.group = group
        self.tok_emb = nn.Embedding(config.vocab_size, config.dim)
        self.blocks = nn.ModuleList([Block(config, group, backend, index=i) for i in range(config.n_layers)])
        self.norm = nn.RMSNorm(config.dim, eps=config.norm_eps)
        self.head = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.head.weight = self.tok_emb.weight
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Normal(0, ``init_std``) weights, ``init_std / sqrt(2 * n_layers)`` for the residual
        output projections, ones for norm weights, zeros for biases. Seeded identically on every
        rank, it gives every rank the same weights."""
        std = self.config.init_std
        for name, p in self.named_parameters():
            if p.dim() == 1:  # norm weights and biases
                nn.init.ones_(p) if "norm" in name else nn.init.zeros_(p)
            elif name.endswith(("attn.out.weight", "mlp.proj.weight")):
                # Residual branches: keep the residual stream's variance independent of depth.
                nn.init.normal_(p, std=std / math.sqrt(2 * self.config.n_layers))
            else:
                nn.init.normal_(p, std=std)

    def forward(self, input_ids_local: torch.Tensor, labels_local: torch.Tensor | None = None, *,
                cu_seqlens=None, window=_MODULE):
        """Logits of this rank's tokens and, with labels, the mean loss over the whole group.

        Args:
            input_ids_local: (batch_size, local_seqlen) int64, this rank's shard under ``config.layout``.
            labels_local: (batch_size, local_seqlen) targets of these tokens (shifted on the full
                sequence, see :func:`ringflash.batch.shard_batch`); ``-100`` is ignored.
            cu_seqlens: document boundaries of the whole packed sequence, ``[0, end_0, ..., seqlen]``
                (a list or a CPU tensor; the same on every rank): tokens attend only inside their
                own document and rotary positions restart at each document. Decided once per
                call for every layer.
            window: ``(left, right)`` (flash-attn's ``window_size`` on global positions, -1:
                unbounded) or None (no window) for every layer of this call, instead of
                ``config.window``.

        Returns:
            logits_local: (batch_size, local_seqlen, vocab_size); loss: the mean cross-entropy over
            every non-ignored token of the context-parallel group (a float32 scalar, float64 for a
            float64 model; the same on
            every rank), or None without labels.

        Raises:
            ValueError: ``input_ids_local`` is not 2-D; ``labels_local`` has another shape; a local
                length the layout cannot give over the group (e.g. odd under zigzag), checked on
                every rank before any communication; the input checks of
                :meth:`~ringflash.nn.RingAttention.forward` (e.g. an unknown ``backend``, or
                ``"triton"`` on the CPU without ``TRITON_INTERPRET=1``).
        """
        if input_ids_local.dim() != 2:
            raise ValueError(
                f"input_ids_local must be 2-D (batch, local_seqlen); got shape {tuple(input_ids_local.shape)}"
            )
        if labels_local is not None and labels_local.shape != input_ids_local.shape:
            raise ValueError(
                f"labels_local must have input_ids_local's shape {tuple(input_ids_local.shape)}; "
                f"got {tuple(labels_local.shape)}"
            )
        if window is not _MODULE:
            window = check_window(window)  # before any communication, once for every layer
        x = self.tok_emb(input_ids_local)  # (B, S, dim)
        # Rotary tables of this rank's global positions, once for every layer (this also
        # checks the shard length against the layout, before any communication).
        if cu_seqlens is not None and not torch.compiler.is_compiling():
            # Checked and made host ints once, for every layer (a CUDA tensor: one sync here).
            world_size, _ = _world_and_rank(self.group)
            cu_seqlens = check_cu_seqlens(cu_seqlens, input_ids_local.shape[1] * world_size)
        cos, sin = self.blocks[0].attn.rotary(input_ids_local.shape[1], x.device, x.dtype, cu_seqlens=cu_seqlens)
        for block in self.blocks:
            if self.config.checkpoint and torch.is_grad_enabled():
                x = checkpoint(block, x, cos, sin, cu_seqlens, window, use_reentrant=False)
            else:
                x = block(x, cos, sin, cu_seqlens, window)
        return self._output(x, labels_local)

    def _output(self, x: torch.Tensor, labels_local: torch.Tensor | None):
        logits = self.head(self.norm(x))  # (B, S, vocab)
        loss = None
        if labels_local is not None:
            loss = sharded_cross_entropy(logits, labels_local, self.group, ignore_index=IGNORE_INDEX)
        return logits, loss
