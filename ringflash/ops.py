"""Single-device attention: backend selection, input checks and the autograd op.

A *backend* is an object with three functions sharing :mod:`ringflash.reference`'s
signatures and contract:

``forward(q, k, v, *, q_pos, k_pos, causal, softmax_scale, out=None, lse=None)``
    float32 partial output ``(B, Sq, H, D)`` and LSE ``(B, H, Sq)``, folded into ``out``/``lse``
    in place when those are given;
``backward(dout, q, k, v, lse, delta, *, q_pos, k_pos, causal, softmax_scale, dq, dk, dv)``
    adds one block's gradients into float32 accumulators;
``backward_delta(out, dout)``
    ``rowsum(dO * O)`` as ``(B, H, Sq)`` float32.

Optional: ``dkdv_hook`` (``backward`` takes ``after_dkdv``, a callback run between its dK/dV
and dQ work), ``dkdv_store`` (``backward`` takes ``store_dkdv=True``: overwrite ``dk``/``dv``
instead of adding into them) and ``backward_blocks`` (returns a block's dK/dV as key-range fragments in the
input dtype, for the ring to add into the travelling float32 sums in one pass).

Masks beyond causal (sliding windows, packed documents; :mod:`ringflash.mask`) reach the
engines that say so (``serves_masks``: reference and triton) as ``window=(left, right)`` and
per-token document ids ``q_doc``/``k_doc``; the others are refused with a ``ValueError`` before
anything runs (:func:`check_mask_backend`).

``"reference"`` is plain PyTorch (any device); ``"triton"`` is :mod:`ringflash.kernels`
(CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``); ``"cudnn"`` and ``"sdpa_flash"``
are PyTorch's fused SDPA kernels (:mod:`ringflash.sdpa`; they take host positions and the
global O in backward). The ring uses the same seam.
"""

from __future__ import annotations

import contextlib
import math
from types import SimpleNamespace

import torch

from . import reference
from .mask import Mask, doc_ids, make_mask
from .sparse import BlockSparse, check_sparsity, is_token_sparsity, run_sorted

__all__ = ["flash_attention", "get_backend", "backend_name", "check_backend_inputs", "check_mask_backend",
           "check_sparsity_backend", "mask_kwargs", "check_qkv", "no_autocast", "BACKENDS"]

BACKENDS = ("triton", "reference", "cudnn", "sdpa_flash")


def _check_triton_device(device: torch.device) -> None:
    """The Triton kernels take CUDA tensors, or CPU tensors where Triton's interpreter runs them
    (``TRITON_INTERPRET`` set, in any form Triton accepts, before ringflash was imported)."""
    if device.type == "cuda":
        return
    from . import kernels

    if not kernels.INTERPRETED:
        raise ValueError(
            f"backend='triton' needs CUDA tensors (got {device.type}); on the CPU set "
            "TRITON_INTERPRET=1 before importing ringflash, or use backend='reference'"
        )


def get_backend(backend, device: torch.device) -> SimpleNamespace:
    """The backend called ``backend``, or the default for ``device`` (triton on CUDA).

    A backend object (anything with ``forward``, ``backward`` and ``backward_delta``) is
    returned as it is.
    """
    if all(hasattr(backend, f) for f in ("forward", "backward", "backward_delta")):
        return backend
    if backend is None:
        backend = "triton" if device.type == "cuda" else "reference"
    if backend == "reference":
        return SimpleNamespace(
            name="reference",
            forward=reference.forward,
            backward=reference.backward,
            backward_delta=reference.backward_delta,
            serves_masks=True,
        )
    if backend == "triton":
        _check_triton_device(device)
        from . import kernels

        return SimpleNamespace(
            name="triton",
            forward=kernels.forward,
            backward=kernels.backward,
            backward_delta=kernels.backward_delta,
            check=getattr(kernels, "check_inputs", None),
            dkdv_hook=True,
            dkdv_store=True,
            serves_masks=True,
            # forward(out_dtype=) / backward(grad_dtype=): results stored in the inputs' dtype
            stores_input_dtype=True,
        )
    if backend in ("cudnn", "sdpa_flash"):
        from . import sdpa

        return sdpa.make_engine(backend)
    raise ValueError(f"unknown backend {backend!r}; use one of {BACKENDS} or None for the default")


def backend_name(backend, device: torch.device) -> str:
    """The name of a named backend (``None``: the default for ``device``); ValueError if unknown."""
    if backend is None:
        return "triton" if device.type == "cuda" else "reference"
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; use one of {BACKENDS} or None for the default")
    return backend


def check_backend_inputs(name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """The checks of named backend ``name`` on q, k, v, without building the backend object: plain
    Python on tensor metadata, which torch.compile traces without a graph break."""
    if name == "triton":
        _check_triton_device(q.device)
        from .kernels import check_inputs

        check_inputs(q, k, v)
    elif name in ("cudnn", "sdpa_flash"):
        from .sdpa import check_inputs

        check_inputs(name, q, k, v)


def _serves_masks(backend) -> tuple[bool, str]:
    """(whether ``backend`` -- a name, None or an engine object -- serves masks beyond causal, its name)."""
    if isinstance(backend, str) or backend is None:
        return backend in (None, "triton", "reference"), backend
    return bool(getattr(backend, "serves_masks", False)), getattr(backend, "name", type(backend).__name__)


def check_mask_backend(backend, mask: Mask) -> None:
    """Raise ``ValueError`` if ``backend`` (a name or an engine object) cannot serve ``mask``.

    Every engine serves causal and full attention; windows and documents need an engine with
    ``serves_masks`` (triton, reference). PyTorch's fused SDPA kernels take no such masks.
    """
    if mask.dense:
        return
    ok, name = _serves_masks(backend)
    if not ok:
        raise ValueError(
            f'backend="{name}" serves causal and full attention only; this call\'s mask ({mask.describe()}) '
            f'needs backend="triton" (CUDA) or backend="reference"'
        )


def mask_kwargs(mask: Mask, q_doc=None, k_doc=None) -> dict:
    """The keyword arguments an engine takes for ``mask`` beyond ``causal`` (none for a dense mask,
    so engines that serve only dense masks are called as they always were)."""
    kw = {}
    if mask.window is not None:
        kw["window"] = mask.window
    if mask.cu_seqlens is not None:
        kw["q_doc"], kw["k_doc"] = q_doc, k_doc
    if mask.blocks is not None:
        kw["blocks"] = mask.blocks
    return kw


def check_sparsity_backend(backend, sparsity) -> None:
    """``ValueError`` unless ``backend`` (a name, None or an engine) serves the sparse modes."""
    if sparsity is None:
        return
    ok, name = _serves_masks(backend)
    if not ok:
        raise ValueError(
            f'backend="{name}" serves causal and full attention only; sparse attention '
            f'({type(sparsity).__name__}) needs backend="triton" (CUDA) or backend="reference"'
        )


def backward_extras(backend, out: torch.Tensor) -> dict:
    """Engines that compute ``rowsum(dO * O)`` themselves (the SDPA ops) take the global O."""
    return {"out": out} if getattr(backend, "needs_out", False) else {}


def no_autocast(device: torch.device):
    """A context that turns autocast off on ``device``: the kernels and the reference choose their
    own precision (float32 accumulation), which autocast would otherwise lower to bf16/fp16."""
    if device.type in ("cuda", "cpu"):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Raise ``TypeError``/``ValueError`` naming what to change if q, k, v don't fit together."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(
                f"{name} must be 4-D (batch, seqlen, heads, head_dim); got shape {tuple(t.shape)}"
            )
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device; got {q.device}, {k.device}, {v.device}")
    if not (q.shape[0] == k.shape[0] == v.shape[0]):
        raise ValueError(
            f"q, k, v must share the batch size; got {q.shape[0]}, {k.shape[0]}, {v.shape[0]}"
        )
    if k.shape[:3] != v.shape[:3]:
        raise ValueError(
            f"k and v must have the same (batch, seqlen, heads); got {tuple(k.shape)} and {tuple(v.shape)}"
        )
    if not (q.shape[3] == k.shape[3] == v.shape[3]):
        raise ValueError(
            f"q, k, v must share head_dim; got {q.shape[3]}, {k.shape[3]}, {v.shape[3]}"
        )
    if k.shape[2] == 0:
        raise ValueError(f"k and v need at least one head; got shape {tuple(k.shape)}")
    if q.shape[3] == 0:
        raise ValueError(f"head_dim must be at least 1; got shape {tuple(q.shape)}")
    if q.shape[2] % k.shape[2] != 0:
        raise ValueError(
            f"the number of query heads ({q.shape[2]}) must be a multiple of the number of "
            f"key/value heads ({k.shape[2]})"
        )


def resolve_scale(softmax_scale, head_dim: int) -> float:
    """``softmax_scale``, or ``1 / sqrt(head_dim)``; ``ValueError`` unless finite and positive
    (the kernels take each tile's row maximum before scaling)."""
    if softmax_scale is None:
        return 1.0 / math.sqrt(head_dim)
    scale = float(softmax_scale)
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"softmax_scale must be a finite positive number; got {softmax_scale!r}")
    return scale


_POSITIONS: dict = {}


def _default_positions(seqlen_q: int, seqlen_k: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`reference.default_positions`, made once per shape and device (read only: three
    small launches fewer per call)."""
    key = (seqlen_q, seqlen_k, torch.device(device))
    hit = _POSITIONS.get(key)
    if hit is None:
        if len(_POSITIONS) >= 16:
            _POSITIONS.clear()
        with torch.inference_mode(False):
            hit = _POSITIONS[key] = reference.default_positions(seqlen_q, seqlen_k, device)
    return hit


class _FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, softmax_scale, be, masks):
        masks = {"q_pos": None, "k_pos": None, **masks}
        # One block, no fold: engines that can store O in the inputs' dtype skip the cast.
        direct = {"out_dtype": q.dtype} if getattr(be, "stores_input_dtype", False) else {}
        out, lse = be.forward(q, k, v, causal=causal, softmax_scale=softmax_scale, **masks, **direct)
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.causal, ctx.softmax_scale, ctx.backend, ctx.masks = causal, softmax_scale, be, masks
        ctx.mark_non_differentiable(lse)
        ctx.set_materialize_grads(False)  # no zero-filled gradient for the LSE: a launch fewer
        return out, lse

    @staticmethod
    @torch.autograd.function.once_differentiable  # a gradient of the gradient is refused, not wrong
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse = ctx.saved_tensors
        if dout is None:  # only the LSE was used: nothing flows back
            return None, None, None, None, None, None, None
        be = ctx.backend
        dout = dout.to(q.dtype).contiguous()
        direct = {"grad_dtype": q.dtype} if getattr(be, "stores_input_dtype", False) else {}
        with no_autocast(q.device):
            delta = be.backward_delta(out, dout)
            dq, dk, dv = be.backward(
                dout, q, k, v, lse, delta,
                causal=ctx.causal, softmax_scale=ctx.softmax_scale, **ctx.masks, **backward_extras(be, out), **direct,
            )
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None


def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    window: tuple[int, int] | None = None,
    cu_seqlens=None,
    softmax_scale: float | None = None,
    return_lse: bool = False,
    backend: str | None = None,
    sparsity=None,
):
    """Exact softmax attention on one device.

    Query ``i`` sits at position ``i + seqlen_k - seqlen_q`` and key ``j`` at ``j`` (aligned to
    the bottom-right corner, as flash-attn); the mask rules below read those positions.

    Args:
        q: (batch_size, seqlen_q, nheads, headdim)
        k, v: (batch_size, seqlen_k, nheads_kv, headdim); ``nheads % nheads_kv == 0`` (GQA/MQA).
        causal: a query sees the keys at or before its position.
        window: ``(left, right)``: the query at position p sees keys in ``[p - left, p + right]``;
            -1 leaves a side unbounded (flash-attn's ``window_size``). Combines with ``causal``.
        cu_seqlens: document boundaries of a packed sequence, ``[0, end_0, ..., seqlen]`` (a list
            or a 1-D integer tensor; a CUDA tensor costs one device synchronisation): a query sees
            only keys of its own document. Needs ``seqlen_q == seqlen_k``; the same boundaries
            apply to every row of the batch.
        softmax_scale: defaults to ``1 / sqrt(headdim)``.
        return_lse: also return the log-sum-exp (natural log), (batch_size, nheads, seqlen_q), in
            float32 (float64 for float64 inputs). A row that sees no key has O = 0, LSE = -inf.
        backend: ``"triton"``, ``"reference"``, ``"cudnn"``, ``"sdpa_flash"``, or None (triton on
            CUDA, reference on CPU). Windows, documents and sparsity need triton or reference.
        sparsity: a :mod:`ringflash.sparse` mode: :class:`~ringflash.sparse.BlockSparse` (over
            the keys' positions, so it must tile ``seqlen_k``), :class:`~ringflash.sparse.QKDrop`
            or :class:`~ringflash.sparse.HashSparse` (attributes shaped (B, S, heads)).

    Returns:
        out: (batch_size, seqlen_q, nheads, headdim) in q's dtype; and lse if ``return_lse``.

    Raises:
        TypeError: q, k, v are not floating-point tensors (or a dtype the engine does not take).
        ValueError: shapes that do not fit together, a non-positive ``softmax_scale``, a bad
            ``window`` or ``cu_seqlens`` (see :mod:`ringflash.mask`), ``cu_seqlens`` with
            ``seqlen_q != seqlen_k``, a mask the engine cannot serve, or tensors on a device the
            engine cannot run on.
    """
    check_qkv(q, k, v)
    softmax_scale = resolve_scale(softmax_scale, q.shape[-1])
    if cu_seqlens is not None and q.shape[1] != k.shape[1]:
        raise ValueError(
            f"cu_seqlens needs queries and keys of one packed sequence (seqlen_q == seqlen_k); got "
            f"{q.shape[1]} and {k.shape[1]}"
        )
    check_sparsity(sparsity, q, k, k.shape[1])
    check_sparsity_backend(backend, sparsity)
    blocks = sparsity if isinstance(sparsity, BlockSparse) else None
    mask = make_mask(causal, window, cu_seqlens, k.shape[1], blocks=blocks)
    check_mask_backend(backend, mask)
    be = get_backend(backend, q.device)
    check_mask_backend(be, mask)
    check_sparsity_backend(be, sparsity)
    if getattr(be, "check", None) is not None:
        be.check(q, k, v)
    q_doc = k_doc = None
    if mask.cu_seqlens is not None:
        k_doc = doc_ids(mask.cu_seqlens, torch.arange(k.shape[1], device=q.device))
        q_doc = k_doc
    with no_autocast(q.device):
        if is_token_sparsity(sparsity):
            q_pos, k_pos = _default_positions(q.shape[1], k.shape[1], q.device)

            def call(qs, ks, vs, attrs):
                return _FlashAttention.apply(qs, ks, vs, mask.causal, float(softmax_scale), be,
                                             dict(mask_kwargs(mask), **attrs.kwargs(0)))

            n_docs = 1 if mask.cu_seqlens is None else len(mask.cu_seqlens) - 1
            out, lse = run_sorted(sparsity, q, k, v, q_pos, k_pos, q_doc, k_doc, n_docs, call)
        else:
            out, lse = _FlashAttention.apply(q, k, v, mask.causal, float(softmax_scale), be,
                                             mask_kwargs(mask, q_doc, k_doc))
    return (out, lse) if return_lse else out
