"""Packed documents and sliding windows through the ring across GPUs, beside dense causal and
PyTorch's context parallel on the same mask as a FlexAttention BlockMask.

    torchrun --nproc-per-node 4 benchmarks/bench_ring_masks.py --seqlens 128k 512k \
        --out benchmarks/results/ring_masks_h200x4.jsonl

For every (S, heads_kv, mode) it times, in the same run:
  ringflash  ring_attention for each layout and mask: ``causal`` (dense, the bar), ``documents``
             (long-tailed document lengths packed into S: log-normal, median ``--doc-median``,
             seeded, the generator of ``bench_masks.py``) and ``window`` (causal, each query
             sees itself and the ``--window`` keys before it)
  torch_cp   PyTorch's context parallel with ``flex_attention`` (``torch.compile``d) on the same
             mask as a BlockMask: it all-gathers K/V over the group (``_ContextParallel`` with
             ``AttentionType.FLEX``), contiguous shards; ``causal`` too, on the same path

TFLOP/s per GPU count visible (query, key) pairs only: ``4 * D * H * pairs`` forward, 3.5 times
that for fwd+bwd, divided by the GPUs (``tflops_visible_per_gpu``); ``of_dense`` is a masked row's
rate over the ringflash striped dense-causal rate of the same S, Hkv and mode. ``hops`` is the
number of K/V (and dK/dV) exchanges of one ringflash call on each rank (the same on every rank):
a window the shard holds needs one hop forward on contiguous, not P - 1. Times as in
``bench_ring.py``: the median over iterations on each rank, then the slowest rank; peak memory the
largest ``max_memory_allocated`` over ranks. One JSON object per line (rank 0 appends to ``--out``).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_masks import documents, visible_pairs  # noqa: E402
from bench_ring import (add_run_args, init_nccl, local_shards, nccl_env, parse_size, peak_gib, result_row,  # noqa: E402
                        step_fn, time_ms)
import bench_ring  # noqa: E402
from ringflash import get_layout, ring_attention  # noqa: E402
from ringflash.comm import Ring  # noqa: E402

MASKS = ("causal", "documents", "window")


def mask_kwargs(mask: str, S: int, args) -> dict:
    """ring_attention's mask arguments for ``mask`` over ``S`` tokens (always causal)."""
    if mask == "documents":
        return dict(cu_seqlens=documents(S, seed=args.doc_seed, median=args.doc_median))
    if mask == "window":
        return dict(window=(args.window, 0))
    return {}


def pairs(mask: str, S: int, kw: dict, args) -> int:
    """Visible (query, key) pairs of the whole sequence under ``mask``."""
    return visible_pairs(mask, S, kw.get("cu_seqlens"), args.window)


@contextlib.contextmanager
def counted_exchanges():
    """Within: every ``Ring.exchange`` is counted (``box[0]``)."""
    box = [0]
    real = Ring.exchange

    def exchange(self, *a, **kw):
        box[0] += 1
        return real(self, *a, **kw)

    Ring.exchange = exchange
    try:
        yield box
    finally:
        Ring.exchange = real


def ring_hops(q, k, v, layout, kw: dict, mode: str) -> int:
    """The exchanges of one ring_attention call (and its backward, for fwdbwd) on this rank."""
    q, k, v = (x.detach().requires_grad_(mode == "fwdbwd") for x in (q, k, v))
    with counted_exchanges() as box:
        out = ring_attention(q, k, v, causal=True, layout=layout, **kw)
        if mode == "fwdbwd":
            out.backward(torch.ones_like(out))
    return box[0]


def bench_ringflash(S, H, Hkv, D, mode, layout, kw, args):
    q, k, v = local_shards(S, H, Hkv, D)
    lay = get_layout(layout)
    hops = ring_hops(q, k, v, lay, kw, mode)
    fn = step_fn(lambda a, b, c: ring_attention(a, b, c, causal=True, layout=lay, **kw), q, k, v, mode)
    ms = time_ms(fn, args.warmup, args.iters)
    return ms, peak_gib(), hops


def flex_mask_mod(mask: str, kw: dict, S: int, device):
    """The mask as a FlexAttention mask_mod over global indices."""
    if mask == "documents":
        cu = torch.tensor(kw["cu_seqlens"], device=device)
        doc = torch.searchsorted(cu, torch.arange(S, device=device), right=True) - 1

        def mod(b, h, q_idx, kv_idx):
            return (doc[q_idx] == doc[kv_idx]) & (q_idx >= kv_idx)
        return mod
    if mask == "window":
        w = kw["window"][0]

        def mod(b, h, q_idx, kv_idx):
            return (q_idx >= kv_idx) & (q_idx - kv_idx <= w)
        return mod

    def mod(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx
    return mod


_MESH = None
_FLEX = None


def bench_torch_cp(S, H, Hkv, D, mode, mask, kw, args):
    """PyTorch's context parallel with flex_attention on the mask's BlockMask (all-gathered K/V)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.experimental._attention import (_context_parallel_shard, _ContextParallel,
                                                                  _enable_context_parallel_dispatcher)
    from torch.distributed.tensor.parallel import parallelize_module
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    global _MESH, _FLEX
    P = dist.get_world_size()
    if _MESH is None:
        _MESH = init_device_mesh("cuda", (P,))
        _FLEX = torch.compile(flex_attention, dynamic=False)
        _enable_context_parallel_dispatcher()
    gqa = Hkv != H

    class Flex(torch.nn.Module):
        def forward(self, q, k, v, block_mask):
            return _FLEX(q, k, v, block_mask=block_mask, enable_gqa=gqa)

    attn = parallelize_module(Flex(), _MESH, _ContextParallel(seq_dim=2, attention_type=_ContextParallel.AttentionType.FLEX))
    torch.cuda.empty_cache()
    g = torch.Generator(device="cuda").manual_seed(1234)  # the same full tensors on every rank
    q = torch.randn(1, H, S, D, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(1, Hkv, S, D, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn(1, Hkv, S, D, device="cuda", dtype=torch.bfloat16, generator=g)
    # Compiled, as bench_masks.py makes it: evaluated eagerly, the mask_mod would build S x S booleans.
    block_mask = create_block_mask(flex_mask_mod(mask, kw, S, q.device), None, None, S, S, device=q.device,
                                   _compile=True)
    ql, kl, vl, bml = _context_parallel_shard(_MESH, [q, k, v, block_mask], [2, 2, 2, 2])
    del q, k, v
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    fn = step_fn(lambda a, b, c: attn(a, b, c, block_mask=bml), ql.contiguous(), kl.contiguous(), vl.contiguous(), mode)
    ms = time_ms(fn, args.warmup, args.iters)
    return ms, peak_gib(), None


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seqlens", nargs="+", default=["128k", "512k"])
    ap.add_argument("--masks", nargs="+", default=list(MASKS), choices=MASKS)
    ap.add_argument("--layouts", nargs="+", default=["striped", "zigzag", "contiguous"])
    ap.add_argument("--impls", nargs="+", default=["ringflash", "torch_cp"], choices=["ringflash", "torch_cp"])
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, nargs="+", default=[8])
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--modes", nargs="+", default=["fwd", "fwdbwd"], choices=["fwd", "fwdbwd"])
    ap.add_argument("--window", type=int, default=4096, help="the window's keys before each query")
    ap.add_argument("--doc-median", type=int, default=4096, help="median document length")
    ap.add_argument("--doc-seed", type=int, default=0)
    add_run_args(ap)
    args = ap.parse_args()
    bench_ring.HOST_LEAD_US = args.host_lead_us
    masks = list(dict.fromkeys(["causal", *args.masks]))  # the dense bar first

    P, rank, gpu = init_nccl()
    env = nccl_env()
    rows, dense = [], {}
    for S in map(parse_size, args.seqlens):
        for Hkv in args.kv_heads:
            for mode in args.modes:
                for mask in masks:
                    kw = mask_kwargs(mask, S, args)
                    vis = pairs(mask, S, kw, args)
                    runs = [("ringflash", lay, lambda lay=lay: bench_ringflash(
                        S, args.heads, Hkv, args.head_dim, mode, lay, kw, args))
                        for lay in args.layouts if "ringflash" in args.impls]
                    if "torch_cp" in args.impls:
                        runs.append(("torch_cp", "contiguous", lambda: bench_torch_cp(
                            S, args.heads, Hkv, args.head_dim, mode, mask, kw, args)))
                    for impl, lay, run in runs:
                        row = dict(impl=impl, gpu=gpu, world=P, layout=lay, mask=mask, S=S, H=args.heads, Hkv=Hkv,
                                   D=args.head_dim, mode=mode, visible_pairs=vis, host_lead_us=args.host_lead_us)
                        if mask == "window":
                            row["window"] = args.window
                        if mask == "documents":
                            row["documents"] = len(kw["cu_seqlens"]) - 1
                        if env:
                            row["nccl_env"] = env
                        with result_row(row, rows, rank, args.out):
                            ms, mem, hops = run()
                            tf = 4 * args.head_dim * args.heads * vis * (3.5 if mode == "fwdbwd" else 1.0)
                            tf = tf / P / (ms * 1e-3) / 1e12
                            row.update(ms=round(ms, 3), tflops_visible_per_gpu=round(tf, 1), peak_mem_gib=round(mem, 2))
                            if hops is not None:
                                row["hops"] = hops
                            if impl == "ringflash" and lay == "striped" and mask == "causal":
                                dense[(S, Hkv, mode)] = tf
                            if (S, Hkv, mode) in dense:
                                row["of_dense"] = round(tf / dense[(S, Hkv, mode)], 3)
    if rank == 0:
        print(f"\n{'impl':10s} {'layout':11s} {'mask':10s} {'S':>7s} {'Hkv':>4s} {'mode':>7s} {'ms':>9s} "
              f"{'TFLOP/s vis/GPU':>15s} {'of dense':>8s} {'hops':>5s} {'GiB':>6s}")
        for r in rows:
            if "error" in r:
                print(f"{r['impl']:10s} {r['layout']:11s} {r['mask']:10s} {r['S']:>7d} {r['Hkv']:>4d} {r['mode']:>7s}  "
                      f"{r['error']}")
                continue
            print(f"{r['impl']:10s} {r['layout']:11s} {r['mask']:10s} {r['S']:>7d} {r['Hkv']:>4d} {r['mode']:>7s} "
                  f"{r['ms']:9.2f} {r['tflops_visible_per_gpu']:15.1f} {r.get('of_dense', float('nan')):8.2f} "
                  f"{r.get('hops', '-'):>5} {r['peak_mem_gib']:6.1f}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
