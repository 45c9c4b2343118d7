"""benchmarks/cost_model.py: the arithmetic of the Ulysses x ring cost model."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
from cost_model import estimate, parse_len  # noqa: E402

BASE = dict(seqlen=parse_len("256k"), heads=32, head_dim=128, nodes=8, gpus_per_node=8, tflops=400.0,
            nvlink_gbs=260.0, net_gbs=25.0)


def test_compute_is_the_same_for_every_split_and_the_ring_shrinks():
    ests = [estimate(kv_heads=32, ulysses=u, **BASE) for u in (1, 2, 4, 8)]
    flops = 3.5 * 4 * BASE["seqlen"] ** 2 * 32 * 128 / 2 / 64
    for e in ests:
        assert e.compute_ms == pytest.approx(flops / 400e12 * 1e3)
        assert e.ring * e.ulysses == 64
    # Each hop carries U times the tokens and 1/U of the K/V heads: the same bytes per hop, and
    # R - 1 hops, so the ring's transfers fall with U.
    xfer = [e.ring_transfer_ms for e in ests]
    assert xfer == sorted(xfer, reverse=True)
    assert ests[0].ring_transfer_ms / ests[3].ring_transfer_ms == pytest.approx(63 / 7)
    assert ests[0].all_to_all_ms == 0 and all(e.all_to_all_ms > 0 for e in ests[1:])
    assert all(e.total_ms == pytest.approx(e.compute_ms + e.ring_exposed_ms + e.all_to_all_ms) for e in ests)


def test_the_split_follows_the_network():
    def best(net_gbs, nodes):
        ests = [estimate(kv_heads=32, ulysses=u, **{**BASE, "net_gbs": net_gbs, "nodes": nodes}) for u in (1, 2, 4, 8)]
        return min(ests, key=lambda e: e.total_ms).ulysses

    assert best(25.0, 8) == 8  # a slow network: the ring as short as a node allows
    assert best(10_000.0, 8) == 1  # a network that hides every hop: no all-to-all to pay
    assert best(25.0, 1) in (1, 2, 4, 8)  # one node: every link is NVLink


def test_fewer_kv_heads_than_ulysses_ranks_send_one_each():
    one = estimate(kv_heads=2, ulysses=8, **BASE)
    eight = estimate(kv_heads=8, ulysses=8, **BASE)
    assert one.ring_transfer_ms == pytest.approx(eight.ring_transfer_ms)  # one K/V head per rank on the ring
    assert one.all_to_all_ms == pytest.approx(eight.all_to_all_ms)  # 8 heads cross the all-to-all either way
    with pytest.raises(ValueError):
        estimate(kv_heads=8, ulysses=3, **BASE)


def test_chunks_hide_the_all_to_all_behind_compute():
    """HybridGroup(chunks=C): 1/C of the exchanges stays exposed while the compute can hide the
    rest; with one chunk all of it counts, as before; bad counts raise."""
    one = estimate(kv_heads=8, ulysses=8, **BASE)
    assert one.all_to_all_exposed_ms == one.all_to_all_ms and one.chunks == 1
    two = estimate(kv_heads=8, ulysses=8, chunks=2, **BASE)
    assert two.compute_ms > two.all_to_all_ms  # at this size the compute hides the rest
    assert two.all_to_all_exposed_ms == pytest.approx(one.all_to_all_ms / 2)
    assert two.total_ms == pytest.approx(one.total_ms - one.all_to_all_ms / 2)
    # Compute too short to hide the rest: exposed beyond 1/C.
    fast = estimate(kv_heads=8, ulysses=8, chunks=4, **{**BASE, "tflops": 1e6})
    assert fast.all_to_all_exposed_ms > fast.all_to_all_ms / 4
    with pytest.raises(ValueError, match="chunks"):
        estimate(kv_heads=8, ulysses=8, chunks=0, **BASE)
