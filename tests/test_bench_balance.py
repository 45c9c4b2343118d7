"""benchmarks/bench_balance.py: the layouts' work balance for packed documents, checked against
closed forms and a dense-mask brute force."""

from __future__ import annotations

import json
import os
import sys
from collections import defaultdict
from fractions import Fraction

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import bench_balance as bb  # noqa: E402

pytestmark = pytest.mark.quick


@pytest.fixture(scope="module")
def quick_rows(tmp_path_factory):
    d = tmp_path_factory.mktemp("balance")
    out, txt = d / "balance.jsonl", d / "balance.txt"
    bb.main(["--quick", "--out", str(out), "--txt", str(txt)])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows and "| striped |" in txt.read_text()
    return rows


def test_quick_grid_rows(quick_rows):
    fields = {"layout", "P", "S", "causal", "median_doc", "seed", "max_over_mean", "tile_density",
              "pace_efficiency"}
    assert all(fields <= r.keys() for r in quick_rows)
    # 1 size x 2 medians x 3 seeds x 2 masks x 2 world sizes x 5 layouts
    assert len(quick_rows) == 120
    for r in quick_rows:
        assert 1.0 <= r["max_over_mean"] <= r["P"]
        assert 0 < r["pace_efficiency"] <= r["tile_density"] <= 1
        # a rank computes at least its visible pairs, so the pace is bounded by the balance
        assert r["pace_efficiency"] <= 1 / r["max_over_mean"] + 1e-12
        assert r["computed_total_ranges"] >= r["computed_total"]
    # every layout sees the same visible pairs of one packing
    totals = defaultdict(set)
    for r in quick_rows:
        totals[(r["P"], r["causal"], r["median_doc"], r["seed"])].add(r["visible_total"])
    assert all(len(v) == 1 for v in totals.values())


def test_striped_balances_packed_documents_contiguous_does_not(quick_rows):
    by = {(r["layout"], r["P"], r["median_doc"], r["seed"]): r["max_over_mean"]
          for r in quick_rows if r["causal"]}
    for (layout, P, med, seed), m in by.items():
        if layout == "striped":
            assert m <= 1.02, (P, med, seed, m)
            assert by[("contiguous", P, med, seed)] >= 1.25, (P, med, seed)
            assert by[("zigzag", P, med, seed)] >= 1.25, (P, med, seed)


@pytest.mark.parametrize("P", [2, 4, 8, 16])
@pytest.mark.parametrize("S", [1024, 4096])
def test_single_document_closed_forms(S, P):
    # Causal, one document, L = S / P tokens a rank. Rank r's work is the sum of p + 1 over its
    # positions p. Contiguous: rank P-1 holds [(P-1)L, PL), work L^2 (P-1) + L(L+1)/2; the mean is
    # S(S+1)/(2P) = L(PL+1)/2, so max/mean = (L(2P-1) + 1) / (PL + 1) -> (2P-1)/P.
    # Striped: rank P-1 holds P-1+iP, work PL + P L(L-1)/2: max/mean = (PL + P) / (PL + 1).
    # Zigzag: chunks r and 2P-1-r of c = L/2 tokens, c^2 (2P-1) + c(c+1) on every rank: 1.
    cu = torch.tensor([0, S])
    L = S // P
    expected = {
        "contiguous": Fraction(L * (2 * P - 1) + 1, P * L + 1),
        "striped": Fraction(P * L + P, P * L + 1),
        "zigzag": Fraction(1),
    }
    for layout, ratio in expected.items():
        row = bb.measure(cu, S, P, layout, True, tile=128)
        assert Fraction(row["visible_max"] * P, row["visible_total"]) == ratio, layout
        assert row["visible_total"] == S * (S + 1) // 2
        assert row["max_over_mean"] == pytest.approx(float(ratio), rel=1e-12)
    # full mask, one document: every query sees S keys on every layout
    for layout in ("contiguous", "striped", "zigzag", "striped16"):
        row = bb.measure(cu, S, P, layout, False, tile=128)
        assert row["max_over_mean"] == 1.0 and row["visible_total"] == S * S
        assert row["tile_density"] == 1.0 and row["pace_efficiency"] == 1.0


def _dense(cu, S, P, layout, causal, tile):
    """Per rank: visible pairs and pairs in tiles that hold a visible pair, from an S x S mask."""
    p = torch.arange(S)
    d = bb.doc_ids(cu, p)
    mask = d[:, None] == d[None, :]
    if causal:
        mask &= p[:, None] >= p[None, :]
    pos = bb.rank_positions(bb.make_layout(layout), S, P)
    visible = torch.stack([mask[pos[r]].sum() for r in range(P)])
    computed = torch.zeros(P, dtype=torch.int64)
    n = S // P
    for r in range(P):
        for src in range(P):
            sub = mask[pos[r]][:, pos[src]]
            for i in range(0, n, tile):
                for j in range(0, n, tile):
                    blk = sub[i:i + tile, j:j + tile]
                    computed[r] += blk.numel() if bool(blk.any()) else 0
    return visible, computed


@pytest.mark.parametrize("S,P,tile,median", [(64, 4, 4, 3), (64, 4, 3, 6), (96, 4, 5, 2), (128, 8, 4, 5)])
def test_against_dense_mask(S, P, tile, median):
    """Visible pairs per rank, and pairs in computed tiles (also tiles that do not divide a shard),
    equal a brute-force count; the range rule never computes fewer, and on layouts whose tiles are
    runs of consecutive positions exactly as many."""
    runs = {"contiguous", "zigzag", f"striped{tile}"} if (S // (2 * P)) % tile == 0 else {"contiguous"}
    for seed in range(6):
        cu = bb.make_cu_seqlens(S, median, 1.5, seed)
        assert cu[0] == 0 and cu[-1] == S and bool((cu[1:] > cu[:-1]).all())
        for layout in ("contiguous", "striped", "striped2", f"striped{tile}", "zigzag"):
            lay = bb.make_layout(layout)
            if S % lay.multiple(P):
                continue
            for causal in (True, False):
                visible, computed = _dense(cu, S, P, layout, causal, tile)
                pos = bb.rank_positions(lay, S, P)
                docs = bb.doc_ids(cu, pos)
                work = bb.query_work(cu, S, causal)
                assert torch.equal(work[pos].sum(1), visible), (seed, layout, causal)
                exact = bb.computed_pairs_exact(pos, docs, causal, tile)
                assert torch.equal(exact, computed), (seed, layout, causal)
                ranges = bb.computed_pairs_ranges(pos, docs, causal, tile)
                assert bool((ranges >= exact).all())
                if layout in runs:
                    assert torch.equal(ranges, exact), (seed, layout, causal)
                row = bb.measure(cu, S, P, layout, causal, tile)
                assert row["visible_total"] == int(visible.sum())
                assert row["pace_efficiency"] == pytest.approx(int(visible.sum()) / (P * int(computed.max())))
                assert row["tile_density"] == pytest.approx(int(visible.sum()) / int(computed.sum()))


def test_packing_is_seeded_and_long_tailed():
    a = bb.make_cu_seqlens(131072, 1024, 1.5, seed=3)
    b = bb.make_cu_seqlens(131072, 1024, 1.5, seed=3)
    c = bb.make_cu_seqlens(131072, 1024, 1.5, seed=4)
    assert torch.equal(a, b) and not torch.equal(a, c)
    lens = (a[1:] - a[:-1])[:-1].double()  # the last document is cut
    assert 0.5 < lens.median().item() / 1024 < 2
    assert lens.mean().item() > 1.5 * lens.median().item()  # long right tail
