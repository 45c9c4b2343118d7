"""How many pairs the kernels compute for QK-dropping and hash calls, against the visible ones
(a CPU model: the kernels' own tile ranges, nothing timed).

    PYTHONPATH=. python benchmarks/model_token_tiles.py --out tiles.jsonl

For each length, mode and launch (the forward's tiles at D = 64 and D = 128, the dQ and the
dK/dV tiles of the backward): the per-head order and composite attributes as a call makes them,
then the tile ranges of every tile from ``_ranges_kernel`` under Triton's interpreter (the
kernels read the same ranges), and from them the tiles visited, the fully visible ones and the
pairs computed (rows x keys of every visited tile). ``tile_density`` = visible pairs / computed
pairs: the share of a launch's products that are visible. Its inverse bounds the work
efficiency of the kernels' main loop (time / dense time / density) from below, with dense causal
at the same length as the comparison (``dense_tile_density``). Random ids per head (B = 1 and
``--heads`` heads; the counts are per head, so a few heads give them).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are imported

import torch  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from ringflash import sparse  # noqa: E402
from ringflash.kernels import attention as katt  # noqa: E402

# (launch, config, by keys): the tiles each launch walks for these modes (GPU tables, bf16,
# causal; the dK/dV launch takes the masked table's 64 x 64 tiles at D = 128 and the plain
# table's, also 64 x 64, at D = 64).
LAUNCHES = (
    ("fwd D=64", katt.FWD_CONFIGS[64], False),
    ("fwd D=128 (Hopper)", katt.HOPPER_FWD_CONFIGS[128], False),
    ("dq D=64 and 128", katt.BWD_DQ_CONFIGS[64], False),
    ("dkdv D=64 and 128", katt.BWD_DKDV_MASKED_CONFIGS[128], True),
)


def parse_len(s: str) -> int:
    return int(s[:-1]) * 1024 if s.endswith("k") else int(s)


def modes(S: int, H: int, buckets, drops, seed: int):
    g = torch.Generator().manual_seed(seed)
    pos = torch.arange(S)
    for nb in buckets:
        qb, kb = (torch.randint(0, nb, (1, S, H), generator=g, dtype=torch.int32) for _ in range(2))
        yield f"hash:{nb}", sparse.HashSparse(qb, kb, nb, checked=True)
    for f in drops:
        yield f"qkdrop:{f:g}", sparse.QKDrop(sparse.keep_random(pos, 1, H, f, seed=seed),
                                             sparse.keep_random(pos, 1, H, f, seed=seed + 1))


def visible_pairs(mode) -> int:
    """Causal pairs the mode keeps, summed over heads (per bucket, or kept with kept)."""
    if isinstance(mode, sparse.HashSparse):
        return sum(int(((mode.q_buckets == c).int() * (mode.k_buckets == c).int().cumsum(1)).sum(dtype=torch.int64))
                   for c in range(mode.num_buckets))
    return int((mode.q_keep.int() * mode.k_keep.int().cumsum(1)).sum(dtype=torch.int64))


def computed(m, S: int, H: int, block_m: int, block_n: int, by_keys: bool, causal: bool = True) -> dict:
    """Tiles visited, fully visible tiles and pairs computed by one launch over ``m``'s attributes."""
    ranges = katt._tile_ranges(m, causal, S, S, block_m, block_n, by_keys=by_keys, device=torch.device("cpu"),
                               heads=(1, H, 1)).to(torch.int64)
    lo, flo, fhi, hi = ranges.unbind(-1)
    own, step = (block_n, block_m) if by_keys else (block_m, block_n)
    rows = torch.clamp(S - torch.arange(0, S, own), max=own)  # the tile's own rows (or key columns)
    span = torch.clamp(torch.clamp(hi, max=S) - lo, min=0)
    return dict(tiles=int(((span + step - 1) // step).sum()), full_tiles=int(((fhi - flo) // step).clamp(min=0).sum()),
                computed=int((rows * span).sum()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seqlens", nargs="+", default=["8k", "16k", "32k"])
    ap.add_argument("--heads", type=int, default=2)
    ap.add_argument("--hash-buckets", nargs="+", type=int, default=[4, 8, 16])
    ap.add_argument("--qkdrop", nargs="+", type=float, default=[0.5, 0.7])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    assert katt.BWD_DKDV_CONFIGS[64][:2] == katt.BWD_DKDV_MASKED_CONFIGS[128][:2]
    rows = []
    print(f"{'S':>6} {'mode':>11} {'launch':>26} {'density':>8} {'tile density':>12} {'dense causal':>12} "
          f"{'tiles':>8} {'full':>6}")
    for S in map(parse_len, a.seqlens):
        H = a.heads
        pos = torch.arange(S)
        causal_pairs = H * S * (S + 1) // 2
        dense_m = katt._mask_args(pos, pos, True, None, None, None, S, S, torch.device("cpu"))
        dense = {name: computed(dense_m, S, 1, c.block_m, c.block_n, bk) for name, c, bk in LAUNCHES}
        for name, mode in modes(S, H, a.hash_buckets, a.qkdrop, a.seed):
            q_c, k_c = sparse.composite_positions(mode, pos, pos, None, None, 1)
            q_c, k_c = torch.sort(q_c, -1).values, torch.sort(k_c, -1).values
            q_d, k_d = (q_c >> sparse.POS_BITS).to(torch.int32), (k_c >> sparse.POS_BITS).to(torch.int32)
            m = katt._mask_args(q_c, k_c, True, None, q_d, k_d, S, S, torch.device("cpu"), shape=(1, H, H))
            vis = visible_pairs(mode)
            for launch, cfg, by_keys in LAUNCHES:
                c = computed(m, S, H, cfg.block_m, cfg.block_n, by_keys)
                d = dense[launch]
                r = dict(S=S, heads=H, mode=name, launch=launch, block_m=cfg.block_m, block_n=cfg.block_n,
                         density=vis / causal_pairs, visible=vis, **c, tile_density=vis / c["computed"],
                         dense_tile_density=(S * (S + 1) // 2) / d["computed"])
                rows.append(r)
                print(f"{S:6d} {name:>11} {launch:>26} {r['density']:8.4f} {r['tile_density']:12.3f} "
                      f"{r['dense_tile_density']:12.3f} {c['tiles']:8d} {c['full_tiles']:6d}", flush=True)
    if a.out:
        with open(a.out, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)


if __name__ == "__main__":
    main()
