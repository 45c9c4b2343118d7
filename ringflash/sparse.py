"""Sparse attention: block-sparse patterns, QK-dropping and hash-bucket attention.

Three ways to attend to fewer keys, each *exact for the mask it defines* (and, as a model of
dense attention, an approximation of it):

* :class:`BlockSparse` -- a fixed boolean matrix over blocks of ``block_size`` global tokens
  (block-sparse FlashAttention): the query at ``p`` sees the key at ``k`` only if
  ``pattern[p // block_size, k // block_size]``. Helpers build the usual patterns: a local
  window of blocks, global blocks, random blocks (:func:`block_pattern`).
* :class:`QKDrop` -- per (batch, token, head) keep flags for queries and keys (QK-dropping,
  Pagliardini et al., 2023): only kept queries attend, and only to kept keys. A dropped query's
  attention output is **zero** (LSE = -inf), so a residual block ``x + proj(attn)`` passes its
  input through unchanged (plus the projection's bias).
* :class:`HashSparse` -- per (batch, token, head) bucket ids for queries and keys (hash-sparse
  attention of the same paper): a query sees only keys of its own bucket. A query whose bucket
  holds no key it may see gets zero output, as a dropped query does. :func:`hash_buckets`
  computes buckets from random projections.

All three combine with ``causal``, ``window`` and ``cu_seqlens`` (every rule must hold); they
only add rules to :mod:`ringflash.mask`'s, on the same global positions.

How they run. A block pattern is a rule on global positions: the ring skips steps whose blocks
see no pattern block, and the kernels visit, per query tile, a list of the key tiles with any
visible pair (full ones first, without mask arithmetic; partial ones with the element rule),
built once per call on the device. For QK-dropping and hashing the tokens of every rank are
reordered **per head**: sorted by (bucket, document, position), dropped tokens last (on a GPU
a counting sort, :mod:`ringflash.kernels.tokens`). In that order the rule is the
packed-documents rule on a *composite* document ``bucket * documents + doc`` and a composite
position ``composite document * 2**31 + position``, both increasing,
so the kernels' tile ranges skip whole tiles of other buckets, of dropped tokens and of later
positions. The outputs go back to the caller's order. Keys' composite positions and documents
are gathered from every rank once per call (one all-gather of 8 bytes per token and K/V head;
the documents follow from the positions).
"""

from __future__ import annotations

import hashlib
import math
import operator
import re
from dataclasses import dataclass

import torch

from .mask import _is_int

__all__ = [
    "BlockSparse",
    "QKDrop",
    "HashSparse",
    "block_pattern",
    "local_blocks",
    "global_blocks",
    "random_blocks",
    "hash_buckets",
    "hash_projection",
    "keep_random",
    "SparsitySpec",
    "parse_sparsity",
    "check_sparsity",
    "is_token_sparsity",
]

POS_BITS = 31  # composite position = composite document << POS_BITS | position
_DROP_Q = 2**30  # composite documents of dropped queries and keys: after every kept token,
_DROP_K = 2**30 + 1  # and never equal to each other or to a kept token's


# -- block-sparse ---------------------------------------------------------------------------------


def _int_in(x, low: int, high: int | None = None):
    """``x`` as an int where it is an integer (:func:`ringflash.mask._is_int`: Python's, NumPy's,
    a one-element integer tensor; not a bool) in [low, high], else None."""
    if not _is_int(x):
        return None
    v = operator.index(x)
    return v if v >= low and (high is None or v <= high) else None


class BlockSparse:
    """A block-sparse pattern over the global sequence.

    Args:
        pattern: a (num_blocks, num_blocks) boolean matrix (tensor, array or nested list):
            ``pattern[i, j]`` lets the queries of global block ``i`` see the keys of block ``j``
            (other rules, e.g. causal, still apply inside).
        block_size: tokens per block. The pattern covers ``num_blocks * block_size`` tokens,
            which must be the global sequence length of the calls it is used in.

    Every row should keep at least one block (a query that sees nothing gets zero output).
    Patterns are hashable (by their contents): the ring and the kernels cache what they derive.
    """

    def __init__(self, pattern, block_size: int):
        b = _int_in(block_size, 1)
        if b is None:
            raise ValueError(f"block_size must be a positive int; got {block_size!r}")
        block_size = b
        try:
            p = torch.as_tensor(pattern)
        except (TypeError, ValueError, RuntimeError) as e:
            raise TypeError(f"pattern must be a 2-D boolean matrix; got {type(pattern).__name__}") from e
        if p.dtype != torch.bool:
            if p.is_floating_point() or p.is_complex():
                raise TypeError(f"pattern must be boolean (or 0/1 integers); got {p.dtype}")
            if ((p != 0) & (p != 1)).any():
                raise ValueError("pattern must hold only 0/1 (or booleans)")
            p = p != 0
        if p.dim() != 2 or p.shape[0] != p.shape[1] or p.shape[0] == 0:
            raise ValueError(f"pattern must be a square (num_blocks, num_blocks) matrix; got shape {tuple(p.shape)}")
        self.pattern = p.detach().to("cpu", copy=True).contiguous()  # a copy: the digest must stay true
        self.block_size = block_size
        self._digest = hashlib.sha1(self.pattern.numpy().tobytes() + str(p.shape).encode()).hexdigest()
        self._device: dict = {}

    @property
    def num_blocks(self) -> int:
        return self.pattern.shape[0]

    @property
    def seqlen(self) -> int:
        """The global sequence length this pattern tiles."""
        return self.num_blocks * self.block_size

    def check(self, seqlen: int) -> None:
        """``ValueError`` unless the pattern tiles a global sequence of ``seqlen`` tokens."""
        if seqlen != self.seqlen:
            raise ValueError(
                f"the block pattern covers {self.num_blocks} blocks x {self.block_size} tokens = {self.seqlen} "
                f"tokens, but the global sequence has {seqlen}; build it for that length "
                f"(ringflash.sparse.block_pattern(seqlen={seqlen}, ...))"
            )

    def on(self, device) -> torch.Tensor:
        """The pattern as a uint8 tensor on ``device`` (made once per device)."""
        device = torch.device(device)
        key = str(device)
        if key not in self._device:
            with torch.inference_mode(False):
                self._device[key] = self.pattern.to(torch.uint8).to(device)
        return self._device[key]

    def density(self, causal: bool = True) -> float:
        """Visible token pairs over the pairs of the dense mask (causal or full)."""
        S, bs = self.seqlen, self.block_size
        if not causal:
            return float(self.pattern.sum()) / self.num_blocks**2
        # Causal pairs inside each block pair: diagonal blocks hold bs (bs + 1) / 2 of bs**2.
        off = torch.tril(self.pattern, -1).sum().item() * bs * bs
        diag = torch.diagonal(self.pattern).sum().item() * bs * (bs + 1) // 2
        return (off + diag) / (S * (S + 1) // 2)

    def __or__(self, other: "BlockSparse") -> "BlockSparse":
        self._same_grid(other)
        return BlockSparse(self.pattern | other.pattern, self.block_size)

    def __and__(self, other: "BlockSparse") -> "BlockSparse":
        self._same_grid(other)
        return BlockSparse(self.pattern & other.pattern, self.block_size)

    def _same_grid(self, other) -> None:
        if not isinstance(other, BlockSparse):
            raise TypeError(f"can only combine a BlockSparse with another; got {type(other).__name__}")
        if (other.block_size, other.num_blocks) != (self.block_size, self.num_blocks):
            raise ValueError(
                f"patterns of different grids: {self.num_blocks} x {self.block_size} and "
                f"{other.num_blocks} x {other.block_size}"
            )

    def __eq__(self, other) -> bool:
        return isinstance(other, BlockSparse) and (self.block_size, self._digest) == (other.block_size, other._digest)

    def __hash__(self) -> int:
        return hash((self.block_size, self._digest))

    def __getstate__(self):
        return {"pattern": self.pattern, "block_size": self.block_size}

    def __setstate__(self, state):
        self.__init__(state["pattern"], state["block_size"])

    def __repr__(self) -> str:
        return (f"BlockSparse({self.num_blocks} x {self.num_blocks} blocks of {self.block_size}, "
                f"{self.density(False):.1%} of blocks kept)")


def _grid(seqlen: int, block_size: int) -> int:
    values = []
    for name, x in (("seqlen", seqlen), ("block_size", block_size)):
        if (v := _int_in(x, 1)) is None:
            raise ValueError(f"{name} must be a positive int; got {x!r}")
        values.append(v)
    seqlen, block_size = values
    if seqlen % block_size:
        raise ValueError(
            f"a block pattern must tile the sequence: seqlen {seqlen} is not a multiple of block_size {block_size}"
        )
    return seqlen // block_size


def local_blocks(seqlen: int, block_size: int, width: int) -> BlockSparse:
    """Each block sees the blocks within ``width - 1`` of it on either side (``width`` = 1: its
    own block only); with ``causal`` only the earlier side remains."""
    n = _grid(seqlen, block_size)
    if (w := _int_in(width, 1)) is None:
        raise ValueError(f"the local width must be a positive number of blocks; got {width!r}")
    width = w
    i = torch.arange(n)
    return BlockSparse((i[:, None] - i[None, :]).abs() < width, block_size)


def global_blocks(seqlen: int, block_size: int, count: int) -> BlockSparse:
    """The first ``count`` blocks are global: they see every block and every block sees them."""
    n = _grid(seqlen, block_size)
    if (c := _int_in(count, 0, n)) is None:
        raise ValueError(f"the number of global blocks must be an int in [0, {n}]; got {count!r}")
    count = c
    p = torch.zeros(n, n, dtype=torch.bool)
    p[:count, :] = True
    p[:, :count] = True
    return BlockSparse(p, block_size)


def random_blocks(seqlen: int, block_size: int, count: int, *, seed: int = 0, causal: bool = True) -> BlockSparse:
    """Each block row sees ``count`` blocks drawn at random (without replacement; with
    ``causal`` from the blocks at or before it, so none is wasted), reproducibly from ``seed``."""
    n = _grid(seqlen, block_size)
    if (c := _int_in(count, 0)) is None:
        raise ValueError(f"the number of random blocks must be a non-negative int; got {count!r}")
    count = c
    g = torch.Generator().manual_seed(int(seed))
    scores = torch.rand(n, n, generator=g)
    if causal:
        scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), -1.0)
    top = scores.topk(min(count, n), dim=1).indices
    p = torch.zeros(n, n, dtype=torch.bool)
    p.scatter_(1, top, True)
    if causal:
        p &= torch.ones(n, n, dtype=torch.bool).tril()
    return BlockSparse(p, block_size)


def block_pattern(seqlen: int, block_size: int = 128, *, local: int = 1, global_: int = 0, random: int = 0,
                  seed: int = 0, causal: bool = True) -> BlockSparse:
    """The union of a local window of ``local`` blocks, ``global_`` global blocks and ``random``
    random blocks per row (the patterns of block-sparse FlashAttention and BigBird)."""
    p = local_blocks(seqlen, block_size, local) if local else BlockSparse(
        torch.zeros(_grid(seqlen, block_size), _grid(seqlen, block_size), dtype=torch.bool), block_size)
    if global_:
        p = p | global_blocks(seqlen, block_size, global_)
    if random:
        p = p | random_blocks(seqlen, block_size, random, seed=seed, causal=causal)
    return p


# -- QK-dropping and hash buckets -------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class QKDrop:
    """Per-token, per-head keep flags: ``q_keep`` (B, Sq, H) and ``k_keep`` (B, Sk, Hkv), boolean,
    for the tokens the call is given (a rank's local shard in a ring). Only kept queries attend,
    only to kept keys; a dropped query gets O = 0 (LSE = -inf)."""

    q_keep: torch.Tensor
    k_keep: torch.Tensor


@dataclass(frozen=True, eq=False)
class HashSparse:
    """Per-token, per-head bucket ids: ``q_buckets`` (B, Sq, H) and ``k_buckets`` (B, Sk, Hkv),
    integer tensors with values in ``[0, num_buckets)``. A query sees only keys of its bucket.

    ``checked=False`` (the default) validates the ids' range once per call (one device
    synchronisation on CUDA); ids from :func:`hash_buckets` are in range by construction."""

    q_buckets: torch.Tensor
    k_buckets: torch.Tensor
    num_buckets: int
    checked: bool = False

    def __post_init__(self):
        if _is_int(self.num_buckets):  # a NumPy or tensor integer as a Python int
            object.__setattr__(self, "num_buckets", operator.index(self.num_buckets))


def _check_attr(name: str, t, shape: tuple, device, kind: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {shape}; got {type(t).__name__}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(
            f"{name} must have shape (batch, seqlen, heads) = {tuple(shape)}, one entry per token and "
            f"{'query' if name.startswith('q') else 'key/value'} head of this call; got {tuple(t.shape)}"
        )
    if kind == "bool" and t.dtype != torch.bool:
        raise ValueError(f"{name} must be a boolean tensor (True = kept); got {t.dtype}")
    if kind == "int" and (t.dtype == torch.bool or t.is_floating_point() or t.is_complex()):
        raise ValueError(f"{name} must be an integer tensor of bucket ids; got {t.dtype}")
    if t.device != torch.device(device):
        raise ValueError(f"{name} must be on {device} (with q, k, v); got {t.device}")


def bucket_range_problem(sparsity: "HashSparse") -> str:
    """What is wrong with the range of the bucket ids ("" if nothing): one device sync for both
    tensors' extremes."""
    n = sparsity.num_buckets
    named = [(name, t) for name, t in (("q_buckets", sparsity.q_buckets), ("k_buckets", sparsity.k_buckets))
             if t.numel()]
    if not named:
        return ""
    extremes = torch.stack([e.to(torch.int64) for _, t in named for e in (t.min(), t.max())]).tolist()
    for i, (name, _) in enumerate(named):
        lo, hi = extremes[2 * i], extremes[2 * i + 1]
        if lo < 0 or hi >= n:
            return f"{name} must lie in [0, num_buckets) = [0, {n}); got values in [{lo}, {hi}]"
    return ""


def check_sparsity(sparsity, q: torch.Tensor, k: torch.Tensor, seqlen: int | None, *,
                   check_range: bool = True) -> None:
    """``ValueError`` (``TypeError`` for what is not a tensor or mode) naming what to change unless
    ``sparsity`` fits this call (``seqlen``: the global sequence length a block pattern must tile;
    None: not checked). ``check_range=False`` leaves the bucket ids' range to the caller (the
    ring checks it across ranks)."""
    if sparsity is None:
        return
    B, Sq, H = q.shape[:3]
    Sk, Hkv = k.shape[1], k.shape[2]
    if isinstance(sparsity, BlockSparse):
        if seqlen is not None:
            sparsity.check(seqlen)
    elif isinstance(sparsity, QKDrop):
        _check_attr("q_keep", sparsity.q_keep, (B, Sq, H), q.device, "bool")
        _check_attr("k_keep", sparsity.k_keep, (B, Sk, Hkv), q.device, "bool")
    elif isinstance(sparsity, HashSparse):
        n = sparsity.num_buckets
        if _int_in(n, 1) is None:
            raise ValueError(f"num_buckets must be an int >= 1; got {n!r}")
        _check_attr("q_buckets", sparsity.q_buckets, (B, Sq, H), q.device, "int")
        _check_attr("k_buckets", sparsity.k_buckets, (B, Sk, Hkv), q.device, "int")
        if not sparsity.checked and check_range:
            problem = bucket_range_problem(sparsity)
            if problem:
                raise ValueError(problem)
    else:
        raise TypeError(
            f"sparsity must be a ringflash.sparse.BlockSparse, QKDrop or HashSparse (or None); got "
            f"{type(sparsity).__name__}"
        )


def is_token_sparsity(sparsity) -> bool:
    """QK-dropping or hash buckets: the modes that reorder tokens per head."""
    return isinstance(sparsity, (QKDrop, HashSparse))


def hash_projection(heads: int, head_dim: int, num_buckets: int, *, seed: int = 0) -> torch.Tensor:
    """Random projections for :func:`hash_buckets`: (heads, head_dim, ceil(num_buckets / 2)),
    standard normal, reproducible from ``seed`` (fixed per layer)."""
    if (nb := _int_in(num_buckets, 1)) is None:
        raise ValueError(f"the number of buckets must be an int >= 1; got {num_buckets!r}")
    num_buckets = nb
    g = torch.Generator().manual_seed(int(seed))
    return torch.randn(heads, head_dim, (num_buckets + 1) // 2, generator=g)


def hash_buckets(x: torch.Tensor, projection: torch.Tensor, num_buckets: int) -> torch.Tensor:
    """Angular LSH buckets of ``x`` (B, S, heads, D) under per-head random ``projection``
    (heads, D, ceil(num_buckets / 2)): ``argmax([x R, -x R])``, as in Reformer. Returns int32
    (B, S, heads) in ``[0, num_buckets)``. Hash queries with the projection of their K/V head
    (``projection.repeat_interleave(group, 0)``), so that a query and the keys near its
    direction share a bucket."""
    if num_buckets == 1:
        return torch.zeros(x.shape[:3], dtype=torch.int32, device=x.device)
    with torch.no_grad():
        proj = torch.einsum("bshd,hdn->bshn", x.float(), projection.to(x.device, torch.float32))
        both = torch.cat([proj, -proj], dim=-1)[..., :num_buckets]
        return both.argmax(-1).to(torch.int32)


def _mix(x: torch.Tensor) -> torch.Tensor:
    """A 64-bit integer hash (splitmix64's finaliser) in int64 arithmetic, wrapping."""
    x = x ^ (x >> 30) & 0x3FFFFFFFF
    x = x * -4658895280553007687  # 0xBF58476D1CE4E5B9 as a signed int64
    x = x ^ (x >> 27) & 0x1FFFFFFFFF
    x = x * -7723592293110705685  # 0x94D049BB133111EB
    return x ^ (x >> 31) & 0x1FFFFFFFF


@torch.compiler.disable  # wrapping int64 arithmetic: Inductor's code gave other bits than eager's
def keep_random(positions: torch.Tensor, batch: int, heads: int, fraction: float, *, seed: int = 0) -> torch.Tensor:
    """Keep flags (batch, len(positions), heads) dropping about ``fraction`` of the tokens per
    head at random. A function of (seed, batch row, global position, head) only, so every
    layout and world size draws the same flags for the same token."""
    if not (isinstance(fraction, (int, float)) and 0.0 <= fraction < 1.0):
        raise ValueError(f"the drop fraction must be in [0, 1); got {fraction!r}")
    pos = positions.to(torch.int64)
    b = torch.arange(batch, device=pos.device, dtype=torch.int64)
    h = torch.arange(heads, device=pos.device, dtype=torch.int64)
    # Chained mixing keeps every constant within int64 (a compiled graph refuses larger ones).
    x = _mix(b + (int(seed) % (1 << 40)) * 4096)[:, None, None]
    x = _mix(x + h[None, None, :] + 1)
    x = _mix(x + pos[None, :, None])
    u = (x & ((1 << 24) - 1)).to(torch.float32) / float(1 << 24)
    return u >= fraction


# -- composite attributes: what the kernels see for QK-dropping and hashing -------------------------


def _check_composite_count(num_docs: int, num_buckets: int) -> None:
    """Composite documents of hash buckets must stay below the drop ids."""
    if num_docs * num_buckets >= _DROP_Q:
        raise ValueError(
            f"{num_docs} documents x {num_buckets} buckets is too many composite documents (at most {_DROP_Q - 1})"
        )


def composite_positions(sparsity, q_pos, k_pos, q_doc, k_doc, num_docs: int):
    """Per-head composite positions ``(q_cpos (B, H, Sq), k_cpos (B, Hkv, Sk))``, int64, in the
    caller's token order: composite document ``<< POS_BITS | position``.

    ``q_pos``/``k_pos``: global positions (Sq,)/(Sk,); ``q_doc``/``k_doc``: document ids or None.
    """
    if isinstance(sparsity, HashSparse):
        _check_composite_count(num_docs, sparsity.num_buckets)
        # (B, heads, S), laid out so: the kernels read each head's attributes as one row
        # (strided ones would be copied at every kernel call).
        # Bucket-major (bucket * num_docs + document): sorted by it, a head's tokens are sorted by
        # bucket and, inside one, keep the call's order (ringflash.kernels.tokens sorts so).
        q_c, k_c = (t.transpose(1, 2).to(torch.int64, memory_format=torch.contiguous_format) * num_docs
                    for t in (sparsity.q_buckets, sparsity.k_buckets))
        if q_doc is not None:
            q_c = q_c + q_doc.to(torch.int64)
            k_c = k_c + k_doc.to(torch.int64)
    else:
        qd = 0 if q_doc is None else q_doc.to(torch.int64)[None, :, None]
        kd = 0 if k_doc is None else k_doc.to(torch.int64)[None, :, None]
        q_c = torch.where(sparsity.q_keep, qd, _DROP_Q).transpose(1, 2).contiguous()
        k_c = torch.where(sparsity.k_keep, kd, _DROP_K).transpose(1, 2).contiguous()
    q_cpos = (q_c << POS_BITS) | q_pos.to(torch.int64)  # (B, H, S)
    k_cpos = (k_c << POS_BITS) | k_pos.to(torch.int64)
    return q_cpos, k_cpos


def composite(sparsity, q_pos, k_pos, q_doc, k_doc, num_docs: int):
    """Per-head composite (position, document) of queries and keys, in the caller's token order:
    ``(q_cpos (B, H, Sq) int64, q_cdoc (B, H, Sq) int32, k_cpos (B, Hkv, Sk), k_cdoc)``
    (see :func:`composite_positions`)."""
    q_cpos, k_cpos = composite_positions(sparsity, q_pos, k_pos, q_doc, k_doc, num_docs)
    return q_cpos, (q_cpos >> POS_BITS).to(torch.int32), k_cpos, (k_cpos >> POS_BITS).to(torch.int32)


def sort_order(cpos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(order, inverse) along the last dim that sort ``cpos`` increasingly."""
    order = torch.argsort(cpos, dim=-1)
    return order, _inverse(order)


def _inverse(order: torch.Tensor) -> torch.Tensor:
    inverse = torch.empty_like(order)
    inverse.scatter_(-1, order, torch.arange(order.shape[-1], device=order.device).expand_as(order))
    return inverse


def gather_tokens(x: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """``x`` (B, S, H, D) reordered per head by ``order`` (B, H, S): differentiable."""
    idx = order.transpose(1, 2)[..., None].expand(-1, -1, -1, x.shape[-1])
    return torch.gather(x, 1, idx)


def _sorts_on_device(sparsity, q: torch.Tensor) -> bool:
    """Whether :func:`ringflash.kernels.tokens.sort_tokens` sorts this call (a GPU, at most
    ``MAX_BUCKETS`` buckets), rather than two PyTorch sorts. On the CPU PyTorch sorts (Triton's
    interpreter would be slower; the tests check the kernels against that path directly)."""
    from .kernels.tokens import MAX_BUCKETS

    if not _moves_on_device(q):
        return False
    return not isinstance(sparsity, HashSparse) or sparsity.num_buckets <= MAX_BUCKETS


def _sort_on_device(sparsity, q_pos, k_pos, q_doc, k_doc, num_docs: int):
    """:func:`run_sorted`'s order and attributes from the counting sort (two launches)."""
    from .kernels.tokens import sort_tokens

    if isinstance(sparsity, HashSparse):
        _check_composite_count(num_docs, sparsity.num_buckets)
        return sort_tokens(sparsity.q_buckets, sparsity.k_buckets, sparsity.num_buckets, q_pos, k_pos,
                           q_doc, k_doc, num_docs)
    # QK-dropping: kept tokens first, then the dropped ones.
    return sort_tokens(sparsity.q_keep, sparsity.k_keep, 2, q_pos, k_pos, q_doc, k_doc, num_docs,
                       drop=(_DROP_Q, _DROP_K))


class TokenAttrs:
    """Per-head attributes of a QK-dropping or hashing call, in sorted order: this rank's queries
    (``q_pos``, ``q_doc``: (B, H, S)) and every rank's keys (``k_pos[r]``, ``k_doc[r]``:
    (B, Hkv, S)), which the ring hands to the engine for each step's key block."""

    def __init__(self, q_pos, q_doc, k_pos: list, k_doc: list):
        self.q_pos, self.q_doc, self.k_pos, self.k_doc = q_pos, q_doc, k_pos, k_doc

    def kwargs(self, src: int) -> dict:
        return dict(q_pos=self.q_pos, k_pos=self.k_pos[src], q_doc=self.q_doc, k_doc=self.k_doc[src])


def run_sorted(sparsity, q, k, v, q_pos, k_pos, q_doc, k_doc, num_docs: int, call, gather_keys=None):
    """Run ``call(q, k, v, attrs)`` -> (out, lse) on tokens reordered per head for a QK-dropping or
    hashing ``sparsity``, and return (out, lse) in the caller's order (differentiable in q, k, v).

    ``gather_keys(t)``: every rank's copy of the keys' composite positions, stacked (the ring's
    all-gather); None for one device."""
    if _sorts_on_device(sparsity, q):
        q_order, q_inverse, q_cpos, q_cdoc, k_order, k_inverse, k_cpos, k_cdoc = _sort_on_device(
            sparsity, q_pos, k_pos, q_doc, k_doc, num_docs)
    else:
        q_cpos, k_cpos = composite_positions(sparsity, q_pos, k_pos, q_doc, k_doc, num_docs)
        # Composite positions are distinct in a row: the sorted values are the kernels' attributes.
        q_cpos, q_order = torch.sort(q_cpos, dim=-1)
        k_cpos, k_order = torch.sort(k_cpos, dim=-1)
        q_inverse, k_inverse = _inverse(q_order), _inverse(k_order)
        q_cdoc, k_cdoc = (q_cpos >> POS_BITS).to(torch.int32), (k_cpos >> POS_BITS).to(torch.int32)
    if gather_keys is None:
        k_pos_all, k_doc_all = [k_cpos], [k_cdoc]
    else:
        every = gather_keys(k_cpos)  # (ranks, B, Hkv, Sk): one collective; documents from the positions
        k_pos_all, k_doc_all = list(every.unbind(0)), list((every >> POS_BITS).to(torch.int32).unbind(0))
    attrs = TokenAttrs(q_cpos, q_cdoc, k_pos_all, k_doc_all)
    if not _moves_on_device(q):
        out, lse = call(gather_tokens(q, q_order), gather_tokens(k, k_order), gather_tokens(v, k_order), attrs)
        return gather_tokens(out, q_inverse), torch.gather(lse, -1, q_inverse)
    if k.shape == v.shape and q.shape[-1] == k.shape[-1] and q.dtype == k.dtype == v.dtype:  # one launch
        qs, ks, vs = _Permute.apply((q_order, q_inverse, 1), (k_order, k_inverse, 2), None, q, k, v)
    else:
        (qs,) = _Permute.apply((q_order, q_inverse, 1), None, None, q)
        (ks,), (vs,) = (_Permute.apply((k_order, k_inverse, 1), None, None, t) for t in (k, v))
    out, lse = call(qs, ks, vs, attrs)
    return _Permute.apply((q_inverse, q_order, 1), None, lse, out)


def _moves_on_device(q: torch.Tensor) -> bool:
    """Whether :func:`ringflash.kernels.tokens.permute_tokens` moves the tokens (on a GPU)."""
    return q.device.type == "cuda"


class _Permute(torch.autograd.Function):
    """``kernels.tokens.permute_tokens`` in one launch: group ``a`` = ``(order, inverse, n)`` moves
    the first ``n`` (1 or 2) tensors of ``xs`` by ``order``, group ``b`` (or None) the rest; the
    gradient moves back by the inverses, in one launch too. With ``lse`` (no gradient), also the
    LSE by group a's order, as the last output."""

    @staticmethod
    def forward(ctx, a, b, lse, *xs):
        from .kernels.tokens import permute_tokens

        groups = [(a, xs[: a[2]])] + ([(b, xs[a[2]:])] if b is not None else [])
        ctx.inverses = [(inverse, len(part)) for (_, inverse, _), part in groups]
        out = permute_tokens([(part, order) for (order, _, _), part in groups], lse)
        if lse is not None:
            ctx.mark_non_differentiable(out[-1])
        # No zero-filled gradient for the LSE (or an unused output): one allocation and launch
        # fewer per backward.
        ctx.set_materialize_grads(False)
        return out

    @staticmethod
    def backward(ctx, *grads):
        from .kernels.tokens import permute_tokens

        needs = ctx.needs_input_grad[3:]
        groups, at, slots = [], 0, []
        for inverse, n in ctx.inverses:
            take = [i for i in range(at, at + n) if needs[i] and grads[i] is not None]
            if take:
                groups.append(([grads[i] for i in take], inverse))
                slots += take
            at += n
        result = [None] * len(needs)
        if groups:
            for i, g in zip(slots, permute_tokens(groups)):
                result[i] = g
        return (None, None, None, *result)


# -- the training job's --sparsity -------------------------------------------------------------------


@dataclass(frozen=True)
class SparsitySpec:
    """A parsed ``--sparsity`` setting: ``kind`` is ``"hash"`` (``buckets``), ``"qkdrop"``
    (``fraction``) or ``"block"`` (``block_size``, ``local``, ``global_``, ``random``, ``seed``)."""

    kind: str
    buckets: int = 0
    fraction: float = 0.0
    block_size: int = 128
    local: int = 1
    global_: int = 0
    random: int = 0
    seed: int = 0

    def __str__(self) -> str:
        if self.kind == "hash":
            return f"hash:{self.buckets}"
        if self.kind == "qkdrop":
            return f"qkdrop:{self.fraction:g}"
        return (f"block:size={self.block_size},local={self.local},global={self.global_},"
                f"random={self.random},seed={self.seed}")

    def pattern(self, seqlen: int, causal: bool = True) -> BlockSparse:
        """The block pattern of a ``block`` spec for a global sequence of ``seqlen`` tokens."""
        return block_pattern(seqlen, self.block_size, local=self.local, global_=self.global_,
                             random=self.random, seed=self.seed, causal=causal)


_BLOCK_KEYS = {"size": "block_size", "local": "local", "global": "global_", "random": "random", "seed": "seed"}


def parse_sparsity(spec) -> SparsitySpec | None:
    """Parse ``hash:BUCKETS``, ``qkdrop:FRACTION`` or ``block:PATTERN`` (``PATTERN`` a comma list
    of ``size=``, ``local=``, ``global=``, ``random=``, ``seed=``, e.g.
    ``block:size=128,local=4,global=1,random=2``). None, ``""`` and ``"none"`` give None."""
    if spec is None or isinstance(spec, SparsitySpec):
        return spec
    if not isinstance(spec, str):
        raise TypeError(f"sparsity must be a string like 'hash:8'; got {type(spec).__name__}")
    s = spec.strip()
    if s in ("", "none", "dense"):
        return None
    kind, _, arg = s.partition(":")
    if kind == "hash":
        if not re.fullmatch(r"\d+", arg) or int(arg) < 1:
            raise ValueError(f"hash:BUCKETS needs a bucket count >= 1; got {spec!r}")
        return SparsitySpec("hash", buckets=int(arg))
    if kind == "qkdrop":
        try:
            frac = float(arg)
        except ValueError:
            frac = math.nan
        if not 0.0 <= frac < 1.0:
            raise ValueError(f"qkdrop:FRACTION needs a drop fraction in [0, 1); got {spec!r}")
        return SparsitySpec("qkdrop", fraction=frac)
    if kind == "block":
        kw = {}
        for part in filter(None, arg.split(",")):
            name, eq, value = part.partition("=")
            if not eq or name.strip() not in _BLOCK_KEYS or not re.fullmatch(r"\d+", value.strip()):
                raise ValueError(
                    f"block:PATTERN is a comma list of size=, local=, global=, random=, seed= with int values "
                    f"(e.g. block:size=128,local=4,global=1,random=2); got {spec!r}"
                )
            kw[_BLOCK_KEYS[name.strip()]] = int(value)
        out = SparsitySpec("block", **kw)
        if out.block_size < 1 or out.local + out.global_ + out.random == 0:
            raise ValueError(f"a block pattern needs size >= 1 and some local, global or random blocks; got {spec!r}")
        return out
    raise ValueError(f"unknown sparsity {spec!r}; use hash:BUCKETS, qkdrop:FRACTION or block:PATTERN")
