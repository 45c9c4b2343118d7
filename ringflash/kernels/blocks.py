"""Tile lists of a block-sparse pattern: which tiles each attention program visits.

A block pattern (:class:`ringflash.sparse.BlockSparse`) is not monotone along a layout's local
order, so tile ranges cannot classify it. Instead, once per call (cached by the launcher,
``attention._cached``, while the same position tensors are reused, as the ring reuses them for
every layer), every query tile gets
the list of key tiles it must visit (every key tile the list of query tiles, for dK/dV), fully
visible tiles first, then partial ones, and the counts of each; FlexAttention's ``BlockMask``
is the model.

A tile pair is visited if the other rules' ranges (causal, window, documents; from
``_ranges_kernel``) reach it *and* the pattern keeps some block pair that the two tiles touch;
it is fully visible if it lies inside the rules' fully visible range *and* the pattern keeps
every block pair the tiles touch. The block pairs are counted with two small matrix products
of tile-to-block incidence matrices, on the device, with no host synchronisation. When a tile
lies inside one block (a contiguous or zigzag layout with blocks no smaller than the tiles)
this is exact; a striped tile touches many blocks and is visited if any of its pairs is kept,
and its element rule does the rest.
"""

from __future__ import annotations

import torch
import triton

__all__ = ["tile_lists"]


def _incidence(pos: torch.Tensor, tile: int, num_blocks: int, block_size: int) -> torch.Tensor:
    """(tiles, num_blocks) float32: 1 where some position of the tile lies in the block."""
    n = pos.shape[0]
    tiles = triton.cdiv(n, tile)
    inc = torch.zeros((tiles, num_blocks), dtype=torch.float32, device=pos.device)
    rows = torch.arange(n, device=pos.device) // tile
    inc[rows, torch.div(pos, block_size, rounding_mode="floor")] = 1.0
    return inc


def _classes(ranges: torch.Tensor, other_tile: int, other_len: int, inc_rows, inc_cols, pattern, by_keys: bool):
    """(full, any) boolean (rows, cols) tile matrices of one orientation."""
    cols = triton.cdiv(other_len, other_tile)
    start = torch.arange(cols, device=ranges.device, dtype=torch.int32) * other_tile
    lo, flo, fhi, hi = (ranges[:, i:i + 1] for i in range(4))
    base_any = (start >= lo) & (start < hi)
    base_full = (start >= flo) & (start < fhi)
    p = pattern.to(torch.float32)
    if by_keys:  # rows are key tiles, columns query tiles: pairs (query block, key block) = P^T
        p = p.t()
    kept = (inc_rows @ p @ inc_cols.t()) > 0
    dropped = (inc_rows @ (1.0 - p) @ inc_cols.t()) > 0
    return base_full & ~dropped, base_any & kept


def tile_lists(ranges: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor, blocks, block_m: int, block_n: int,
               *, by_keys: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lists, counts)`` for the attention programs of one launch.

    ``ranges``: (1, rows, 4) from ``_ranges_kernel`` (rows = query tiles, or key tiles with
    ``by_keys``); ``q_pos``/``k_pos``: the shared int64 positions. ``lists`` (rows, cols) int32
    holds each row's tiles to visit, fully visible ones first; ``counts`` (rows, 2) int32 holds
    (number fully visible, number visited)."""
    pattern = blocks.on(q_pos.device)
    nb, bs = blocks.num_blocks, blocks.block_size
    inc_q = _incidence(q_pos, block_m, nb, bs)
    inc_k = _incidence(k_pos, block_n, nb, bs)
    r = ranges[0]
    if by_keys:
        full, visit = _classes(r, block_m, q_pos.shape[0], inc_k, inc_q, pattern, True)
    else:
        full, visit = _classes(r, block_n, k_pos.shape[0], inc_q, inc_k, pattern, False)
    cols = full.shape[1]
    rank = torch.where(full, 0, torch.where(visit, 1, 2)) * cols + torch.arange(cols, device=full.device)
    lists = torch.argsort(rank, dim=1).to(torch.int32).contiguous()
    counts = torch.stack([full.sum(1), visit.sum(1)], dim=1).to(torch.int32).contiguous()
    return lists, counts
