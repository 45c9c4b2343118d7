"""Sparse attention through the ring across GPUs, beside dense causal on the same layout.

    torchrun --nproc-per-node 4 benchmarks/bench_ring_sparse.py --seqlens 128k \
        --out benchmarks/results/ring_sparse_h100x4.jsonl

For every (S, heads_kv, mode, layout) it times ring_attention in the same run: dense causal (the
bar), then each sparse setting (all causal):

  hash:B    hash-bucket attention with random bucket ids (seeded per global position and head,
            so every layout and world size sees the same ids)
  qkdrop:F  QK-dropping with ``sparse.keep_random`` flags (a fraction F of queries and of keys
            dropped per head)
  block:... a block pattern of ``sparse.block_pattern`` (``--block-size``, local / global /
            random blocks), given as the global BlockSparse

Layouts are names (``contiguous``, ``striped``, ``zigzag``) or ``striped:N`` for stripes of N
tokens (``Striped(stripe=N)``: stripes of the block size keep block patterns' tiles exact).

Visible (query, key) pairs are counted exactly on the global masks (summed over query heads);
``density`` is their share of the causal pairs, ``speedup`` the dense time of the same layout,
S, Hkv and mode over the sparse time, and ``efficiency`` = speedup x density (1: time in
proportion to the visible work). TFLOP/s per GPU count visible pairs only (``4 * D * pairs``
forward, 3.5 times that for fwd+bwd, over the GPUs). Times as in ``bench_ring.py``: the median over
iterations on each rank, then the slowest rank. One JSON object per line (rank 0 appends to
``--out``).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_ring import add_run_args, init_nccl, local_shards, nccl_env, parse_size, peak_gib, result_row, step_fn, time_ms  # noqa: E402
import bench_ring  # noqa: E402
from ringflash import Striped, get_layout, ring_attention, sparse  # noqa: E402


def layout_of(name: str):
    """A layout from its name, or ``striped:N`` for ``Striped(stripe=N)``."""
    if name.startswith("striped:"):
        return Striped(int(name.split(":", 1)[1]))
    return get_layout(name)


def _ids(S: int, heads: int, buckets: int, seed: int, device) -> torch.Tensor:
    """(1, S, heads) int32 bucket ids, the same on every rank (a seeded generator on the CPU)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, buckets, (1, S, heads), generator=g, dtype=torch.int32).to(device)


def _causal_matches(q_attr: torch.Tensor, k_attr: torch.Tensor, values: int, group: int) -> int:
    """Pairs (i, j), j <= i, with ``k_attr[j] == q_attr[i]`` summed over query heads (a query
    head reads K/V head ``h // group``); attributes (S, heads) in ``[0, values)``."""
    total = 0
    for h in range(q_attr.shape[1]):
        k = k_attr[:, h // group].long()
        seen = torch.nn.functional.one_hot(k, values).cumsum(0)  # (S, values): keys so far per value
        total += int(seen.gather(1, q_attr[:, h].long()[:, None]).sum())
    return total


def _block_pairs(pattern: sparse.BlockSparse, S: int) -> int:
    """Visible causal pairs of one head under a block pattern over ``S`` tokens."""
    bs = pattern.block_size
    kept = torch.tril(pattern.pattern.bool())
    diagonal = int(kept.diagonal().sum())
    return (int(kept.sum()) - diagonal) * bs * bs + diagonal * bs * (bs + 1) // 2


def sparsity_for(spec: str, S: int, H: int, Hkv: int, layout, rank: int, world: int, device, args):
    """(this rank's ``sparsity=`` argument, visible pairs over the whole sequence and every query
    head) for a setting ``hash:B``, ``qkdrop:F`` or ``block:...`` (see the module docstring)."""
    kind, _, value = spec.partition(":")
    group = H // Hkv
    pos = layout.positions(S, rank=rank, world_size=world, device=device)
    if kind == "hash":
        nb = int(value)
        qb, kb = _ids(S, H, nb, args.seed, device), _ids(S, Hkv, nb, args.seed + 1, device)
        local = sparse.HashSparse(qb[:, pos].contiguous(), kb[:, pos].contiguous(), nb, checked=True)
        return local, _causal_matches(qb[0].cpu(), kb[0].cpu(), nb, group)
    if kind == "qkdrop":
        frac = float(value)
        every = torch.arange(S, device=device)
        qk = sparse.keep_random(every, 1, H, frac, seed=args.seed)
        kk = sparse.keep_random(every, 1, Hkv, frac, seed=args.seed + 1)
        local = sparse.QKDrop(qk[:, pos].contiguous(), kk[:, pos].contiguous())
        return local, _kept_pairs(qk[0].cpu(), kk[0].cpu(), group)
    if kind == "block":
        pattern = sparse.block_pattern(S, args.block_size, local=args.block_local, global_=args.block_global,
                                       random=args.block_random, seed=args.seed)
        return pattern, _block_pairs(pattern, S) * H
    raise ValueError(f"unknown sparse setting {spec!r}: hash:B, qkdrop:F or block")


def _kept_pairs(qk: torch.Tensor, kk: torch.Tensor, group: int) -> int:
    """Pairs (i, j), j <= i, of a kept query and a kept key, summed over query heads."""
    total = 0
    for h in range(qk.shape[1]):
        kept_keys = kk[:, h // group].long().cumsum(0)
        total += int(kept_keys[qk[:, h]].sum())
    return total


def bench_one(S, H, Hkv, D, mode, layout, sp, args):
    q, k, v = local_shards(S, H, Hkv, D)
    fn = step_fn(lambda a, b, c: ring_attention(a, b, c, causal=True, layout=layout, sparsity=sp), q, k, v, mode)
    return time_ms(fn, args.warmup, args.iters), peak_gib()


def settings(args) -> list[str]:
    out = [f"hash:{b}" for b in args.hash_buckets] + [f"qkdrop:{f}" for f in args.qkdrop]
    if args.block:
        out.append("block")
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seqlens", nargs="+", default=["128k"])
    ap.add_argument("--layouts", nargs="+", default=["zigzag", "striped", "striped:128"])
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, nargs="+", default=[8])
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--modes", nargs="+", default=["fwd", "fwdbwd"], choices=["fwd", "fwdbwd"])
    ap.add_argument("--hash-buckets", type=int, nargs="*", default=[8])
    ap.add_argument("--qkdrop", type=float, nargs="*", default=[0.5])
    ap.add_argument("--no-block", dest="block", action="store_false", help="skip the block pattern")
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--block-local", type=int, default=8)
    ap.add_argument("--block-global", type=int, default=1)
    ap.add_argument("--block-random", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    add_run_args(ap)
    args = ap.parse_args()
    bench_ring.HOST_LEAD_US = args.host_lead_us

    P, rank, gpu = init_nccl()
    env = nccl_env()
    rows = []
    for S in map(parse_size, args.seqlens):
        causal_pairs = S * (S + 1) // 2 * args.heads
        for Hkv in args.kv_heads:
            for mode in args.modes:
                for name in args.layouts:
                    layout = layout_of(name)
                    dense_ms = None
                    for spec in ["dense", *settings(args)]:
                        row = dict(impl="ringflash", gpu=gpu, world=P, layout=name, S=S, H=args.heads, Hkv=Hkv,
                                   D=args.head_dim, mode=mode, mask="causal" if spec == "dense" else spec.split(":")[0],
                                   sparsity=spec, host_lead_us=args.host_lead_us)
                        if spec == "block":
                            row["sparsity"] = (f"block:size={args.block_size},local={args.block_local},"
                                               f"global={args.block_global},random={args.block_random}")
                        if env:
                            row["nccl_env"] = env
                        with result_row(row, rows, rank, args.out):
                            if spec == "dense":
                                sp, vis = None, causal_pairs
                            else:
                                sp, vis = sparsity_for(spec, S, args.heads, Hkv, layout, rank, P, "cuda", args)
                            ms, mem = bench_one(S, args.heads, Hkv, args.head_dim, mode, layout, sp, args)
                            tf = 4 * args.head_dim * vis * (3.5 if mode == "fwdbwd" else 1.0) / P / (ms * 1e-3) / 1e12
                            row.update(ms=round(ms, 3), visible_pairs=vis, density=round(vis / causal_pairs, 4),
                                       tflops_visible_per_gpu=round(tf, 1), peak_mem_gib=round(mem, 2))
                            if spec == "dense":
                                dense_ms = ms
                            elif dense_ms is not None:
                                row["speedup"] = round(dense_ms / ms, 3)
                                row["efficiency"] = round(dense_ms / ms * vis / causal_pairs, 3)
    if rank == 0:
        print(f"\n{'layout':12s} {'sparsity':40s} {'S':>7s} {'Hkv':>4s} {'mode':>7s} {'ms':>9s} {'density':>8s} "
              f"{'speedup':>8s} {'effic.':>7s} {'TFLOP/s vis/GPU':>15s}")
        for r in rows:
            if "error" in r:
                print(f"{r['layout']:12s} {r['sparsity']:40s} {r['S']:>7d} {r['Hkv']:>4d} {r['mode']:>7s}  {r['error']}")
                continue
            print(f"{r['layout']:12s} {r['sparsity']:40s} {r['S']:>7d} {r['Hkv']:>4d} {r['mode']:>7s} {r['ms']:9.2f} "
                  f"{r['density']:8.3f} {r.get('speedup', float('nan')):8.2f} {r.get('efficiency', float('nan')):7.2f} "
                  f"{r['tflops_visible_per_gpu']:15.1f}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
