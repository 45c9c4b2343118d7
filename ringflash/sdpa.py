"""PyTorch's fused SDPA kernels (cuDNN, flash) as local engines of the ring.

These kernels know two masks: none, and causal on a square block. A ring step's mask comes
from global positions (query ``i`` sees key ``j`` iff ``q_pos[i] >= k_pos[j]``), so
:func:`decompose` cuts the step into rectangular pieces that are each fully visible or a
square causal diagonal. With strictly increasing positions, query ``i`` sees a prefix of the
keys of length ``c_i`` (non-decreasing in ``i``): a run of rows where ``c_i`` is constant is
one full piece; a run where ``c_i`` grows by one per row is a full piece (the keys every row
of the run sees) plus a causal square. The built-in layouts' steps come out as at most one
piece each:

* contiguous: full (earlier rank), causal square (own block), nothing (later rank);
* striped (stripe 1): causal square when ``src <= r``; when ``src > r`` the diagonal is
  excluded: queries ``1..`` over keys ``..-1``, causal, and row 0 sees nothing;
* zigzag: own block = one causal square; other blocks = one full half-block (queries or
  keys), or nothing.

Other layouts (``Striped(stripe > 1)``, a ``Layout`` of your own) can need more pieces than the
kernels should be called for (:data:`MAX_PIECES`); :func:`check_layout` finds that out from the
positions alone, for every step of the ring, before the ring sends anything.

Each piece's output comes back rounded to the input dtype, with a float32 LSE; the pieces and
steps are merged into float32 accumulators as with the Triton kernels. The backward of a
piece takes the global O and LSE rows of its queries, and its dQ/dK/dV (input dtype) are
added into the float32 accumulators. So the SDPA engines round once per piece, where the
Triton engine rounds once per layer: their bf16 error grows slowly with the number of ranks.

GQA: the fused ops take fewer K/V heads than query heads (a divisor) and return dK/dV summed
over each group, so K/V are never repeated.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from types import SimpleNamespace

import torch
from .reference import default_positions, merge_

__all__ = ["Piece", "decompose", "make_engine", "check_inputs", "check_layout", "accumulate", "ENGINES", "MAX_PIECES"]

ENGINES = ("cudnn", "sdpa_flash")
MAX_PIECES = 8  # more pieces than this means a mask these kernels have no good form for


@dataclass(frozen=True)
class Piece:
    """Queries ``[q0, q1)`` over keys ``[k0, k1)``; ``causal``: a square top-left causal block."""

    q0: int
    q1: int
    k0: int
    k1: int
    causal: bool


def decompose(q_pos: torch.Tensor, k_pos: torch.Tensor, causal: bool, *, max_pieces: int = MAX_PIECES) -> list[Piece]:
    """Cut a (q_pos, k_pos) block into full and square-causal pieces (host tensors, increasing).

    Raises ``ValueError`` if the mask needs more than ``max_pieces`` pieces (e.g. striped
    layouts with stripes wider than one token).
    """
    Sq, Sk = q_pos.numel(), k_pos.numel()
    if Sq == 0 or Sk == 0:
        return []
    if not causal:
        return [Piece(0, Sq, 0, Sk, False)]
    # c[i]: how many keys query i sees (a prefix, since positions increase). Rows are grouped
    # by the step of c from one row to the next: 0 (a full piece), 1 (full + causal square),
    # anything else (rows on their own). Only the few segments are visited in Python.
    c = torch.searchsorted(k_pos.contiguous(), q_pos.contiguous(), right=True)
    if Sq == 1:
        segments = [(0, 0)]  # (last row of the segment, step)
    else:
        d = c[1:] - c[:-1]  # d[t] links rows t and t + 1
        starts = [0] + (torch.nonzero(d[1:] != d[:-1]).flatten() + 1).tolist()
        segments = list(zip([t - 1 for t in starts[1:]] + [Sq - 2], d[starts].tolist()))
        segments = [(last + 1, step) for last, step in segments]
    c = c.tolist()
    pieces: list[Piece] = []

    def add(piece):
        pieces.append(piece)
        if len(pieces) > max_pieces:
            raise ValueError(
                f"this mask needs more than {max_pieces} full/causal pieces for the SDPA engines "
                f'(e.g. stripes wider than one token); use backend="triton", which masks by position'
            )

    row = 0  # the first row not yet in a piece
    for n, (last, step) in enumerate(segments):
        if step in (0, 1) or Sq == 1:
            a, b, row = row, last + 1, last + 1
        else:  # a jump: the rows before `last` stand alone; `last` opens the next segment
            a, b = row, (last if n + 1 < len(segments) else last + 1)
            for i in range(a, b):
                if c[i] > 0:
                    add(Piece(i, i + 1, 0, c[i], False))
            row = b
            continue
        if a >= b:
            continue
        if step == 0 or b - a == 1:
            if c[a] > 0:
                add(Piece(a, b, 0, c[a], False))
            continue
        if c[a] == 0:  # a row that sees no key: no piece (O = 0, LSE = -inf)
            a += 1
        base = c[a] - 1  # keys that every row of the run sees
        if base > 0:
            add(Piece(a, b, 0, base, False))
        add(Piece(a, b, base, base + (b - a), True))
    return pieces


# -- the fused ops ---------------------------------------------------------------------------


def _bhsd(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(1, 2)  # (B, S, H, D) -> (B, H, S, D), a view


def _cudnn_fwd(q, k, v, causal, scale):
    out, lse, *_ = torch.ops.aten._scaled_dot_product_cudnn_attention(
        _bhsd(q), _bhsd(k), _bhsd(v), None, True, 0.0, causal, False, scale=scale
    )
    return _bhsd(out), lse.reshape(lse.shape[0], lse.shape[1], lse.shape[2])


def _cudnn_bwd(dout, q, k, v, out, lse, causal, scale):
    seed = torch.zeros((), dtype=torch.long, device=q.device)
    dq, dk, dv = torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
        _bhsd(dout), _bhsd(q), _bhsd(k), _bhsd(v), _bhsd(out), lse.unsqueeze(-1).contiguous(),
        seed, seed, None, None, None, q.shape[1], k.shape[1], 0.0, causal, scale=scale,
    )
    return _bhsd(dq), _bhsd(dk), _bhsd(dv)


def _flash_fwd(q, k, v, causal, scale):
    out, lse, *_ = torch.ops.aten._scaled_dot_product_flash_attention(
        _bhsd(q), _bhsd(k), _bhsd(v), 0.0, causal, False, scale=scale
    )
    return _bhsd(out), lse


def _flash_bwd(dout, q, k, v, out, lse, causal, scale):
    seed = torch.empty(2, dtype=torch.uint64, device=q.device)
    offset = torch.empty((), dtype=torch.uint64, device=q.device)
    dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_backward(
        _bhsd(dout), _bhsd(q), _bhsd(k), _bhsd(v), _bhsd(out), lse.contiguous(),
        None, None, q.shape[1], k.shape[1], 0.0, causal, seed, offset, scale=scale,
    )
    return _bhsd(dq), _bhsd(dk), _bhsd(dv)


_OPS = {"cudnn": (_cudnn_fwd, _cudnn_bwd), "sdpa_flash": (_flash_fwd, _flash_bwd)}


# -- the engine ------------------------------------------------------------------------------


def check_inputs(name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """What engine ``name``'s fused ops take; a request they cannot serve names the engines that can."""
    if q.device.type != "cuda":
        raise ValueError(
            f"the {name} engine needs CUDA tensors; got {q.device}. On the CPU use "
            "backend='reference' (or 'triton' under TRITON_INTERPRET=1)"
        )
    if q.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(
            f"the {name} engine takes float16 or bfloat16; got {q.dtype}. backend='triton' or "
            "'reference' also take float32"
        )
    max_d = 128 if name == "cudnn" else 256
    if q.shape[-1] % 8 or q.shape[-1] > max_d:
        raise ValueError(
            f"the {name} engine takes head dims that are multiples of 8 up to {max_d}; got "
            f"{q.shape[-1]}. backend='triton' takes multiples of 8 up to 256"
        )


_LAYOUTS_CHECKED: set = set()


def check_layout(name: str, layout, local_seqlen: int, world_size: int, causal: bool) -> None:
    """Raise ``ValueError`` if some step of a causal ring over ``layout`` needs more pieces than
    engine ``name`` runs (:func:`decompose`).

    Positions depend only on the layout, the local length and the number of ranks, so every
    rank reaches the same verdict, before any transfer. The built-in layouts (contiguous,
    striped with stripes of one token, zigzag) need at most one piece per step and are not
    cut here; any other layout is cut for all ``world_size ** 2`` (rank, source) pairs once per
    shape.
    """
    from .layout import Contiguous, Striped, Zigzag

    if not causal or world_size == 1:
        return
    if type(layout) in (Contiguous, Zigzag) or (type(layout) is Striped and layout.stripe == 1):
        return
    try:
        key = (layout, local_seqlen, world_size)
        if key in _LAYOUTS_CHECKED:
            return
    except TypeError:  # a Layout with unhashable attributes: checked on every call
        key = None
    pos = [layout.local_positions(local_seqlen, rank=r, world_size=world_size) for r in range(world_size)]
    for r in range(world_size):
        for src in range(world_size):
            try:
                decompose(pos[r], pos[src], True)
            except ValueError as e:
                raise ValueError(
                    f"the {name} engine cannot run causal ring attention over layout {layout!r} on "
                    f"{world_size} ranks with {local_seqlen} tokens per rank: at the step where rank {r} "
                    f"holds the keys of rank {src}, {e}"
                ) from None
    if key is not None:
        if len(_LAYOUTS_CHECKED) > 256:
            _LAYOUTS_CHECKED.clear()
        _LAYOUTS_CHECKED.add(key)


_PIECES: dict = {}


def _pieces(q, k, q_pos, k_pos, causal) -> list[Piece]:
    """The pieces of one block, decomposed once per pair of position tensors and cached.

    The ring passes the same cached host position tensors on every call, so after the first
    call of a shape this is a dictionary lookup: no host work on the critical path. The key
    holds the tensors themselves (their ids stay theirs) and their version counters (an
    in-place change is a new key).
    """
    Sq, Sk = q.shape[1], k.shape[1]
    if not causal:
        return [Piece(0, Sq, 0, Sk, False)] if Sq and Sk else []
    if q_pos is None or k_pos is None:
        key = ("default", Sq, Sk)
    elif q_pos.is_inference() or k_pos.is_inference():
        key = None  # no version counter to tell an in-place change: decomposed on every call
    else:
        key = (id(q_pos), q_pos._version, id(k_pos), k_pos._version)
    hit = _PIECES.get(key) if key is not None else None
    if hit is not None:
        return hit[-1]
    if q_pos is None or k_pos is None:
        pieces = decompose(*default_positions(Sq, Sk), True)
    else:
        # The ring passes host copies of the positions (host_positions=True): no device sync here.
        pieces = decompose(q_pos.cpu(), k_pos.cpu(), True)
    if key is not None:
        if len(_PIECES) > 1024:
            _PIECES.clear()
        _PIECES[key] = (q_pos, k_pos, pieces)
    return pieces


def _fused(device: torch.device) -> bool:
    # One fused Triton pass on CUDA (and under the Triton interpreter); plain PyTorch elsewhere.
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def _merge_fn(device: torch.device):
    if _fused(device):
        from .kernels.merge import merge_ as fused_merge

        return fused_merge
    return merge_


def accumulate(dst: torch.Tensor, src: torch.Tensor, *, fresh: bool = False) -> None:
    """``dst += src`` (``fresh``: ``dst = src``) for a (B, S, H, D) float32 accumulator and a
    block's gradient or output in the input dtype (or, ``fresh``, any float dtypes): one fused
    pass where Triton runs."""
    fusable = dst.dtype == torch.float32 or (fresh and dst.dtype in (torch.float16, torch.bfloat16))
    if fusable and dst.dim() == 4 and _fused(dst.device):
        from .kernels.merge import accumulate_

        accumulate_(dst, src, fresh=fresh)
    elif fresh:
        dst.copy_(src)
    else:
        dst += src


def make_engine(name: str, *, piece_fwd=None, piece_bwd=None) -> SimpleNamespace:
    """The backend (ops.py's seam) for SDPA engine ``name``.

    ``piece_fwd(q, k, v, causal, scale) -> (out (B,s,H,D), lse (B,H,s))`` and
    ``piece_bwd(dout, q, k, v, out, lse, causal, scale) -> (dq, dk, dv)`` run one piece;
    they default to the fused op of ``name`` (tests substitute plain PyTorch).
    """
    fused = piece_fwd is None
    if fused:
        if name not in _OPS:
            raise ValueError(f"unknown SDPA engine {name!r}; use one of {ENGINES}")
        piece_fwd, piece_bwd = _OPS[name]

    def forward(q, k, v, *, q_pos=None, k_pos=None, causal=False, softmax_scale=None, out=None, lse=None):
        B, Sq, H, D = q.shape
        scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(D)
        merge = _merge_fn(q.device)
        for p in _pieces(q, k, q_pos, k_pos, causal):
            o, l = piece_fwd(q[:, p.q0:p.q1], k[:, p.k0:p.k1], v[:, p.k0:p.k1], p.causal, scale)
            if out is None and (p.q0, p.q1) == (0, Sq):  # the first piece covers every row: no merge
                out = torch.empty((B, Sq, H, D), dtype=torch.float32, device=q.device)
                accumulate(out, o, fresh=True)
                lse = l.to(torch.float32, memory_format=torch.contiguous_format)
                continue
            if out is None:
                out = torch.zeros((B, Sq, H, D), dtype=torch.float32, device=q.device)
                lse = torch.full((B, H, Sq), -math.inf, dtype=torch.float32, device=q.device)
            merge(out[:, p.q0:p.q1], lse[:, :, p.q0:p.q1], o, l)
        if out is None:  # no piece: every row sees nothing
            out = torch.zeros((B, Sq, H, D), dtype=torch.float32, device=q.device)
            lse = torch.full((B, H, Sq), -math.inf, dtype=torch.float32, device=q.device)
        return out, lse

    def backward_blocks(dout, q, k, v, lse, delta, *, q_pos=None, k_pos=None, causal=False, softmax_scale=None,
                        dq, out):
        """Add this block's dQ into the float32 ``dq``; return its dK/dV as fragments
        ``[(k0, k1, dk, dv)]`` (keys ``k0:k1``, in the input dtype, one per piece), for the
        caller to add into its accumulators in as few passes as it can (see ring.py)."""
        # The fused backward ops compute rowsum(dO * O) themselves from the global O.
        scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
        frags = []
        for p in _pieces(q, k, q_pos, k_pos, causal):
            rows = slice(p.q0, p.q1)
            gq, gk, gv = piece_bwd(
                dout[:, rows], q[:, rows], k[:, p.k0:p.k1], v[:, p.k0:p.k1], out[:, rows], lse[:, :, rows],
                p.causal, scale,
            )
            accumulate(dq[:, rows], gq)
            frags.append((p.k0, p.k1, gk, gv))
        return frags

    def backward(dout, q, k, v, lse, delta, *, q_pos=None, k_pos=None, causal=False, softmax_scale=None,
                 dq=None, dk=None, dv=None, out=None):
        dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device) if dq is None else dq
        dk = torch.zeros(k.shape, dtype=torch.float32, device=q.device) if dk is None else dk
        dv = torch.zeros(v.shape, dtype=torch.float32, device=q.device) if dv is None else dv
        for k0, k1, gk, gv in backward_blocks(dout, q, k, v, lse, delta, q_pos=q_pos, k_pos=k_pos, causal=causal,
                                              softmax_scale=softmax_scale, dq=dq, out=out):
            accumulate(dk[:, k0:k1], gk)
            accumulate(dv[:, k0:k1], gv)
        return dq, dk, dv

    return SimpleNamespace(
        name=name, forward=forward, backward=backward, backward_delta=lambda out, dout: None,
        backward_blocks=backward_blocks, check=(lambda q, k, v: check_inputs(name, q, k, v)) if fused else None,
        check_layout=lambda layout, local_seqlen, world_size, causal: check_layout(
            name, layout, local_seqlen, world_size, causal),
        host_positions=True, needs_out=True,
        holds_sms=fused,  # see ring.HEAD_START_US
    )
