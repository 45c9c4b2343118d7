"""What ring attention keeps from one call to the next (cached positions and mask pieces) must
not depend on the context of the call that made it: ``torch.inference_mode``, a default device,
a Layout of the user's own. Each case is a call in that context followed by ordinary training
calls, on spawned gloo ranks, against float64 attention over the whole sequence."""

from __future__ import annotations

import pytest
import torch

from common import rel
from distributed import spawn
from ringflash import Layout, get_layout, reference, ring_attention


class Blocks(Layout):
    """Equal blocks of the sequence, ``order[r]`` listing those of rank ``r`` (a list attribute:
    the layout is unhashable)."""

    name = "blocks"

    def __init__(self, order):
        self.order = [sorted(o) for o in order]

    def multiple(self, world_size: int) -> int:
        return sum(len(o) for o in self.order)

    def positions(self, seqlen, *, rank, world_size, device=None):
        c = seqlen // self.multiple(world_size)
        return torch.cat([torch.arange(b * c, (b + 1) * c, device=device) for b in self.order[rank]])


def _case(rank, world_size, layout, backend, seed, context=None):
    """Errors of (out, dq, dk, dv) of one ring call against float64; ``context``: a context
    manager the forward runs in (then without gradients: the out error only)."""
    g = torch.Generator().manual_seed(seed)
    S = 4 * layout.multiple(world_size)
    q, k, v, dout = (torch.randn(2, S, h, 16, generator=g, dtype=torch.float64) for h in (4, 2, 2, 4))
    qq, kk, vv = (x.clone().requires_grad_() for x in (q, k, v))
    ref, _ = reference.attention(qq, kk, vv, causal=True)
    ref.backward(dout)
    shard = lambda x: layout.shard(x, rank=rank, world_size=world_size)  # noqa: E731
    if context is not None:
        with context:
            out = ring_attention(*(shard(x).float() for x in (q, k, v)), causal=True, layout=layout, backend=backend)
        return [rel(layout.unshard(out.clone()), ref)]
    ql, kl, vl = (shard(x).float().requires_grad_() for x in (q, k, v))
    out = ring_attention(ql, kl, vl, causal=True, layout=layout, backend=backend)
    out.backward(shard(dout).float())
    got = [layout.unshard(x) for x in (out.detach(), ql.grad, kl.grad, vl.grad)]
    return [rel(a, b) for a, b in zip(got, (ref, qq.grad, kk.grad, vv.grad))]


def _calls(rank, world_size):
    from test_sdpa import EMULATED

    def attempt(fn):
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - reported to the test
            return f"{type(e).__name__}: {e}"

    striped = get_layout("striped")
    results = {}
    for name, backend in (("reference", "reference"), ("sdpa_logic", EMULATED)):
        # Evaluation under inference_mode first: the positions cached then serve the training
        # calls after it (the SDPA engines' cache of pieces reads their version counters).
        results[(name, "inference_mode")] = attempt(
            lambda: _case(rank, world_size, striped, backend, 1, torch.inference_mode()))
        results[(name, "after_inference_mode")] = attempt(lambda: _case(rank, world_size, striped, backend, 2))
        # ... as normal tensors, so that the SDPA engines' cache of pieces serves them.
        from ringflash.ring import _POSITIONS

        cached = [t for host, dev in _POSITIONS.values() for t in host + dev]
        results[(name, "cached_positions")] = [float(t.is_inference()) for t in cached] or "none cached"
        # The first call of a shape under a default device (a model built under
        # `with torch.device(...)`): the host copies of the positions stay on the host.
        results[(name, "default_device")] = attempt(
            lambda: _case(rank, world_size, get_layout("zigzag"), backend, 3, torch.device("meta")))
        results[(name, "after_default_device")] = attempt(
            lambda: _case(rank, world_size, get_layout("zigzag"), backend, 4))
        # A Layout of the user's own with a list attribute (unhashable): positions made per call.
        blocks = Blocks([[r, 2 * world_size - 1 - r] for r in range(world_size)] if world_size > 1 else [[0]])
        results[(name, "unhashable_layout")] = attempt(lambda: _case(rank, world_size, blocks, backend, 5))
        results[(name, "unhashable_layout_again")] = attempt(lambda: _case(rank, world_size, blocks, backend, 6))
    return results


_RUNS: dict = {}


def calls(world_size: int) -> list[dict]:
    if world_size not in _RUNS:
        _RUNS[world_size] = spawn(_calls, world_size, timeout=300)
    return _RUNS[world_size]


CASES = ["inference_mode", "after_inference_mode", "cached_positions", "default_device", "after_default_device",
         "unhashable_layout", "unhashable_layout_again"]


@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("backend", ["reference", "sdpa_logic"])
@pytest.mark.parametrize("case", CASES)
def test_calls_in_any_context_then_training(world_size, backend, case):
    for rank, res in enumerate(calls(world_size)):
        errs = res[(backend, case)]
        assert isinstance(errs, list), f"rank {rank}: {errs}"
        assert all(e < 1e-5 for e in errs), (rank, errs)  # cached_positions: 1.0 for an inference tensor


def test_sdpa_pieces_of_inference_positions():
    """The SDPA engines' cache of pieces, given position tensors made under inference_mode
    (which have no version counter): the pieces are decomposed, not looked up."""
    from ringflash.sdpa import _pieces, decompose

    q = torch.zeros(1, 6, 1, 8)
    with torch.inference_mode():
        q_pos, k_pos = torch.arange(6), torch.arange(3, 9)
        assert _pieces(q, q, q_pos, k_pos, True) == decompose(q_pos, k_pos, True)
    assert _pieces(q, q, q_pos, k_pos, True) == decompose(q_pos, k_pos, True)
