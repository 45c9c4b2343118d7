"""Layouts: positions by their definitions, shard -> assemble/unshard round trips."""

from __future__ import annotations

import pytest
import torch

from distributed import spawn
from ringflash import Contiguous, Striped, Zigzag, get_layout

WORLD_SIZES = [1, 2, 3, 4, 8]


def expected_positions(name: str, seqlen: int, rank: int, world_size: int, stripe: int = 1) -> list[int]:
    """The standard definitions, written out token by token."""
    if name == "contiguous":
        n = seqlen // world_size
        return list(range(rank * n, (rank + 1) * n))
    if name == "striped":
        return [t for t in range(seqlen) if (t // stripe) % world_size == rank]
    if name == "zigzag":
        c = seqlen // (2 * world_size)
        return list(range(rank * c, (rank + 1) * c)) + list(
            range((2 * world_size - 1 - rank) * c, (2 * world_size - rank) * c)
        )
    raise AssertionError(name)


LAYOUT_CASES = [("contiguous", Contiguous(), 1), ("striped", Striped(), 1), ("striped", Striped(stripe=3), 3), ("zigzag", Zigzag(), 1)]


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@pytest.mark.parametrize("name,layout,stripe", LAYOUT_CASES, ids=lambda x: repr(x) if not isinstance(x, (str, int)) else str(x))
def test_positions_follow_the_definition(name, layout, stripe, world_size):
    seqlen = layout.multiple(world_size) * 5
    seen = []
    for rank in range(world_size):
        pos = layout.positions(seqlen, rank=rank, world_size=world_size)
        assert pos.dtype == torch.int64
        assert pos.tolist() == expected_positions(name, seqlen, rank, world_size, stripe)
        assert bool((pos[1:] > pos[:-1]).all()), "positions must be strictly increasing"
        local = layout.local_positions(seqlen // world_size, rank=rank, world_size=world_size)
        assert torch.equal(local, pos)
        seen += pos.tolist()
    assert sorted(seen) == list(range(seqlen)), "every token on exactly one rank"


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@pytest.mark.parametrize("name,layout,stripe", LAYOUT_CASES, ids=lambda x: repr(x) if not isinstance(x, (str, int)) else str(x))
@pytest.mark.parametrize("dim", [1, 2])
def test_shard_assemble_round_trip(name, layout, stripe, world_size, dim):
    seqlen = layout.multiple(world_size) * 3
    shape = [2, 5, 3]
    shape[dim] = seqlen
    x = torch.randn(*shape)
    shards = [layout.shard(x, rank=r, world_size=world_size, dim=dim) for r in range(world_size)]
    for r, s in enumerate(shards):
        idx = torch.tensor(expected_positions(name, seqlen, r, world_size, stripe))
        assert torch.equal(s, x.index_select(dim, idx))
    assert torch.equal(layout.assemble(shards, dim=dim), x)


def test_layout_names():
    assert get_layout("striped") == Striped()
    assert get_layout("zigzag") == Zigzag()
    assert get_layout("contiguous") == Contiguous()
    assert get_layout(Striped(stripe=4)) == Striped(stripe=4)
    assert Striped(stripe=2) != Striped()
    with pytest.raises(ValueError, match="unknown layout"):
        get_layout("diagonal")
    with pytest.raises(ValueError, match="stripe"):
        Striped(stripe=0)


@pytest.mark.parametrize("layout,world_size,seqlen,multiple", [
    (Contiguous(), 3, 10, 3), (Striped(), 4, 10, 4), (Striped(stripe=4), 2, 12, 8), (Zigzag(), 3, 9, 6),
])
def test_unsplittable_lengths_say_the_multiple(layout, world_size, seqlen, multiple):
    with pytest.raises(ValueError, match=f"multiple of {multiple}"):
        layout.shard(torch.zeros(1, seqlen), rank=0, world_size=world_size)
    with pytest.raises(ValueError, match=f"multiple of {multiple}"):
        layout.check_seqlen(seqlen, world_size)


@pytest.mark.parametrize("layout", [Contiguous(), Striped(), Striped(stripe=2), Zigzag()], ids=repr)
@pytest.mark.parametrize("rank,world_size", [(2, 2), (-1, 2), (4, 4), (0, 0), (1.0, 2), (True, 2)])
def test_rank_outside_the_group_is_refused(layout, rank, world_size):
    """A global rank passed where the rank within the group was meant, or no ranks at all."""
    x = torch.arange(16)[None]
    with pytest.raises(ValueError, match="rank must be|world_size must be"):
        layout.shard(x, rank=rank, world_size=world_size)
    with pytest.raises(ValueError, match="rank must be|world_size must be"):
        layout.positions(16, rank=rank, world_size=world_size)
    with pytest.raises(ValueError, match="rank must be|world_size must be"):
        layout.local_positions(8, rank=rank, world_size=world_size)


@pytest.mark.parametrize("layout", [Contiguous(), Striped(), Striped(stripe=4), Zigzag()], ids=repr)
@pytest.mark.parametrize("seqlen", [1, 7, 13])
def test_one_rank_takes_any_length(layout, seqlen):
    """On one rank every layout is the identity, whatever multiple it needs on several."""
    x = torch.randn(2, seqlen, 3)
    layout.check_seqlen(seqlen, 1)
    layout.check_local_seqlen(seqlen, 1)
    assert torch.equal(layout.positions(seqlen, rank=0, world_size=1), torch.arange(seqlen))
    assert torch.equal(layout.local_positions(seqlen, rank=0, world_size=1), torch.arange(seqlen))
    assert torch.equal(layout.shard(x, rank=0, world_size=1), x)
    assert torch.equal(layout.assemble([x]), x)


def test_one_rank_odd_length_attention():
    """Without a process group, ring attention over any layout is plain attention at any length."""
    from ringflash import reference, ring_attention

    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 7, h, 8, generator=g, dtype=torch.float64) for h in (4, 2, 2))
    ref, _ = reference.attention(q, k, v, causal=True)
    for layout in ("zigzag", Striped(stripe=4)):
        out = ring_attention(q, k, v, causal=True, layout=layout)
        assert ((out - ref).norm() / ref.norm()).item() < 1e-12


def _unshard(rank, world_size, seed):
    torch.manual_seed(seed)
    out = {}
    for layout in (Contiguous(), Striped(), Striped(stripe=2), Zigzag()):
        x = torch.randn(2, layout.multiple(world_size) * 2, 3)
        full = layout.unshard(layout.shard(x, rank=rank, world_size=world_size))
        out[repr(layout)] = torch.equal(full, x)
    return out


@pytest.mark.parametrize("world_size", [1, 3, 4])
def test_unshard_over_a_group(world_size):
    for rank_result in spawn(_unshard, world_size, 1234, timeout=120):
        assert all(rank_result.values()), rank_result
