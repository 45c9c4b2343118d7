"""Attention in plain PyTorch, with the same contract as the Triton kernels.

This module is the CPU backend of every op and the oracle of the tests. It follows the
kernel contract exactly:

* tensors are ``(batch, seqlen, heads, head_dim)``; K/V may have fewer heads than Q
  (GQA/MQA: query head ``h`` reads K/V head ``h // (heads_q // heads_kv)``), and the
  repeat is never materialised;
* masks come from global token positions (and document ids): with ``causal=True`` query ``i``
  sees key ``j`` iff ``q_pos[i] >= k_pos[j]``; ``window=(left, right)`` and documents
  (``q_doc``/``k_doc``) add the rules of :mod:`ringflash.mask`;
* the log-sum-exp is float32 (float64 for float64 inputs), natural log, shaped
  ``(batch, heads, seqlen_q)``; a row that sees no key has O = 0 and LSE = -inf, never NaN;
* partial results live in float32 accumulators and are folded with :func:`merge_`; nothing
  is rounded to the input dtype until the caller does it once, at the end;
* the backward of one block takes the *global* O, LSE and ``delta = rowsum(dO * O)`` and
  adds its dQ, dK, dV into float32 accumulators.

Work is blockwise over keys, so memory stays ``O(batch * heads * seqlen_q * block)``.
"""

from __future__ import annotations

import math

import torch
from einops import rearrange

from . import mask as _mask
from . import sparse as _sparse

__all__ = [
    "attention",
    "forward",
    "backward",
    "backward_delta",
    "merge_",
    "default_positions",
    "accum_dtype",
]

BLOCK = 512  # keys per block: bounds the (seqlen_q x BLOCK) score matrix


def accum_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64 (the oracle); every other dtype accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _both_or_neither(q_pos, k_pos) -> None:
    if (q_pos is None) != (k_pos is None):
        raise ValueError("pass both q_pos and k_pos, or neither (the default alignment)")


def default_positions(seqlen_q: int, seqlen_k: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions of a plain (non-sharded) call: keys ``0..Sk-1``, queries aligned to the end.

    With ``seqlen_q == seqlen_k`` this is the usual causal mask; with fewer queries than keys
    the queries are the *last* ones (flash-attn's bottom-right convention, as with a KV cache).
    """
    k_pos = torch.arange(seqlen_k, device=device)
    q_pos = torch.arange(seqlen_q, device=device) + (seqlen_k - seqlen_q)
    return q_pos, k_pos


def _split_heads(x: torch.Tensor, heads_kv: int) -> torch.Tensor:
    # (B, S, H, D) -> (B, Hkv, G, S, D)
    return rearrange(x, "b s (hk g) d -> b hk g s d", hk=heads_kv)


def _resolve(Sq, Sk, device, q_pos, k_pos, causal, window, q_doc, k_doc):
    """Positions (default: bottom-right aligned) where a rule needs them; doc ids both or neither."""
    if (q_doc is None) != (k_doc is None):
        raise ValueError("pass both q_doc and k_doc, or neither")
    if (causal or window is not None) and (q_pos is None or k_pos is None):
        _both_or_neither(q_pos, k_pos)
        q_pos, k_pos = default_positions(Sq, Sk, device)
    return q_pos, k_pos


def _visible(q_pos, k_pos, causal, window=None, q_doc=None, k_doc=None, blocks=None):
    """(Sq, Sk_block) visibility (or one that broadcasts against (B, Hkv, G, Sq, Sk_block) for
    per-head attributes), or None when every pair is visible."""
    return _mask.visible(q_pos, k_pos, causal=causal, window=window, q_doc=q_doc, k_doc=k_doc, blocks=blocks)


def _per_head(q_attr, k_attr, heads_kv: int):
    """Per-head attributes, q (B, H, Sq) and k (B, Hkv, Sk), shaped to broadcast against scores
    (B, Hkv, G, Sq, Sk): (B, Hkv, G, Sq) and (B, Hkv, 1, Sk). 1-D attributes pass unchanged."""
    if q_attr is None or q_attr.dim() == 1:
        return q_attr, k_attr
    return (rearrange(q_attr, "b (hk g) s -> b hk g s", hk=heads_kv),
            rearrange(k_attr, "b hk s -> b hk 1 s"))


def _key_slice(attr, start, stop):
    return None if attr is None else attr[..., start:stop]


def merge_(out: torch.Tensor, lse: torch.Tensor, block_out: torch.Tensor, block_lse: torch.Tensor) -> None:
    """Fold a partial result into a running one, in place, in the accumulators' precision.

    ``out``/``block_out``: ``(B, S, H, D)``; ``lse``/``block_lse``: ``(B, H, S)``. Rows where both
    sides are empty (LSE = -inf) stay O = 0, LSE = -inf.
    """
    new_lse = torch.logaddexp(lse, block_lse)
    # exp(-inf - -inf) is NaN: an empty row keeps weight 0 on both sides.
    safe = torch.where(torch.isinf(new_lse), torch.zeros_like(new_lse), new_lse)
    w_old = torch.exp(lse - safe).nan_to_num_(0.0)
    w_new = torch.exp(block_lse - safe).nan_to_num_(0.0)
    w_old = rearrange(w_old, "b h s -> b s h 1")
    w_new = rearrange(w_new, "b h s -> b s h 1")
    out.mul_(w_old).add_(block_out.to(out.dtype) * w_new)
    lse.copy_(new_lse)


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
    block: int = BLOCK,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of ``q`` over ``k, v``, as float32 (or float64) partials.

    q: (B, Sq, H, D); k, v: (B, Sk, Hkv, D); q_pos: (Sq,), k_pos: (Sk,) global positions;
    ``window``: (left, right), -1 unbounded; q_doc: (Sq,), k_doc: (Sk,) document ids;
    ``blocks``: a :class:`ringflash.sparse.BlockSparse` over the positions. Per-head attributes:
    positions and document ids may be (B, H, Sq) and (B, Hkv, Sk) instead (:mod:`ringflash.sparse`).
    Returns ``out`` (B, Sq, H, D) and ``lse`` (B, H, Sq) in the accumulation dtype. If ``out``
    and ``lse`` are given, this block is folded into them in place and they are returned.
    """
    B, Sq, H, D = q.shape
    Sk, Hkv = k.shape[1], k.shape[2]
    cd = accum_dtype(q.dtype)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(D)
    q_pos, k_pos = _resolve(Sq, Sk, q.device, q_pos, k_pos, causal or blocks is not None, window, q_doc, k_doc)
    q_pos, k_pos = _per_head(q_pos, k_pos, Hkv)
    q_doc, k_doc = _per_head(q_doc, k_doc, Hkv)

    qh = _split_heads(q.to(cd), Hkv)  # (B, Hkv, G, Sq, D)
    G = qh.shape[2]
    m = torch.full((B, Hkv, G, Sq), -math.inf, dtype=cd, device=q.device)
    denom = torch.zeros((B, Hkv, G, Sq), dtype=cd, device=q.device)
    acc = torch.zeros((B, Hkv, G, Sq, D), dtype=cd, device=q.device)
    for start in range(0, Sk, block):
        stop = min(start + block, Sk)
        kb = rearrange(k[:, start:stop].to(cd), "b s hk d -> b hk s d")
        vb = rearrange(v[:, start:stop].to(cd), "b s hk d -> b hk s d")
        s = torch.einsum("bhgqd,bhkd->bhgqk", qh, kb) * scale
        vis = _visible(q_pos, _key_slice(k_pos, start, stop), causal, window,
                       q_doc, _key_slice(k_doc, start, stop), blocks)
        if vis is not None:
            s.masked_fill_(~vis, -math.inf)
        m_new = torch.maximum(m, s.amax(dim=-1))
        m_safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
        p = torch.exp(s - m_safe[..., None])
        alpha = torch.exp(m - m_safe)
        denom = denom * alpha + p.sum(dim=-1)
        acc = acc * alpha[..., None] + torch.einsum("bhgqk,bhkd->bhgqd", p, vb)
        m = m_new

    empty = denom == 0
    block_out = acc / torch.where(empty, torch.ones_like(denom), denom)[..., None]
    block_lse = torch.where(empty, torch.full_like(m, -math.inf), m + torch.log(denom))
    block_out = rearrange(block_out, "b hk g s d -> b s (hk g) d")
    block_lse = rearrange(block_lse, "b hk g s -> b (hk g) s")
    if out is None:
        return block_out.contiguous(), block_lse.contiguous()
    merge_(out, lse, block_out, block_lse)
    return out, lse


def backward_delta(out: torch.Tensor, dout: torch.Tensor) -> torch.Tensor:
    """``delta = rowsum(dO * O)``, (B, H, S), computed once per layer, not once per block."""
    cd = accum_dtype(out.dtype)
    return rearrange((dout.to(cd) * out.to(cd)).sum(-1), "b s h -> b h s").contiguous()


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
    window: tuple[int, int] | None = None,
    q_doc: torch.Tensor | None = None,
    k_doc: torch.Tensor | None = None,
    blocks=None,
    block: int = BLOCK,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of one (q block, k/v block) pair from the global LSE and delta.

    dout, q: (B, Sq, H, D); k, v: (B, Sk, Hkv, D); lse, delta: (B, H, Sq) of the *whole*
    attention (all key blocks). Adds into ``dq`` (B, Sq, H, D), ``dk``/``dv`` (B, Sk, Hkv, D)
    accumulators (allocated as zeros in the accumulation dtype when not given) and returns them.
    """
    B, Sq, H, D = q.shape
    Sk, Hkv = k.shape[1], k.shape[2]
    cd = accum_dtype(q.dtype)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(D)
    q_pos, k_pos = _resolve(Sq, Sk, q.device, q_pos, k_pos, causal or blocks is not None, window, q_doc, k_doc)
    q_pos, k_pos = _per_head(q_pos, k_pos, Hkv)
    q_doc, k_doc = _per_head(q_doc, k_doc, Hkv)
    if dq is None:
        dq = torch.zeros(q.shape, dtype=cd, device=q.device)
    if dk is None:
        dk = torch.zeros(k.shape, dtype=cd, device=k.device)
    if dv is None:
        dv = torch.zeros(v.shape, dtype=cd, device=v.device)

    qh = _split_heads(q.to(cd), Hkv)  # (B, Hkv, G, Sq, D)
    doh = _split_heads(dout.to(cd), Hkv)
    lse_h = rearrange(lse.to(cd), "b (hk g) s -> b hk g s", hk=Hkv)
    # A row that sees no key anywhere has LSE = -inf; +inf makes its probabilities 0, not NaN.
    lse_h = lse_h.masked_fill(torch.isneginf(lse_h), math.inf)
    delta_h = rearrange(delta.to(cd), "b (hk g) s -> b hk g s", hk=Hkv)
    dq_h = torch.zeros_like(qh)
    for start in range(0, Sk, block):
        stop = min(start + block, Sk)
        kb = rearrange(k[:, start:stop].to(cd), "b s hk d -> b hk s d")
        vb = rearrange(v[:, start:stop].to(cd), "b s hk d -> b hk s d")
        s = torch.einsum("bhgqd,bhkd->bhgqk", qh, kb) * scale
        vis = _visible(q_pos, _key_slice(k_pos, start, stop), causal, window,
                       q_doc, _key_slice(k_doc, start, stop), blocks)
        if vis is not None:
            s.masked_fill_(~vis, -math.inf)
        p = torch.exp(s - lse_h[..., None])
        dv_b = torch.einsum("bhgqk,bhgqd->bkhd", p, doh)
        dp = torch.einsum("bhgqd,bhkd->bhgqk", doh, vb)
        ds = p * (dp - delta_h[..., None])
        dq_h += torch.einsum("bhgqk,bhkd->bhgqd", ds, kb)
        dk_b = torch.einsum("bhgqk,bhgqd->bkhd", ds, qh)
        dk[:, start:stop] += dk_b * scale
        dv[:, start:stop] += dv_b
    dq += rearrange(dq_h, "b hk g s d -> b s (hk g) d") * scale
    return dq, dk, dv


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    softmax_scale: float | None = None,
    q_pos: torch.Tensor | None = None,
    k_pos: torch.Tensor | None = None,
    window: tuple[int, int] | None = None,
    cu_seqlens=None,
    sparsity=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Whole-sequence attention, differentiable through autograd (the test oracle).

    ``window``, ``cu_seqlens`` (document boundaries over the positions) and ``sparsity`` (a
    :mod:`ringflash.sparse` mode, applied directly as a dense mask of the score matrix) as
    :func:`ringflash.ring_attention`. Returns ``out`` in ``q.dtype`` and ``lse`` in the
    accumulation dtype. Unlike :func:`forward` this builds the full score matrix, so keep it to
    test sizes.
    """
    B, Sq, H, D = q.shape
    Sk, Hkv = k.shape[1], k.shape[2]
    cd = accum_dtype(q.dtype)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(D)
    window = _mask.check_window(window)
    cu = _mask.check_cu_seqlens(cu_seqlens)
    _sparse.check_sparsity(sparsity, q, k, Sq if q_pos is None and Sq == Sk else None)
    blocks = sparsity if _is_blocks(sparsity) else None
    if (cu is not None or blocks is not None) and (q_pos is None or k_pos is None):
        _both_or_neither(q_pos, k_pos)
        q_pos, k_pos = default_positions(Sq, Sk, q.device)
    if blocks is not None and (last := max(int(q_pos.max()), int(k_pos.max()))) >= blocks.seqlen:
        raise ValueError(f"the block pattern covers {blocks.seqlen} tokens; positions reach {last}")
    q_pos, k_pos = _resolve(Sq, Sk, q.device, q_pos, k_pos, causal, window, None, None)
    q_doc = k_doc = None
    if cu is not None:
        q_doc, k_doc = _mask.doc_ids(cu, q_pos), _mask.doc_ids(cu, k_pos)
    qh = _split_heads(q.to(cd), Hkv)
    kh = rearrange(k.to(cd), "b s hk d -> b hk s d")
    vh = rearrange(v.to(cd), "b s hk d -> b hk s d")
    s = torch.einsum("bhgqd,bhkd->bhgqk", qh, kh) * scale
    vis = _visible(q_pos, k_pos, causal, window, q_doc, k_doc, blocks)
    if sparsity is not None and blocks is None:
        tok = _token_visible(sparsity, Hkv)
        vis = tok if vis is None else vis & tok
    if vis is not None:
        s = s.masked_fill(~vis, -math.inf)
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse.masked_fill(torch.isneginf(lse), 0.0)[..., None])
    out = torch.einsum("bhgqk,bhkd->bhgqd", p, vh)
    out = rearrange(out, "b hk g s d -> b s (hk g) d").to(q.dtype)
    return out, rearrange(lse, "b hk g s -> b (hk g) s")


def _is_blocks(sparsity) -> bool:
    return sparsity is not None and hasattr(sparsity, "block_size")


def _token_visible(sparsity, heads_kv: int) -> torch.Tensor:
    """(B, Hkv, G, Sq, Sk) visibility of QK-dropping (both kept) or hash buckets (equal ids)."""
    if hasattr(sparsity, "q_keep"):
        q, k = sparsity.q_keep, sparsity.k_keep
    else:
        q, k = sparsity.q_buckets.to(torch.int64), sparsity.k_buckets.to(torch.int64)
    q = rearrange(q, "b s (hk g) -> b hk g s 1", hk=heads_kv)
    k = rearrange(k, "b s hk -> b hk 1 1 s")
    return (q & k) if q.dtype == torch.bool else (q == k)
