"""shard_batch with packed documents: positions inside documents, targets at document ends, and
the check that every rank of the group holds the same batch."""

from __future__ import annotations

import pytest
import torch

from distributed import spawn
from ringflash import get_layout, shard_batch
from ringflash.batch import IGNORE_INDEX


@pytest.mark.quick
@pytest.mark.parametrize("layout", ["contiguous", "striped", "zigzag"])
def test_document_positions_and_targets(layout):
    ids = torch.arange(100, 116)[None].repeat(2, 1)  # (2, 16)
    cu = [0, 1, 6, 16]
    ids_l, labels_l, pos_l, doc_pos_l = shard_batch(ids, layout=layout, cu_seqlens=cu)
    assert torch.equal(pos_l, torch.arange(16))  # one process: everything, in order
    starts = torch.tensor([0, 1, 1, 1, 1, 1, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6])
    assert torch.equal(doc_pos_l, torch.arange(16) - starts)
    want = torch.cat([ids[:, 1:], torch.full((2, 1), IGNORE_INDEX)], dim=1)
    want[:, [0, 5]] = IGNORE_INDEX  # the last token of a document predicts nothing
    assert torch.equal(labels_l, want)
    # Without boundaries: three tensors, as before.
    assert len(shard_batch(ids, layout=layout)) == 3


def test_padding_becomes_a_document():
    ids = torch.arange(7)[None]
    *_, doc_pos = shard_batch(ids, layout="striped", cu_seqlens=[0, 3, 7], pad_id=0)
    assert torch.equal(doc_pos, torch.tensor([0, 1, 2, 0, 1, 2, 3]))  # one rank: no padding needed


def test_bad_boundaries_raise():
    ids = torch.zeros(1, 8, dtype=torch.int64)
    for bad in ([1, 8], [0, 4, 4, 8], [0, 4, 9], torch.tensor([0.0, 8.0]), torch.tensor([[0, 8]])):
        with pytest.raises(ValueError, match="cu_seqlens"):
            shard_batch(ids, cu_seqlens=bad)


def _ranks(rank, world_size):
    ids = torch.arange(16)[None]
    out = {}
    _, _, pos, doc_pos = shard_batch(ids, layout="striped", cu_seqlens=[0, 5, 16])
    out["pos"], out["doc_pos"] = pos.tolist(), doc_pos.tolist()
    cu = [0, 5, 16] if rank == 0 else [0, 6, 16]
    try:
        shard_batch(ids, layout="striped", cu_seqlens=cu)
        out["mismatch"] = "no error"
    except ValueError as e:
        out["mismatch"] = str(e)
    other = ids if rank == 0 else torch.arange(32)[None]
    try:
        shard_batch(other, layout="striped")
        out["length"] = "no error"
    except ValueError as e:
        out["length"] = str(e)
    # Different lengths with the same boundaries: rank 1's end at 16 is wrong for its 32 tokens.
    try:
        shard_batch(other, layout="striped", cu_seqlens=[0, 5, 16])
        out["length_docs"] = "no error"
    except ValueError as e:
        out["length_docs"] = str(e)
    # Boundaries that are bad on one rank only.
    try:
        shard_batch(ids, layout="striped", cu_seqlens=[0, 5, 16] if rank == 0 else [0, 5, 5, 16])
        out["bad_one"] = "no error"
    except ValueError as e:
        out["bad_one"] = str(e)
    return out


def test_ranks_with_different_batches_all_raise():
    outs = spawn(_ranks, 2)
    for rank, out in enumerate(outs):
        pos = get_layout("striped").positions(16, rank=rank, world_size=2)
        assert out["pos"] == pos.tolist()
        assert out["doc_pos"] == [p - (5 if p >= 5 else 0) for p in pos.tolist()]
        assert "different batches" in out["mismatch"], out
        assert "different batches" in out["length"], out
    # A rank whose boundaries fail raises their error; the others learn it from the check's all-gather.
    assert "must end at the global sequence length" in outs[1]["length_docs"], outs[1]
    assert "bad cu_seqlens on rank(s) [1]" in outs[0]["length_docs"], outs[0]
    assert "strictly increasing" in outs[1]["bad_one"], outs[1]
    assert "bad cu_seqlens on rank(s) [1]" in outs[0]["bad_one"], outs[0]
