"""Per-rank work balance of the layouts for packed documents (CPU model, no attention is run).

    python benchmarks/bench_balance.py --out benchmarks/results/balance_cpu/balance.jsonl
    python benchmarks/bench_balance.py --quick          # a tiny grid, a few seconds

The mask is the document rule of DESIGN.md ("Masks beyond causal"): a query at global position
``p`` sees a key at ``k`` iff both lie in the same document (``cu[d] <= p < cu[d+1]``) and, when
causal, ``p >= k``. Documents are drawn per seed from a log-normal length distribution (median
``--medians``, log-space sigma ``--sigma``), clipped to ``[1, S]`` and packed until ``S`` tokens are
filled; the last document is cut to fit.

Measured per (layout, P, S, causal, median, seed), with each rank's global positions taken from
``ringflash.layout`` (``get_layout(name).positions`` and ``Striped(stripe=w)``):

* ``max_over_mean``: the visible (query, key) pairs of the queries a rank holds, over every key of
  the sequence (the rank's work summed over all ring steps), max over ranks / mean over ranks.
  Per query in closed form: causal ``p - cu[doc(p)] + 1``, full ``len(doc(p))``. The ring runs at
  the pace of its slowest rank, so this is the slowdown against a perfectly balanced split.
* ``tile_density``: ``--tile`` x ``--tile`` tiles of each rank's local order (queries of rank ``r``
  against keys of rank ``src``, every ring step); a tile is computed iff it holds a visible pair
  (so a step with none is skipped). Density = visible pairs / pairs in computed tiles, over every
  rank and step. ``tile_density_ranges`` is the same with the kernel's rule from per-tile ranges
  (a tile is computed iff its document-id ranges overlap and, causal, its last query position is
  at least its first key position): identical wherever a tile is a run of consecutive positions
  (contiguous, zigzag, stripes that are multiples of the tile); for narrow stripes, whose tiles
  step over positions, it can compute tiles with no visible pair (documents shorter than P, or
  boundaries where the ranges overlap but the positions do not reach each other). The printed
  line says how often that happened.
* ``pace_efficiency``: total visible pairs / (P x the max over ranks of the pairs a rank computes),
  with computed tiles as in ``tile_density`` (``pace_efficiency_ranges``: the range rule).

Printed: a table per metric and (S, mask), rows = layouts, columns = (median, P), cells = min-max
over the seeds; a line comparing the range rule with the exact count; a markdown summary.

Nothing is S x S: visible pairs come per query in closed form; tiles are counted from the pieces
(tile, document) of each rank's local order, with their first/last positions (every layout's local
positions are increasing and its document ids non-decreasing, so a document's tokens are a run of
each rank's order), by searches over those pieces: O(P^2 (S / (P * tile) + documents)) per
configuration. The default grid takes well under two minutes on two cores.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import defaultdict

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from ringflash.layout import Striped, get_layout  # noqa: E402

DEFAULT_OUT = os.path.join(os.path.dirname(__file__), "results", "balance_cpu", "balance.jsonl")


def parse_size(s: str) -> int:
    """'128k' -> 131072, '1m' -> 1048576, '1000' -> 1000."""
    s = str(s).strip().lower()
    mult = {"k": 1024, "m": 1024 * 1024}.get(s[-1:], 1)
    return int(s[:-1] if mult > 1 else s) * mult


def fmt_size(n: int) -> str:
    for unit, m in (("m", 1024 * 1024), ("k", 1024)):
        if n % m == 0:
            return f"{n // m}{unit}"
    return str(n)


# -- documents ---------------------------------------------------------------------------------


def make_cu_seqlens(seqlen: int, median: float, sigma: float, seed: int) -> torch.Tensor:
    """Boundaries ``[0, end_0, ..., seqlen]`` of documents packed into ``seqlen`` tokens.

    Lengths are log-normal (median ``median``, sigma ``sigma`` of the log), rounded, clipped to
    ``[1, seqlen]``; documents are packed until ``seqlen`` is filled and the last one is cut.
    """
    rng = np.random.default_rng(seed)
    lengths: list[np.ndarray] = []
    total = 0
    while total < seqlen:
        n = max(16, int(2 * (seqlen - total) / median) + 1)
        x = np.rint(rng.lognormal(np.log(median), sigma, size=n)).astype(np.int64)
        x = np.clip(x, 1, seqlen)
        lengths.append(x)
        total += int(x.sum())
    lens = np.concatenate(lengths)
    ends = np.cumsum(lens)
    n_docs = int(np.searchsorted(ends, seqlen, side="left")) + 1  # the first doc that reaches seqlen
    ends = ends[:n_docs]
    ends[-1] = seqlen
    return torch.from_numpy(np.concatenate([[0], ends]).astype(np.int64))


def doc_ids(cu: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Document of each position: ``d`` with ``cu[d] <= p < cu[d+1]``."""
    return torch.searchsorted(cu, pos, right=True) - 1


def query_work(cu: torch.Tensor, seqlen: int, causal: bool) -> torch.Tensor:
    """Visible keys of every query position (closed form), int64 of length ``seqlen``."""
    p = torch.arange(seqlen)
    d = doc_ids(cu, p)
    if causal:
        return p - cu[d] + 1
    return cu[d + 1] - cu[d]


# -- layouts -----------------------------------------------------------------------------------


def make_layout(name: str):
    """'contiguous', 'zigzag', 'striped' (stripe 1) or 'stripedW' (``Striped(stripe=W)``)."""
    if name.startswith("striped") and name != "striped":
        return Striped(stripe=int(name[len("striped"):]))
    return get_layout(name)


def rank_positions(layout, seqlen: int, world: int) -> torch.Tensor:
    """(world, seqlen // world) global positions, row r = rank r's local order (the library's map)."""
    return torch.stack([layout.positions(seqlen, rank=r, world_size=world) for r in range(world)])


# -- tiles -------------------------------------------------------------------------------------


def _tile_bounds(n: int, tile: int) -> tuple[torch.Tensor, torch.Tensor]:
    starts = torch.arange(0, n, tile)
    ends = torch.clamp(starts + tile, max=n)  # exclusive
    return starts, ends


def computed_pairs_ranges(pos: torch.Tensor, docs: torch.Tensor, causal: bool, tile: int) -> torch.Tensor:
    """Pairs rank r computes over all steps, with tiles classified from per-tile ranges.

    Key tile ``j`` of rank ``src`` is computed for query tile ``i`` of rank ``r`` iff
    ``kdoc_last[j] >= qdoc_first[i]`` (a suffix of ``j``), ``kdoc_first[j] <= qdoc_last[i]`` and,
    causal, ``kpos_first[j] <= qpos_last[i]`` (prefixes of ``j``): a range of ``j`` per query tile.
    Returns (P,) int64.
    """
    world, n = pos.shape
    starts, ends = _tile_bounds(n, tile)
    sizes = ends - starts
    csum = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(sizes, 0)])
    pf, pl = pos[:, starts], pos[:, ends - 1]
    df, dl = docs[:, starts], docs[:, ends - 1]
    out = torch.zeros(world, dtype=torch.int64)
    for src in range(world):
        j0 = torch.searchsorted(dl[src].contiguous(), df.contiguous(), right=False)
        j1 = torch.searchsorted(df[src].contiguous(), dl.contiguous(), right=True)
        if causal:
            j1 = torch.minimum(j1, torch.searchsorted(pf[src].contiguous(), pl.contiguous(), right=True))
        j1 = torch.maximum(j1, j0)
        out += (sizes[None, :] * (csum[j1] - csum[j0])).sum(1)
    return out


def _runs(pos: torch.Tensor, docs: torch.Tensor, tile: int):
    """Pieces of (rank, local tile, document) along each rank's local order: a piece is the tokens
    of one tile in one document. Positions increase and document ids do not decrease along every
    rank's order, so each piece is a run of consecutive local indices.

    Returns per piece (flattened over ranks, ordered by rank, tile, document): rank, tile, doc,
    first and last global position."""
    world, n = pos.shape
    t = torch.arange(n).div(tile, rounding_mode="floor").expand(world, n)
    r = torch.arange(world)[:, None].expand(world, n)
    key = (r * (n // tile + 1) + t) * (int(docs.max()) + 1) + docs  # non-decreasing along the flattened order
    key = key.reshape(-1)
    change = torch.ones_like(key, dtype=torch.bool)
    change[1:] = key[1:] != key[:-1]
    first = torch.nonzero(change).squeeze(1)
    last = torch.cat([first[1:], torch.tensor([key.numel()])]) - 1
    flat_pos, flat_doc = pos.reshape(-1), docs.reshape(-1)
    return (r.reshape(-1)[first], t.reshape(-1)[first], flat_doc[first], flat_pos[first], flat_pos[last])


def computed_pairs_exact(pos: torch.Tensor, docs: torch.Tensor, causal: bool, tile: int) -> torch.Tensor:
    """Pairs rank r computes over all steps, a tile computed iff it holds a visible pair.

    Query piece (tile ``i`` of rank ``r``, document ``d``, last position ``ql``) sees, among rank
    ``src``'s pieces of ``d`` (consecutive key tiles), those whose first position is ``<= ql``
    (causal; all of them for the full mask): an interval of key tiles. Along a query tile's pieces
    both ends of these intervals do not decrease, so the key tiles the query tile computes are the
    tiles of each interval past the furthest reached by its earlier pieces. The cost is
    O(P^2 (S / (P * tile) + documents)) per configuration. Returns (P,) int64.
    """
    world, n = pos.shape
    starts, ends = _tile_bounds(n, tile)
    n_tiles = len(starts)
    sizes = ends - starts
    csum = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(sizes, 0)])
    rank, qt, qd, qf, ql = _runs(pos, docs, tile)
    gtile = rank * n_tiles + qt  # query tile, unique over ranks; non-decreasing along the pieces
    out = torch.zeros(world, dtype=torch.int64)
    for src in range(world):
        sel = rank == src
        kt, kd, kf = qt[sel], qd[sel], qf[sel]  # src's pieces, in its local order
        lo = torch.searchsorted(kd, qd, right=False)  # src's first piece of document d
        hi = torch.searchsorted(kd, qd, right=True)  # past its last
        if causal:
            hi = torch.minimum(hi, torch.maximum(lo, torch.searchsorted(kf, ql, right=True)))
        nonempty = hi > lo
        ta = kt[lo.clamp(max=kt.numel() - 1)]
        tb = torch.where(nonempty, kt[(hi - 1).clamp(min=0)], torch.full_like(hi, -1))
        # furthest key tile reached by the earlier pieces of the same query tile: a running max
        # made segmented by an offset per query tile (tiles are non-decreasing along the pieces)
        big = n_tiles + 2
        reach = torch.cummax(tb + gtile * big, dim=0).values
        prev = torch.cat([torch.tensor([-1]), reach[:-1] - gtile[1:] * big])  # < 0 on a tile's first piece
        first_new = torch.maximum(ta, prev + 1)
        has_new = nonempty & (tb >= first_new)
        first_new = torch.where(has_new, first_new, torch.zeros_like(first_new))
        last = torch.where(has_new, tb, torch.full_like(tb, -1))
        kpairs = csum[last + 1] - csum[first_new]  # key tokens in the newly computed tiles
        out.index_add_(0, rank, kpairs * sizes[qt])
    return out


# -- one configuration -------------------------------------------------------------------------


def measure(cu: torch.Tensor, seqlen: int, world: int, layout_name: str, causal: bool, tile: int,
            work: torch.Tensor | None = None, doc_of: torch.Tensor | None = None) -> dict:
    """Balance and tile statistics of one layout on one packing (``work``: :func:`query_work`,
    ``doc_of``: the document of every position, both computed here when not given)."""
    layout = make_layout(layout_name)
    if work is None:
        work = query_work(cu, seqlen, causal)
    if doc_of is None:
        doc_of = doc_ids(cu, torch.arange(seqlen))
    pos = rank_positions(layout, seqlen, world)
    docs = doc_of[pos]
    visible = work[pos].sum(1)  # (P,)
    total = int(visible.sum())
    row = dict(
        layout=layout_name,
        stripe=getattr(layout, "stripe", None),
        P=world,
        S=seqlen,
        causal=causal,
        max_over_mean=float(visible.max()) * world / total,
        min_over_mean=float(visible.min()) * world / total,
        visible_total=total,
        visible_max=int(visible.max()),
        tile=tile,
    )
    comp = computed_pairs_exact(pos, docs, causal, tile)
    comp_r = computed_pairs_ranges(pos, docs, causal, tile)
    row.update(
        tile_density=total / float(comp.sum()),
        pace_efficiency=total / (world * float(comp.max())),
        computed_total=int(comp.sum()),
        computed_max=int(comp.max()),
        tile_density_ranges=total / float(comp_r.sum()),
        pace_efficiency_ranges=total / (world * float(comp_r.max())),
        computed_total_ranges=int(comp_r.sum()),
        computed_max_ranges=int(comp_r.max()),
    )
    return row


# -- grid and tables ---------------------------------------------------------------------------


def grid(args):
    if args.quick:
        return dict(sizes=[32768], worlds=[4, 8], medians=[512, 4096], seeds=[0, 1, 2],
                    causals=[True, False])
    return dict(sizes=[parse_size(s) for s in args.sizes], worlds=args.worlds, medians=args.medians,
                seeds=list(range(args.seeds)), causals=[True, False])


def run(args) -> tuple[list[dict], list[str], dict]:
    g = grid(args)
    layouts = ["contiguous", "striped"] + [f"striped{w}" for w in args.stripes] + ["zigzag"]
    rows = []
    for seqlen in g["sizes"]:
        for median in g["medians"]:
            for seed in g["seeds"]:
                cu = make_cu_seqlens(seqlen, median, args.sigma, seed)
                lens = cu[1:] - cu[:-1]
                doc_of = doc_ids(cu, torch.arange(seqlen))
                for causal in g["causals"]:
                    work = query_work(cu, seqlen, causal)
                    for world in g["worlds"]:
                        for name in layouts:
                            row = measure(cu, seqlen, world, name, causal, args.tile, work=work,
                                          doc_of=doc_of)
                            row.update(median_doc=median, sigma=args.sigma, seed=seed,
                                       n_docs=len(lens), longest_doc=int(lens.max()))
                            rows.append(row)
    return rows, layouts, g


def _rng(vals, nd=2) -> str:
    lo, hi = min(vals), max(vals)
    a, b = f"{lo:.{nd}f}", f"{hi:.{nd}f}"
    return a if a == b else f"{a}-{b}"


def tables(rows, layouts, g, metric: str, title: str) -> str:
    """One block per (causal, S): rows = layouts, columns = (median, P), cells min-max over seeds."""
    by = defaultdict(list)
    for r in rows:
        by[(r["causal"], r["S"], r["median_doc"], r["P"], r["layout"])].append(r[metric])
    cols = [(m, p) for m in g["medians"] for p in g["worlds"]]
    out = [title]
    for causal in g["causals"]:
        for seqlen in g["sizes"]:
            head = f"S={fmt_size(seqlen)} {'causal' if causal else 'full'}"
            hdr = f"{head:<22s}" + "".join(f"{'m' + fmt_size(m) + ' P=' + str(p):>12s}" for m, p in cols)
            out += ["", hdr, "-" * len(hdr)]
            for name in layouts:
                cells = [_rng(by[(causal, seqlen, m, p, name)]) for m, p in cols]
                out.append(f"{name:<22s}" + "".join(f"{c:>12s}" for c in cells))
    return "\n".join(out)


def summary_markdown(rows, layouts, g, worlds) -> str:
    """A compact table per layout for the given world sizes: causal max/mean, full max/mean (at the
    largest), causal tile density per median (at the largest) and causal pace efficiency; cells are
    min-max over S, medians and seeds."""
    big = worlds[-1]
    meds = g["medians"]

    def cell(metric, causal, world, median=None):
        return _rng([r[metric] for r in rows if r["layout"] == name and r["causal"] == causal
                     and r["P"] == world and (median is None or r["median_doc"] == median)])

    cols = ([f"max/mean causal, P={p}" for p in worlds] + [f"max/mean full, P={big}"]
            + [f"tile density, P={big}, median {'; '.join(fmt_size(m) for m in meds)}"]
            + [f"pace efficiency, P={p}" for p in worlds])
    lines = ["| layout | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name in layouts:
        cells = [cell("max_over_mean", True, p) for p in worlds] + [cell("max_over_mean", False, big)]
        cells.append("; ".join(cell("tile_density", True, big, m) for m in meds))
        cells += [cell("pace_efficiency", True, p) for p in worlds]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _approx(n: int) -> str:
    return f"{n / 1024:.1f}k" if n >= 1024 else str(n)


def packing_note(rows, g) -> str:
    parts = []
    for seqlen in g["sizes"]:
        for m in g["medians"]:
            sel = [r for r in rows if r["S"] == seqlen and r["median_doc"] == m]
            n = [r["n_docs"] for r in sel]
            longest = [r["longest_doc"] for r in sel]
            parts.append(f"S={fmt_size(seqlen)} median {fmt_size(m)}: {min(n)}-{max(n)} documents, "
                         f"longest {_approx(min(longest))}-{_approx(max(longest))} tokens")
    return "Packings (over the seeds): " + "; ".join(parts) + "."


def range_rule_note(rows) -> str:
    same = sum(r["computed_total_ranges"] == r["computed_total"] and r["computed_max_ranges"] == r["computed_max"]
               for r in rows)
    excess = max(r["computed_total_ranges"] / r["computed_total"] - 1 for r in rows)
    return (f"Range rule (a tile is computed iff its document-id ranges overlap and, causal, its last query "
            f"position >= its first key position): the same computed pairs as the exact count in {same} of "
            f"{len(rows)} configurations; largest excess {100 * excess:.3f}% (fields *_ranges).")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=["128k", "512k"], help="global sequence lengths")
    ap.add_argument("--worlds", type=int, nargs="+", default=[2, 4, 8, 16], help="ranks P")
    ap.add_argument("--medians", type=int, nargs="+", default=[1024, 8192], help="median document lengths")
    ap.add_argument("--sigma", type=float, default=1.5, help="sigma of log(document length)")
    ap.add_argument("--seeds", type=int, default=5, help="seeds 0..N-1")
    ap.add_argument("--stripes", type=int, nargs="+", default=[16, 128], help="extra Striped(stripe=w)")
    ap.add_argument("--tile", type=int, default=128)
    ap.add_argument("--quick", action="store_true", help="a tiny grid (S=32k, P=4,8, 3 seeds)")
    ap.add_argument("--summary-worlds", type=int, nargs="+", default=None,
                    help="world sizes of the summary table (default 4 and the largest)")
    ap.add_argument("--out", default=DEFAULT_OUT, help="JSON lines (overwritten); '' for none")
    ap.add_argument("--txt", default=None, help="also write the printed tables here")
    args = ap.parse_args(argv)

    # Many small tensor ops: one thread is several times faster than a pool (far more on a busy
    # machine, where every op waits for its threads to wake).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        t0 = time.perf_counter()
        rows, layouts, g = run(args)
        elapsed = time.perf_counter() - t0
    finally:
        torch.set_num_threads(threads)
    n_seeds = len(g["seeds"])
    ws = g["worlds"]
    summary_worlds = args.summary_worlds or ([4, ws[-1]] if 4 in ws and ws[-1] != 4 else sorted({ws[0], ws[-1]}))
    text = "\n\n".join([
        f"Packed documents: log-normal lengths (sigma {args.sigma}), medians "
        f"{', '.join(fmt_size(m) for m in g['medians'])}; seeds {g['seeds'][0]}..{g['seeds'][-1]}; "
        f"cells are min-max over the {n_seeds} seeds.\n" + packing_note(rows, g),
        tables(rows, layouts, g, "max_over_mean",
               "Balance: visible pairs per rank, max over ranks / mean over ranks (1.00 = balanced)"),
        tables(rows, layouts, g, "tile_density",
               f"Tile density: visible / computed pairs, {args.tile}x{args.tile} tiles of the local "
               f"order, every rank and step (a tile is computed iff it holds a visible pair)"),
        tables(rows, layouts, g, "pace_efficiency",
               "Pace efficiency: total visible pairs / (P x max over ranks of computed pairs)"),
        range_rule_note(rows),
        "Summary (cells min-max over S, medians and seeds):\n\n"
        + summary_markdown(rows, layouts, g, summary_worlds),
        f"{len(rows)} configurations in {elapsed:.1f} s",
    ])
    print(text)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    if args.txt:
        with open(args.txt, "w") as f:
            f.write(text + "\n")
    return rows


if __name__ == "__main__":
    main()
