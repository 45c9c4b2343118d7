"""A process group that does not contain this rank is refused with a ValueError, before any communication.

``torch.distributed.new_group(ranks)`` is called on every rank and gives the ranks outside
``ranks`` a placeholder instead of a group. In a 2-rank gloo job both ranks pass
``new_group([0])``: on rank 1 every entry point that takes ``group=`` must raise a ValueError
that names the problem (without the check they ran with a world size of -1: negated loss
gradients, index errors, nonsense messages), and must not communicate while doing so: the
communication functions are replaced by ones that fail, and both ranks meet at a barrier
afterwards. Rank 0, the one member, runs the same calls as single-rank work.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from distributed import spawn

_COMM = ["all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object", "broadcast", "barrier",
         "batch_isend_irecv", "isend", "irecv", "send", "recv"]

_DIM, _HEADS, _SEQLEN = 16, 2, 8


def _calls(group) -> dict:
    """Each entry point, called with ``group``."""
    from ringflash import MultiheadAttention, RingAttention, ring_attention
    from ringflash.batch import average_gradients, shard_batch, sharded_cross_entropy, unshard
    from ringflash.models import GPT, GPTConfig

    torch.manual_seed(0)
    q = torch.randn(1, _SEQLEN, _HEADS, 8, dtype=torch.float64)
    x = torch.randn(1, _SEQLEN, _DIM, dtype=torch.float64)
    logits = torch.randn(1, _SEQLEN, 5, requires_grad=True)
    labels = torch.randint(0, 5, (1, _SEQLEN))
    cfg = GPTConfig(vocab_size=16, dim=_DIM, n_layers=1, n_heads=_HEADS)

    def mha_group_set_later():
        mha = MultiheadAttention(_DIM, _HEADS).double()
        mha.group = mha.attn.group = group
        return mha(x)

    def gradients():
        p = torch.nn.Parameter(torch.ones(3))
        p.grad = torch.ones(3)
        average_gradients([p], group)

    return {
        "ring_attention": lambda: ring_attention(q, q, q, causal=True, group=group),
        "shard_batch": lambda: shard_batch(torch.arange(_SEQLEN)[None], group=group),
        "sharded_cross_entropy": lambda: sharded_cross_entropy(logits, labels, group).backward(),
        "unshard": lambda: unshard(x, group=group),
        "average_gradients": gradients,
        "RingAttention": lambda: RingAttention(group=group)(q, q, q),
        "MultiheadAttention": lambda: MultiheadAttention(_DIM, _HEADS, group=group).double()(x),
        "MultiheadAttention.forward": mha_group_set_later,
        "GPT": lambda: GPT(cfg, group=group)(torch.zeros(1, _SEQLEN, dtype=torch.long)),
    }


def _no_communication():
    def refuse(name):
        def fn(*args, **kwargs):
            raise AssertionError(f"torch.distributed.{name} called while checking the group")
        return fn

    saved = {name: getattr(dist, name) for name in _COMM}
    for name in _COMM:
        setattr(dist, name, refuse(name))
    return saved


def _membership(rank, world_size):
    g = dist.new_group([0])  # on every rank: rank 1 gets the non-member placeholder
    results = {}
    saved = _no_communication() if rank == 1 else {}
    try:
        for name, call in _calls(g).items():
            try:
                call()
                results[name] = "ok"
            except Exception as e:  # noqa: BLE001 - reported to the parent
                results[name] = f"{type(e).__name__}: {e}"
    finally:
        for name, fn in saved.items():
            setattr(dist, name, fn)
    dist.barrier()  # both ranks are still in step: the checks did not communicate
    return results


_RUNS: dict = {}


def runs() -> list[dict]:
    if "membership" not in _RUNS:
        _RUNS["membership"] = spawn(_membership, 2, timeout=240)
    return _RUNS["membership"]


@pytest.mark.parametrize("api", list(_calls(None)))
def test_non_member_rank_is_refused(api):
    member, non_member = runs()
    assert member[api] == "ok", member[api]  # the one member: single-rank work
    msg = non_member[api]
    assert msg.startswith("ValueError: "), msg
    assert "this rank (global rank 1) is not a member of the process group passed as group=" in msg, msg
    assert "pass the group this rank belongs to" in msg, msg


def test_no_check_without_distributed():
    """Without torch.distributed nothing is checked: the modules are single-process."""
    from ringflash.comm import resolve_group, world_and_rank

    assert resolve_group(None) is None
    assert world_and_rank(None) == (1, 0)
