"""benchmarks/model_dq_writer.py: the schedule model of the ordered dQ writer behaves as its
description says, on small grids."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import model_dq_writer as mdw  # noqa: E402


def test_every_step_runs_and_work_is_steps_over_slots():
    r = mdw.simulate(2048, heads=2, sms=8, latency=0.5)
    n_k, n_q = 2048 // 128, 2048 // 64
    assert r["steps"] == 2 * sum(n_q - 2 * n for n in range(n_k))  # causal: key tile n from query tile 2n
    assert r["work"] == pytest.approx(r["steps"] / 8)
    assert r["makespan"] >= r["work"]  # no slot does more than one step at a time
    full = mdw.simulate(2048, heads=2, sms=8, latency=0.5, causal=False)
    assert full["steps"] == 2 * n_k * n_q


def test_no_counter_waits_with_every_program_running():
    """Causal, every program in a slot at once and additions landing within a step: each program
    reaches a query tile a step after the one above it did, so no counter is waited on."""
    r = mdw.simulate(2048, heads=1, sms=64, latency=0.6, poll=0.2)
    assert r["waited"] == 0


def test_a_slow_landing_makes_the_ordered_writer_the_bound():
    """Ordered, the writer waits for each addition to land before the next: past one step per
    addition it sets the pace (the longest program's steps x L); pipelined, or unordered, it
    does not."""
    kw = dict(heads=1, sms=64)
    n_q = 2048 // 64
    slow = mdw.simulate(2048, latency=2.0, **kw)
    assert slow["makespan"] >= n_q * 2.0
    pipe = mdw.simulate(2048, latency=2.0, pipelined=True, **kw)
    free = mdw.simulate(2048, latency=2.0, ordered=False, **kw)
    assert free["makespan"] <= pipe["makespan"] < 0.75 * slow["makespan"]
    fast = mdw.simulate(2048, latency=0.5, **kw)
    assert fast["makespan"] < 0.75 * slow["makespan"]


def test_longest_first_has_the_shorter_tail():
    """With fewer slots than programs the unordered grid is done sooner longest-first (the
    order the unordered kernel launches) than shortest-first (the ordered one's)."""
    kw = dict(heads=4, sms=16, latency=0.5, ordered=False)
    assert mdw.simulate(4096, shortest_first=False, **kw)["makespan"] < mdw.simulate(4096, **kw)["makespan"]


def test_main_writes_rows(tmp_path):
    out = tmp_path / "rows.jsonl"
    rows = mdw.main(["--seqlens", "1024", "--latency", "0.5", "2.0", "--heads", "2", "--sms", "8", "--out", str(out)])
    assert len(rows) == 2 and len(out.read_text().splitlines()) == 2
    assert rows[1]["ordered_over_lpt"] > rows[0]["ordered_over_lpt"]
