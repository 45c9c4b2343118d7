"""Fold a partial attention result into a running float32 one: one pass, one launch.

``merge_(out, lse, block_out, block_lse)`` does what :func:`ringflash.reference.merge_` does
(online-softmax merge, empty rows stay O = 0 and LSE = -inf), reading the block's output in
its own dtype and strides (e.g. the bf16 output of a fused SDPA op) and writing ``out`` and
``lse`` in place. The plain-PyTorch version takes about ten elementwise passes over the
output; this kernel reads each element once and writes it once. Used by the SDPA engines
(:mod:`ringflash.sdpa`), whose kernels cannot fold into a running result themselves.

``accumulate_(dst, src)`` adds (or copies) a block's bf16/fp16 gradient into a float32
accumulator in one pass. PyTorch's ``dst += src`` with mixed dtypes takes its unvectorized
casting path: about 4x slower than the bytes need.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import FP_FUSION, _merge_states

__all__ = ["merge_", "accumulate_"]

# Launch config of both kernels: rows per program (one head each) and warps.
BLOCK_S = 32
NUM_WARPS = 4


@triton.jit
def _merge_kernel(
    O, L, BO, BL,
    stride_ob, stride_os, stride_oh,
    stride_lb, stride_lh, stride_ls,
    stride_bob, stride_bos, stride_boh, stride_bod,
    stride_blb, stride_blh, stride_bls,
    H, S,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
):
    pid_s = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    rows = (pid_s * BLOCK_S + tl.arange(0, BLOCK_S)).to(tl.int64)  # S * H * D may pass 2**31
    cols = tl.arange(0, BLOCK_D)
    row_ok = rows < S
    mask = row_ok[:, None] & (cols[None, :] < HEAD_DIM)

    l_ptrs = L + b * stride_lb + h * stride_lh + rows * stride_ls
    o_ptrs = O + b * stride_ob + h * stride_oh + rows[:, None] * stride_os + cols[None, :]
    bl_ptrs = BL + b * stride_blb + h * stride_blh + rows * stride_bls
    bo_ptrs = BO + b * stride_bob + h * stride_boh + rows[:, None] * stride_bos + cols[None, :] * stride_bod

    lse_old = tl.load(l_ptrs, mask=row_ok, other=float("-inf"))
    lse_new = tl.load(bl_ptrs, mask=row_ok, other=float("-inf")).to(tl.float32)
    o_old = tl.load(o_ptrs, mask=mask, other=0.0)
    o_new = tl.load(bo_ptrs, mask=mask, other=0.0).to(tl.float32)

    o, lse = _merge_states(o_old, lse_old, o_new, lse_new)  # the forward kernel's fold
    tl.store(o_ptrs, o, mask=mask)
    tl.store(l_ptrs, lse, mask=row_ok)


def merge_(out: torch.Tensor, lse: torch.Tensor, block_out: torch.Tensor, block_lse: torch.Tensor) -> None:
    """Fold ``(block_out, block_lse)`` into the float32 ``(out, lse)`` in place.

    ``out``: (B, S, H, D) float32 with a contiguous last dim; ``lse``: (B, H, S) float32;
    ``block_out``: (B, S, H, D) in any float dtype and strides; ``block_lse``: (B, H, S).
    Views (e.g. a range of rows) are fine.
    """
    B, S, H, D = out.shape
    if block_out.shape != out.shape or lse.shape != (B, H, S) or block_lse.shape != (B, H, S):
        raise ValueError(
            f"merge_: shapes do not match: out {tuple(out.shape)}, lse {tuple(lse.shape)}, "
            f"block_out {tuple(block_out.shape)}, block_lse {tuple(block_lse.shape)}"
        )
    if out.dtype != torch.float32 or lse.dtype != torch.float32 or out.stride(-1) != 1:
        raise ValueError("merge_: out and lse must be float32, out with a contiguous last dim")
    if out.numel() == 0:
        return
    grid = (triton.cdiv(S, BLOCK_S), B * H)
    _merge_kernel[grid](
        out, lse, block_out, block_lse,
        out.stride(0), out.stride(1), out.stride(2),
        lse.stride(0), lse.stride(1), lse.stride(2),
        block_out.stride(0), block_out.stride(1), block_out.stride(2), block_out.stride(3),
        block_lse.stride(0), block_lse.stride(1), block_lse.stride(2),
        H, S,
        HEAD_DIM=D, BLOCK_D=max(16, triton.next_power_of_2(D)), BLOCK_S=BLOCK_S,
        num_warps=NUM_WARPS, **FP_FUSION,
    )


@triton.jit
def _accumulate_kernel(
    DST, SRC,
    stride_db, stride_ds, stride_dh, stride_dd,
    stride_sb, stride_ss, stride_sh, stride_sd,
    H, S,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr, FRESH: tl.constexpr,
):
    pid_s = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    rows = (pid_s * BLOCK_S + tl.arange(0, BLOCK_S)).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    mask = (rows < S)[:, None] & (cols[None, :] < HEAD_DIM)
    d_ptrs = DST + b * stride_db + h * stride_dh + rows[:, None] * stride_ds + cols[None, :] * stride_dd
    s_ptrs = SRC + b * stride_sb + h * stride_sh + rows[:, None] * stride_ss + cols[None, :] * stride_sd
    x = tl.load(s_ptrs, mask=mask, other=0.0)
    if not FRESH:
        x = x.to(tl.float32) + tl.load(d_ptrs, mask=mask, other=0.0)
    tl.store(d_ptrs, x.to(DST.dtype.element_ty), mask=mask)


def accumulate_(dst: torch.Tensor, src: torch.Tensor, *, fresh: bool = False) -> None:
    """``dst += src`` (``fresh``: ``dst = src``, cast to dst's dtype) in place, in one pass.

    ``dst``: (B, S, H, D) float32 (any float dtype when ``fresh``); ``src``: the same shape in
    any float dtype. Both in any strides (views of a range of rows or heads, or of a
    (B, H, S, D) tensor, are fine).
    """
    if dst.shape != src.shape or dst.dim() != 4:
        raise ValueError(f"accumulate_: shapes do not match: dst {tuple(dst.shape)}, src {tuple(src.shape)}")
    if dst.dtype != torch.float32 and not fresh:
        raise ValueError(f"accumulate_: dst must be float32 to add into; got {dst.dtype}")
    if dst.numel() == 0:
        return
    B, S, H, D = dst.shape
    grid = (triton.cdiv(S, BLOCK_S), B * H)
    _accumulate_kernel[grid](
        dst, src, *dst.stride(), *src.stride(), H, S,
        HEAD_DIM=D, BLOCK_D=max(16, triton.next_power_of_2(D)), BLOCK_S=BLOCK_S, FRESH=fresh,
        num_warps=NUM_WARPS, **FP_FUSION,
    )
