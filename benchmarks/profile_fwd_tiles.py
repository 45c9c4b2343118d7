"""One forward call per case for a profiler, or timed with the tile counts of its ranges.

Cases (H = 32, D = 128, bf16, causal; the kernels alone, as ``bench_sparse.py``'s
``ringflash-kernel`` and ``bench_masks.py`` call them):

* ``hash``: ``HashSparse`` with 8 random buckets at S = 32k, on inputs sorted per head beforehand;
* ``dense8``: dense causal over B = 8 sequences of 4k, the same visible work in tile-aligned pieces;
* ``docs``: 128k of log-normal documents (median 4k, seed 0), ``bench_masks.py``'s ``documents``.

    PYTHONPATH=. ncu --kernel-name regex:_attn_fwd_hopper --launch-skip 2 --launch-count 1 \\
        --section SpeedOfLight --section WarpStateStats --section InstructionStats \\
        python benchmarks/profile_fwd_tiles.py hash
    PYTHONPATH=. python benchmarks/profile_fwd_tiles.py hash --time    # medians of 20 CUDA-event timings

Without ``--time`` the forward runs three times (for ``--launch-skip 2``). With it, the script
prints the forward's query-tile items, the key tiles they walk and how many of those are boundary
(masked) tiles, from the ranges the call computed, then the fwd and fwd+bwd medians.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_masks import documents, ringflash_fns  # noqa: E402
from bench_sparse import kernel_fns  # noqa: E402

from ringflash import kernels  # noqa: E402
from ringflash.kernels import attention as katt  # noqa: E402
from ringflash.sparse import HashSparse  # noqa: E402

H, D = 32, 128
SEQLEN = {"hash": 32768, "dense8": 4096, "docs": 131072}


def case_fns(case: str):
    """(fwd / fwd+bwd callables, B * H) of a case."""
    g = torch.Generator(device="cuda").manual_seed(0)
    B, S = {"hash": 1, "dense8": 8, "docs": 1}[case], SEQLEN[case]
    q, k, v, do = (torch.randn(B, S, H, D, generator=g, device="cuda").bfloat16() for _ in range(4))
    if case == "docs":
        fns = ringflash_fns(kernels, q, k, v, do, "documents", documents(S), 4096)
        return {"fwd": fns["fwd"], "fwd+bwd": fns["fwdbwd"]}, B * H
    sp = None
    if case == "hash":
        qb, kb = (torch.randint(0, 8, (B, S, H), generator=g, device="cuda", dtype=torch.int32) for _ in range(2))
        sp = HashSparse(qb, kb, 8, checked=True)
    return kernel_fns(q, k, v, do, sp), B * H


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("case", choices=["hash", "dense8", "docs"])
    ap.add_argument("--time", action="store_true", help="tile counts and timings instead of a bare profile")
    args = ap.parse_args()
    fns, bh = case_fns(args.case)
    seen = {}
    orig = katt._tile_ranges

    def spy(*a, **kw):
        seen["ranges"] = orig(*a, **kw)
        return seen["ranges"]

    katt._tile_ranges = spy
    try:
        for _ in range(3):
            fns["fwd"]()
    finally:
        katt._tile_ranges = orig
    torch.cuda.synchronize()
    if not args.time:
        return
    cfg = katt.HOPPER_FWD_CONFIGS[D]
    block = cfg.block_n
    r = seen["ranges"].view(-1, 4).long()
    n_q = -(-SEQLEN[args.case] // cfg.block_m)
    reps = bh // (r.shape[0] // n_q)  # shared ranges are one (batch, head)'s; per-head ones every head's
    lo, flo, fhi, hi = r.unbind(1)
    n = ((hi - lo) // block).clamp(min=0)
    full = ((fhi - flo) // block).clamp(min=0)
    print(f"{args.case}: items {r.shape[0] * reps}, key tiles {int(n.sum()) * reps}, "
          f"boundary tiles {int((n - full).sum()) * reps}, mean tiles an item {n.float().mean():.2f}, "
          f"max {int(n.max())}")
    for name in ("fwd", "fwd+bwd"):
        times = []
        for _ in range(20):
            e0, e1 = torch.cuda.Event(True), torch.cuda.Event(True)
            e0.record()
            fns[name]()
            e1.record()
            torch.cuda.synchronize()
            times.append(e0.elapsed_time(e1))
        print(f"{args.case} {name} {statistics.median(times):.3f} ms")


if __name__ == "__main__":
    main()
