"""nn.Modules over this rank's shard of a sequence: the core ring attention and a multi-head block.

Both modules take the *local* shard of the sequence, cut by a layout (see
:mod:`ringflash.layout` and :func:`ringflash.batch.shard_batch`), and return the local shard
of the result. Without an initialised process group, or with a group of one rank, they are
plain single-device attention: the same model code runs on one GPU or one CPU process.

Rotary embeddings use the layout's *global* positions of this rank's tokens, so striping or
zigzagging the sequence only permutes tokens: a sharded forward is the full-sequence forward,
cut into shards.

``torch.compile``: ring attention is one custom op (``torch.ops.ringflash.ring_attention``,
with its backward op), so compiled models keep it inside their graphs, without a graph break.
(A custom :class:`~ringflash.layout.Layout` subclass or a backend object runs eagerly across a
graph break instead.) The rotary tables are looked up in a host-side cache in eager mode, and
computed inside the graph under torch.compile; a stack of layers looks them up once
(:meth:`MultiheadAttention.rotary` and the ``rotary=`` argument of ``forward``).

Copies and checkpoints: the modules keep their group as an attribute. ``copy.deepcopy`` (and so
``torch.optim.swa_utils.AveragedModel``, EMA copies) shares the group with the copy and copies
everything else. A ProcessGroup cannot be pickled, so ``torch.save(module)`` of a module built
with one raises ``TypeError``: save ``module.state_dict()`` and build the module with its group
in the process that loads it.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.distributed as dist
import torch.nn as nn
from einops import rearrange

from .comm import HybridGroup, resolve_group, world_and_rank
from .layout import Layout, get_layout
from .mask import check_cu_seqlens, check_window, doc_positions
from .ring import ring_attention
from .sparse import BlockSparse, HashSparse, QKDrop, hash_buckets, hash_projection, keep_random, parse_sparsity

_MODULE = object()  # forward(window=... / sparsity=...) not given: the module's own

__all__ = ["RingAttention", "MultiheadAttention", "rotary_tables", "apply_rotary"]


def _world_and_rank(group) -> tuple[int, int]:
    """(world size, rank) in ``group``: a ProcessGroup, a 1-D DeviceMesh or None."""
    return world_and_rank(resolve_group(group))


class _SharesGroup:
    """For modules that keep their context-parallel group as ``self.group`` (mixed in before nn.Module).

    ``copy.deepcopy`` shares the group (a communicator, not model state) with the copy and
    deep-copies everything else: parameters, buffers and caches are the copy's own.
    Pickling (``torch.save(module)``) refuses a ProcessGroup with a ``TypeError`` that says to
    save the state dict instead.
    """

    def __deepcopy__(self, memo):
        group = self.__dict__.get("group")
        if group is not None:
            memo.setdefault(id(group), group)  # every reference to the group, in any submodule, is kept
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        new.__setstate__(copy.deepcopy(super().__getstate__(), memo))
        return new

    def __getstate__(self):
        group = self.__dict__.get("group")
        if dist.is_available() and isinstance(group, (dist.ProcessGroup, HybridGroup)):
            raise TypeError(
                f"a {type(self).__name__} built with a ProcessGroup (group=) cannot be pickled, e.g. by "
                f"torch.save(model): a process group does not outlive its processes. Save "
                f"model.state_dict() instead, and build the model with its group where it is loaded"
            )
        return super().__getstate__()


class RingAttention(_SharesGroup, nn.Module):
    """Exact softmax attention over a sequence sharded across the ranks of ``group``.

    A module around :func:`ringflash.ring_attention`, with no parameters.

    Args:
        causal: global causal mask (token ``i`` sees token ``j`` iff ``i >= j``).
        window: ``(left, right)`` sliding window on global positions (flash-attn's
            ``window_size``, -1 unbounded on a side), or None; ``forward(window=...)`` overrides it.
        layout: ``"contiguous"``, ``"striped"``, ``"zigzag"`` or a :class:`~ringflash.layout.Layout`;
            the layout the shards were cut with.
        softmax_scale: defaults to ``1 / sqrt(headdim)``.
        group: the context-parallel group: a ProcessGroup, a 1-D DeviceMesh (e.g. ``mesh["cp"]``),
            or None for the default group; without an initialised process group this is plain
            single-device attention. This rank must be a member of the group (``ValueError``
            otherwise). ``copy.deepcopy`` shares the group with the copy; ``torch.save`` of a module
            holding a ProcessGroup raises ``TypeError`` (save the ``state_dict``).
        backend: the local kernel, ``"triton"``, ``"reference"``, or PyTorch's fused ``"cudnn"`` /
            ``"sdpa_flash"`` (default: triton on CUDA, reference on CPU).

    Shapes:
        q: (batch_size, local_seqlen, nheads, headdim)
        k, v: (batch_size, local_seqlen, nheads_kv, headdim); ``nheads % nheads_kv == 0``
        output: (batch_size, local_seqlen, nheads, headdim)

    Raises:
        ValueError: an unknown ``layout`` name; ``group`` is a DeviceMesh of more than one
            dimension, a group this rank is not a member of, or a group given while
            torch.distributed is not initialised. ``backend``, ``softmax_scale`` and the
            shapes are checked by :meth:`forward`.

    Cross-rank contract: every rank of ``group`` must call ``forward`` identically, with the
    same shapes (batch_size, local_seqlen, heads, headdim), dtype, ``causal``, ``softmax_scale``,
    ``layout`` and ``backend``, and with shards cut by that same layout (rank ``r`` of the group
    holding ``layout.positions(S, rank=r, world_size=P)``). Otherwise ranks exchange buffers of
    different sizes or mask with different rules: an error on some ranks and a hang or a wrong
    result on others. This is not detected by default; with ``RINGFLASH_CHECK_CONSISTENCY=1`` in
    the environment before import, every rank compares its call with the others' before the first
    transfer and raises ``ValueError`` naming what differs (a shard cut by another layout of the
    same length stays undetected).
    """

    def __init__(self, *, causal: bool = True, window: tuple[int, int] | None = None,
                 layout: str | Layout = "striped", softmax_scale: float | None = None,
                 group=None, backend: str | None = None):
        super().__init__()
        self.causal = bool(causal)
        self.window = check_window(window)
        self.layout = get_layout(layout)
        self.softmax_scale = softmax_scale
        resolve_group(group)  # a 2-D mesh, or a group without this rank, fails here
        self.group = group
        self.backend = backend

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, cu_seqlens=None,
                window=_MODULE, sparsity=None) -> torch.Tensor:
        """Attention of this rank's queries over the keys of every rank.

        A collective over ``group``: see the cross-rank contract in the class docstring.

        Args:
            q: (batch_size, local_seqlen, nheads, headdim), this rank's shard under ``layout``.
            k, v: (batch_size, local_seqlen, nheads_kv, headdim), the same tokens;
                ``nheads % nheads_kv == 0``. Same dtype (floating point) and device as q.
            cu_seqlens: document boundaries of the whole packed sequence (see
                :func:`ringflash.ring_attention`); a query sees only keys of its own document.
            window: ``(left, right)`` for this call instead of the module's ``window``.
            sparsity: a :mod:`ringflash.sparse` mode for this call (see :func:`ringflash.ring_attention`).

        Returns:
            (batch_size, local_seqlen, nheads, headdim) in q's dtype: this rank's shard of
            softmax attention over the whole sequence. Differentiable in q, k and v.

        Raises:
            TypeError: q, k or v is not a tensor, or not floating point.
            ValueError: checked locally on every rank before any communication: a tensor that
                is not 4-D; mismatched dtype, device, batch size, head_dim, or k/v shapes; no K/V
                heads or ``nheads`` not a multiple of ``nheads_kv``; q and k/v of different local
                lengths; a local length the layout cannot give over this group (e.g. odd under
                zigzag); a process-group backend that cannot send tensors of this device; an
                unknown ``backend`` or one that cannot take these inputs (e.g. ``"triton"`` on the
                CPU without ``TRITON_INTERPRET=1``); a ``softmax_scale`` that is not finite and
                positive; a bad ``window`` or ``cu_seqlens``, or one the backend cannot serve. With
                ``RINGFLASH_CHECK_CONSISTENCY=1``, also ranks that call differently.
        """
        return ring_attention(
            q, k, v, causal=self.causal, window=self.window if window is _MODULE else window,
            cu_seqlens=cu_seqlens, layout=self.layout, softmax_scale=self.softmax_scale,
            group=self.group, backend=self.backend, sparsity=sparsity,
        )

    def extra_repr(self) -> str:
        scale = "" if self.softmax_scale is None else f", softmax_scale={self.softmax_scale}"
        window = "" if self.window is None else f", window={self.window}"
        return f"causal={self.causal}{window}, layout={self.layout!r}{scale}, backend={self.backend!r}"


# -- rotary embeddings ----------------------------------------------------------------------


def rotary_tables(positions: torch.Tensor, head_dim: int, base: float = 10000.0, *, device=None,
                  dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotary angles ``position * base**(-2i / head_dim)``, each (seqlen, head_dim // 2).

    The angles are computed in float64 on the host: at positions near a million a float32
    angle is off by a sizeable fraction of a radian. The tables are stored in ``dtype``
    (float32, or float64 for float64 models).
    """
    if head_dim % 2:
        raise ValueError(f"rotary embeddings need an even head_dim, got {head_dim}")
    inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = positions.detach().to("cpu", torch.float64)[:, None] * inv_freq[None, :]  # (S, D/2)
    return angles.cos().to(device, dtype), angles.sin().to(device, dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` (batch, seqlen, heads, head_dim) by the angles of ``cos``/``sin`` (seqlen, head_dim // 2).

    The half-split ("rotate_half", GPT-NeoX / Llama) convention: dimension ``i`` pairs with
    dimension ``i + head_dim/2``. Computed in the tables' precision (float32 or better) and
    returned in ``x``'s dtype.
    """
    cd = torch.promote_types(cos.dtype, x.dtype)
    x1, x2 = x.to(cd).chunk(2, dim=-1)
    cos = rearrange(cos, "s d -> 1 s 1 d")
    sin = rearrange(sin, "s d -> 1 s 1 d")
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


class MultiheadAttention(_SharesGroup, nn.Module):
    """Multi-head self-attention over this rank's shard: QKV projection, rotary, ring attention, output.

    One Linear produces q, k and v (``num_kv_heads`` K/V heads: GQA, or MQA with one).
    Rotary embeddings use the global positions of this rank's tokens under ``layout``.

    Args:
        dim: model width; ``dim % num_heads == 0``, head_dim = dim // num_heads.
        num_heads: query heads.
        num_kv_heads: key/value heads (default ``num_heads``); ``num_heads % num_kv_heads == 0``.
        causal: causal mask over the global sequence.
        window: ``(left, right)`` sliding window on global positions, -1 unbounded on a side
            (e.g. ``(4096, 0)`` with ``causal``: each token sees itself and the 4096 before it);
            None: no window.
        layout: the layout the input was sharded with.
        rope: apply rotary embeddings to q and k (half-split convention, see :func:`apply_rotary`).
        rope_base: the rotary base (theta).
        bias: biases in the projections.
        group: the context-parallel group (ProcessGroup, 1-D DeviceMesh or None), as :class:`RingAttention`.
        backend: the local attention kernel, as :class:`RingAttention`.
        sparsity: None (dense), or a sparse mode of :mod:`ringflash.sparse` as a string (the
            training job's ``--sparsity``) or :class:`~ringflash.sparse.SparsitySpec`, computed
            by the module at every forward:

            * ``"hash:BUCKETS"``: hash-sparse attention. q and k (before rotary) are hashed per
              K/V head with fixed random projections (:func:`~ringflash.sparse.hash_buckets`,
              drawn from ``sparsity_seed``; a query uses its K/V head's), and a query sees only
              keys of its bucket;
            * ``"qkdrop:FRACTION"``: QK-dropping. Each (token, head) query and key is dropped
              with probability FRACTION, drawn afresh at every training forward (the same draw
              for every layout and world size: :func:`~ringflash.sparse.keep_random`), and from
              a fixed draw in eval mode;
            * ``"block:PATTERN"``: a block-sparse pattern over the global sequence
              (:func:`~ringflash.sparse.block_pattern`; e.g. ``block:size=128,local=4,global=1``).

            A query that sees no key (dropped, or alone in its bucket) gets zero attention output,
            so the block's residual path passes its input through unchanged. Or the caller's
            own mode, used as it is at every forward: a :class:`~ringflash.sparse.BlockSparse`
            pattern over the global sequence, or :class:`~ringflash.sparse.QKDrop` keep-sets /
            :class:`~ringflash.sparse.HashSparse` bucket ids of this rank's tokens (per batch,
            so more often given to :meth:`forward` per call).
        sparsity_seed: seeds the projections and draws (give each layer its own).

    Shapes:
        x: (batch_size, local_seqlen, dim) -> (batch_size, local_seqlen, dim)

    Raises:
        ValueError: ``dim``, ``num_heads`` or ``num_kv_heads`` not positive; ``dim`` not a multiple
            of ``num_heads``; ``num_heads`` not a multiple of ``num_kv_heads``; with ``rope``, an
            odd head_dim or a ``rope_base`` that is not finite and positive; an unknown
            ``layout`` name; a bad ``group`` (as :class:`RingAttention`).

    Cross-rank contract: every rank of ``group`` must call ``forward`` identically, with the
    same shapes (batch_size, local_seqlen, dim), dtype, ``causal``, ``layout``, ``backend`` and
    weights, and with shards cut by that same layout (rank ``r`` of the group holding
    ``layout.positions(S, rank=r, world_size=P)``). Otherwise ranks exchange buffers of
    different sizes or mask with different rules: an error on some ranks and a hang or a wrong
    result on others. This is not detected by default; with ``RINGFLASH_CHECK_CONSISTENCY=1`` in
    the environment before import, every rank compares its call with the others' before the first
    transfer and raises ``ValueError`` naming what differs (a shard cut by another layout of the
    same length stays undetected).
    """

    _CACHE_SIZE = 8  # rotary tables kept per module: (seqlen, rank, world, device, dtype) combinations

    def __init__(self, dim: int, num_heads: int, *, num_kv_heads: int | None = None, causal: bool = True,
                 window: tuple[int, int] | None = None,
                 layout: str | Layout = "striped", rope: bool = True, rope_base: float = 10000.0, bias: bool = False,
                 group=None, backend: str | None = None, sparsity=None, sparsity_seed: int = 0):
        super().__init__()
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if dim <= 0:
            raise ValueError(f"dim must be positive; got {dim}")
        if num_heads <= 0 or num_kv_heads <= 0:
            raise ValueError(f"num_heads and num_kv_heads must be positive; got {num_heads} and {num_kv_heads}")
        if dim % num_heads != 0:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        if num_heads % num_kv_heads != 0:
            raise ValueError(f"num_heads ({num_heads}) must be divisible by num_kv_heads ({num_kv_heads})")
        head_dim = dim // num_heads
        if rope and head_dim % 2:
            raise ValueError(f"rotary embeddings need an even head_dim; dim // num_heads = {head_dim}")
        if rope and not (math.isfinite(rope_base) and rope_base > 0):
            raise ValueError(f"rope_base must be a finite positive number; got {rope_base}")
        self.dim, self.num_heads, self.num_kv_heads, self.head_dim = dim, num_heads, num_kv_heads, head_dim
        self.rope, self.rope_base = bool(rope), float(rope_base)
        self.layout = get_layout(layout)
        resolve_group(group)  # a 2-D mesh, or a group without this rank, fails here
        self.group = group
        self.qkv = nn.Linear(dim, (num_heads + 2 * num_kv_heads) * head_dim, bias=bias)
        self.attn = RingAttention(causal=causal, window=window, layout=self.layout, group=group, backend=backend)
        self.out = nn.Linear(num_heads * head_dim, dim, bias=bias)
        self._rotary_cache: dict = {}
        self.sparsity = sparsity if isinstance(sparsity, (BlockSparse, QKDrop, HashSparse)) else parse_sparsity(sparsity)
        self.sparsity_seed = int(sparsity_seed)
        self._draws = 0  # QK-dropping: training forwards so far (each draws new keep flags)
        self._patterns: dict = {}
        if getattr(self.sparsity, "kind", None) == "hash":
            # Fixed per layer; a buffer so that it follows the module's device (not a parameter).
            self.register_buffer("hash_projection", hash_projection(
                num_kv_heads, head_dim, self.sparsity.buckets, seed=self.sparsity_seed), persistent=False)

    def _sparse_call(self, q: torch.Tensor, k: torch.Tensor, causal: bool):
        """This forward's sparse mode for q, k (B, S, heads, D) before rotary, or None."""
        sp = self.sparsity
        if sp is None or isinstance(sp, (BlockSparse, QKDrop, HashSparse)):  # none, or the caller's
            return sp
        world_size, rank = _world_and_rank(self.group)
        S = q.shape[1]
        if sp.kind == "block":
            key = S * world_size
            if key not in self._patterns:
                self._patterns = {key: sp.pattern(key, causal)}
            return self._patterns[key]
        if sp.kind == "hash":
            G = self.num_heads // self.num_kv_heads
            proj = self.hash_projection
            return HashSparse(hash_buckets(q, proj.repeat_interleave(G, 0), sp.buckets),
                              hash_buckets(k, proj, sp.buckets), sp.buckets, checked=True)
        self.layout.check_local_seqlen(S, world_size)
        pos = self.layout.local_positions(S, rank=rank, world_size=world_size, device=q.device)
        # A training forward draws anew (draws 1, 2, ...); the forward that activation
        # checkpointing recomputes during the backward (a backward graph task is running) reuses
        # the draw it recomputes. Eval mode always uses draw 0.
        draw = 0
        if self.training:
            if torch._C._current_graph_task_id() == -1:
                self._draws += 1
            draw = self._draws
        seed = (self.sparsity_seed * 1_000_003 + draw) * 2
        return QKDrop(keep_random(pos, q.shape[0], self.num_heads, sp.fraction, seed=seed),
                      keep_random(pos, q.shape[0], self.num_kv_heads, sp.fraction, seed=seed + 1))

    def rotary(self, local_seqlen: int, device, dtype: torch.dtype = torch.float32, *, cu_seqlens=None):
        """(cos, sin) for this rank's tokens, each (local_seqlen, head_dim // 2), from the global positions.

        With ``cu_seqlens`` (packed documents), from each token's position inside its document:
        rotary embeddings restart at every document.

        Checks that ``local_seqlen`` can come from the layout over this group first, so a shard
        whose length does not fit the layout or group size fails here, on every rank, with a
        ``ValueError`` (a shard of the right length cut by another layout is not detected).
        The tables are float64 for a float64 ``dtype``, float32 otherwise. Cached per
        (local_seqlen, rank, world size, device, dtype); under torch.compile they are
        computed in the graph instead (a few elementwise ops), so that models compile without a
        graph break.
        """
        world_size, rank = _world_and_rank(self.group)
        self.layout.check_local_seqlen(local_seqlen, world_size)
        dtype = torch.float64 if dtype == torch.float64 else torch.float32
        if torch.compiler.is_compiling():
            pos = self.layout.local_positions(local_seqlen, rank=rank, world_size=world_size)
            if cu_seqlens is not None:
                pos = doc_positions(cu_seqlens, pos)
            return rotary_tables(pos, self.head_dim, self.rope_base, device=device, dtype=dtype)
        cu = check_cu_seqlens(cu_seqlens, local_seqlen * world_size)
        key = (local_seqlen, rank, world_size, torch.device(device), dtype, cu)
        tables = self._rotary_cache.get(key)
        if tables is None:
            # Tables built under inference_mode could not be saved for a later backward.
            with torch.inference_mode(False), torch.no_grad():
                pos = self.layout.local_positions(local_seqlen, rank=rank, world_size=world_size)
                if cu is not None:
                    pos = doc_positions(cu, pos)
                tables = rotary_tables(pos, self.head_dim, self.rope_base, device=device, dtype=dtype)
            if len(self._rotary_cache) >= self._CACHE_SIZE:
                self._rotary_cache.clear()
            self._rotary_cache[key] = tables
        return tables

    def forward(self, x: torch.Tensor, *, rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
                cu_seqlens=None, window=_MODULE, sparsity=_MODULE) -> torch.Tensor:
        """Self-attention of this rank's tokens over the whole sequence.

        A collective over ``group``: see the cross-rank contract in the class docstring.

        Args:
            x: (batch_size, local_seqlen, dim), this rank's shard under ``layout``.
            rotary: (cos, sin), each (local_seqlen, head_dim // 2), from :meth:`rotary`, to look
                the tables up once for a stack of layers; computed here when None. Ignored
                without ``rope``.
            cu_seqlens: document boundaries of the whole packed sequence,
                ``[0, end_0, ..., seqlen]`` (see :func:`ringflash.ring_attention`): a token attends
                only inside its document, and rotary positions restart at every document.
            window: ``(left, right)`` for this call instead of the module's ``window``.
            sparsity: the caller's sparse mode for this call instead of the module's ``sparsity``
                (see :func:`ringflash.ring_attention`): a :class:`~ringflash.sparse.BlockSparse`
                pattern, :class:`~ringflash.sparse.QKDrop` keep-sets ``q_keep`` (batch_size,
                local_seqlen, num_heads) and ``k_keep`` (..., num_kv_heads), or
                :class:`~ringflash.sparse.HashSparse` bucket ids of the same shapes, for this
                rank's tokens; None: dense.

        Returns:
            (batch_size, local_seqlen, dim) in x's dtype, this rank's shard of the output.

        Raises:
            ValueError: ``x`` is not a 3-D tensor or its last dimension is not ``dim``; with
                ``rope``, a local length the layout cannot give over this group (from
                :meth:`rotary`) or ``rotary`` tables of the wrong shape; and the checks of
                :meth:`RingAttention.forward` (e.g. an unknown ``backend``, keep-sets or bucket
                ids of the wrong shape or dtype).
            TypeError: ``sparsity`` that is not a mode of :mod:`ringflash.sparse` or None.
        """
        if not isinstance(x, torch.Tensor) or x.dim() != 3:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x must be 3-D (batch, local_seqlen, dim); got {shape}")
        if x.shape[-1] != self.dim:
            raise ValueError(f"x must have dim={self.dim} features in its last dimension; got {x.shape[-1]}")
        S = x.shape[1]
        if self.rope:
            cos, sin = self.rotary(S, x.device, x.dtype, cu_seqlens=cu_seqlens) if rotary is None else rotary
            if cos.shape != (S, self.head_dim // 2):
                raise ValueError(
                    f"rotary tables must be (local_seqlen, head_dim // 2) = {(S, self.head_dim // 2)}; "
                    f"got {tuple(cos.shape)}"
                )

        qkv = self.qkv(x)  # (B, S, (H + 2 Hkv) * D)
        q, k, v = qkv.split(
            [self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim, self.num_kv_heads * self.head_dim],
            dim=-1,
        )
        q = rearrange(q, "b s (h d) -> b s h d", d=self.head_dim)
        k = rearrange(k, "b s (h d) -> b s h d", d=self.head_dim)
        v = rearrange(v, "b s (h d) -> b s h d", d=self.head_dim)
        if sparsity is _MODULE:
            sparsity = self._sparse_call(q, k, self.attn.causal)
        elif sparsity is not None and not isinstance(sparsity, (BlockSparse, QKDrop, HashSparse)):
            raise TypeError("forward(sparsity=...) takes a ringflash.sparse BlockSparse, QKDrop or HashSparse "
                            f"(or None); got {type(sparsity).__name__} (a string like 'hash:8' belongs to the "
                            "constructor)")
        if self.rope:
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        o = self.attn(q, k, v, cu_seqlens=cu_seqlens, window=window, sparsity=sparsity)  # (B, S, H, D)
        return self.out(rearrange(o, "b s h d -> b s (h d)"))

    def _sparsity_repr(self) -> str:
        if isinstance(self.sparsity, (QKDrop, HashSparse)):  # the caller's tensors: their shapes
            t = self.sparsity.q_keep if isinstance(self.sparsity, QKDrop) else self.sparsity.q_buckets
            return f"{type(self.sparsity).__name__}(batch, seqlen, heads = {tuple(t.shape)})"
        return str(self.sparsity)

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, "
            f"rope={self.rope}, rope_base={self.rope_base}, layout={self.layout!r}"
            + ("" if self.attn.window is None else f", window={self.attn.window}")
            + ("" if self.sparsity is None else f", sparsity={self._sparsity_repr()}")
        )
