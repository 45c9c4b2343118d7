"""Masked attention on one GPU: ringflash's kernels (the library's defaults, ``ringflash``) with
packed documents and a sliding window, next to FlexAttention (``torch.compile``d
``flex_attention`` with the same mask) and to ringflash's dense causal kernel, in one run.

    PYTHONPATH=. python benchmarks/bench_masks.py                          # S = 32k and 128k
    PYTHONPATH=. python benchmarks/bench_masks.py --seqlens 32k --masks documents --impls ringflash
    PYTHONPATH=. python benchmarks/bench_masks.py --prev /tmp/x/ringflash/kernels  # another tree's kernels too

Masks (all causal; B = 1, H = 32, D = 128, bf16 by default):
* ``causal``: dense causal attention;
* ``documents``: packed documents with long-tailed lengths (log-normal, median 4k tokens, seeded),
  every document causal inside itself;
* ``window``: a causal sliding window, each token sees itself and the ``--window`` tokens before it.

TFLOP/s count **visible pairs only** (4 * D FLOPs per visible pair forward, 2.5x that for the
backward), so masks compare at the rate of the work they must do. ``area_ratio`` is the time of a
masked call over the time of its visible area at the dense-causal rate of the same run (1.0: a
masked call costs exactly its share of a causal one).

What is timed: ``fwd`` is ringflash ``forward`` as ``flash_attention`` calls it (O stored in bf16;
Flex: its forward on inputs that require grad); ``fwdbwd`` adds ``backward_delta`` + ``backward``
(dQ/dK/dV stored in bf16; Flex: ``autograd.grad`` of a fresh forward). Implementations: see
``SETTINGS`` (``ringflash``: whatever the library picks for the call; ``ringflash_triton``: the
Triton kernels, never the Hopper ones; the others: Hopper variants). Medians of
``triton.testing.do_bench``.
Each result is one JSON line (``--out``, default ``benchmarks/results/masks_<gpu>/masks.jsonl``: one folder per run) with impl, gpu, S, H, D, mask, mode, ms, tflops_visible.

``--prev DIR``: a copy of another tree's ``ringflash/kernels`` package (``git archive <rev>
ringflash/kernels | tar -x -C /tmp/x`` then ``--prev /tmp/x/ringflash/kernels``), timed in the same
run on the same masks and on full attention, as ``impl = "ringflash_prev"``, so that a change of
the kernels' speed shows as a ratio (a tree from before masks times only ``causal`` and ``full``:
ask for those).
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_kernels import bench, gpu_slug, load_prev, parse_len, with_attention_settings  # noqa: E402

from ringflash import kernels  # noqa: E402
from ringflash.mask import doc_ids  # noqa: E402

MASKS = ("causal", "documents", "window", "full")
MODES = ("fwd", "fwdbwd")


def documents(S: int, seed: int = 0, median: int = 4096, sigma: float = 1.0) -> list[int]:
    """Boundaries ``[0, ..., S]`` of documents with log-normal lengths, the last one cut to fit."""
    g = torch.Generator().manual_seed(seed)
    cu = [0]
    while cu[-1] < S:
        n = int(math.exp(math.log(median) + sigma * float(torch.randn((), generator=g))))
        cu.append(min(S, cu[-1] + max(1, n)))
    return cu


def visible_pairs(mask: str, S: int, cu: list[int], window: int) -> int:
    if mask == "full":
        return S * S
    if mask == "causal":
        return S * (S + 1) // 2
    if mask == "documents":
        return sum((b - a) * (b - a + 1) // 2 for a, b in zip(cu[:-1], cu[1:]))
    w = window  # keys p - w .. p: p + 1 of them below w, w + 1 after
    return S * (S + 1) // 2 if S <= w else w * (w + 1) // 2 + (S - w) * (w + 1)


def ringflash_fns(kern, q, k, v, dout, mask: str, cu, window: int):
    causal = mask != "full"
    kw = {}
    if mask == "documents":
        pos = torch.arange(q.shape[1], device=q.device)
        d = doc_ids(cu, pos)
        kw = dict(q_doc=d, k_doc=d)
    elif mask == "window":
        kw = dict(window=(window, 0))

    # As flash_attention calls the kernels: results in the inputs' dtype. A kernels package of an
    # earlier tree (--prev) without that option returns float32, cast here as that tree did.
    direct = "out_dtype" in inspect.signature(kern.forward).parameters
    fkw = dict(kw, out_dtype=q.dtype) if direct else kw
    bkw = dict(kw, grad_dtype=q.dtype) if direct else kw

    def fwd():
        o, l = kern.forward(q, k, v, causal=causal, **fkw)
        return o.to(q.dtype), l

    def fwdbwd():
        o, l = kern.forward(q, k, v, causal=causal, **fkw)
        o = o.to(q.dtype)
        delta = kern.backward_delta(o, dout)
        return [g.to(q.dtype) for g in kern.backward(dout, q, k, v, l, delta, causal=causal, **bkw)]

    return {"fwd": fwd, "fwdbwd": fwdbwd}


# The kernels' module settings per implementation (ringflash.kernels.attention): ``ringflash``
# the library's defaults; ``ringflash_triton`` the Triton kernels alone; ``ringflash_hopper``
# the Hopper forward with a consumer partition per warpgroup, persistent programs where the rule
# in attention.py says so, and the Triton backward
# (the default on sm_90 before the Hopper backward that adds dQ itself: benchmarks/NOTES_kernels.md);
# ``ringflash_hopper_persistent`` that forward always as persistent programs;
# ``ringflash_hopper_fused_bwd`` the default with the backward's dK/dV and dQ programs in one grid;
# ``ringflash_hopper_atomic_dq`` / ``_ordered_dq`` that forward with the Hopper backward whose dK/dV
# programs add dQ by bulk TMA reductions, in any order / in a fixed order (HOPPER_BWD_DQ; the
# ordered one is the default on sm_90 at D = 128); ``ringflash_tile_loads`` the defaults with the
# Hopper forward's boundary tiles masked by the keys' positions and documents loaded per tile, not
# by each row's run of visible keys (HOPPER_FWD_ROW_BOUNDS off; the default before
# benchmarks/results/masks_h100_row_bounds/); ``ringflash_triton_tile_loads`` the Triton kernels
# with the same per-tile loads (ROW_BOUNDS off); ``ringflash_bwd_row_bounds`` /
# ``ringflash_bwd_tile_loads`` the defaults with the Hopper backward's boundary tiles by row bounds
# under every mask / under none (HOPPER_BWD_ROW_BOUNDS "1" / "0"; the default takes them under
# short windows); ``ringflash_one_dq_writer`` the defaults with one dQ writer in the Hopper backward
# (HOPPER_BWD_DQ_WRITERS "1"; two by default since benchmarks/results/kernels_h100_dq_writers/).
SETTINGS = {
    "ringflash": {},  # the library's defaults (on sm_90 at D = 128: the Hopper kernels)
    "ringflash_triton": dict(HOPPER_FORWARD=False, HOPPER_BACKWARD=False),
    "ringflash_triton_tile_loads": dict(HOPPER_FORWARD=False, HOPPER_BACKWARD=False, ROW_BOUNDS=False),
    "ringflash_hopper": dict(HOPPER_FORWARD=True, HOPPER_FWD_SPLIT=2, HOPPER_BACKWARD=False, HOPPER_FWD_PERSISTENT=None),
    "ringflash_hopper_persistent": dict(HOPPER_FORWARD=True, HOPPER_FWD_SPLIT=2, HOPPER_BACKWARD=False,
                                        HOPPER_FWD_PERSISTENT=True),
    "ringflash_hopper_fused_bwd": dict(HOPPER_FORWARD=True, HOPPER_FWD_SPLIT=2, HOPPER_BACKWARD=False,
                                       HOPPER_FWD_PERSISTENT=None, BWD_FUSED=True),
    "ringflash_hopper_atomic_dq": dict(HOPPER_FORWARD=True, HOPPER_FWD_SPLIT=2, HOPPER_BACKWARD=True,
                                       HOPPER_FWD_PERSISTENT=None, HOPPER_BWD_DQ="atomic"),
    "ringflash_tile_loads": dict(HOPPER_FWD_ROW_BOUNDS=False),  # the defaults, boundary tiles by per-tile loads
    "ringflash_bwd_row_bounds": dict(HOPPER_BWD_ROW_BOUNDS="1"),  # the defaults, the Hopper backward's always
    "ringflash_bwd_tile_loads": dict(HOPPER_BWD_ROW_BOUNDS="0"),  # the defaults, the Hopper backward's never
    "ringflash_hopper_ordered_dq": dict(HOPPER_FORWARD=True, HOPPER_FWD_SPLIT=2, HOPPER_BACKWARD=True,
                                        HOPPER_FWD_PERSISTENT=None, HOPPER_BWD_DQ="ordered"),
    "ringflash_one_dq_writer": dict(HOPPER_BWD_DQ_WRITERS="1"),  # the defaults, one dQ writer (two by default)
    # the defaults but the Hopper backward's LSE and delta loaded by the consumers (as before
    # benchmarks/results/kernels_h100_stats_smem/)
    "ringflash_stats_global": dict(HOPPER_BWD_STATS_SMEM=False),  # LSE and delta rows loaded by the consumers
}


def with_settings(fns: dict, impl: str) -> dict:
    """``fns`` with the kernels' settings of ``impl`` (SETTINGS) in force during each call."""
    settings = SETTINGS.get(impl, SETTINGS["ringflash"])
    return {mode: with_attention_settings(fn, settings) for mode, fn in fns.items()}


def flex_fns(q, k, v, dout, mask: str, cu, window: int):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    S = q.shape[1]
    compiled = torch.compile(flex_attention, dynamic=False)
    doc = doc_ids(cu, torch.arange(S, device=q.device)) if mask == "documents" else None

    def mask_mod(b, h, qi, ki):
        if mask == "causal":
            return qi >= ki
        if mask == "documents":
            return (qi >= ki) & (doc[qi] == doc[ki])
        if mask == "full":
            return qi >= 0
        return (qi >= ki) & (qi - ki <= window)

    # _compile: the block mask is built tile by tile, without an S x S boolean matrix.
    block_mask = create_block_mask(mask_mod, None, None, S, S, device=q.device, _compile=True)
    qt, kt, vt = (t.transpose(1, 2).contiguous().detach().requires_grad_() for t in (q, k, v))
    dt = dout.transpose(1, 2).contiguous()

    def fwd():
        return compiled(qt, kt, vt, block_mask=block_mask)

    def fwdbwd():
        o = compiled(qt, kt, vt, block_mask=block_mask)
        return torch.autograd.grad(o, (qt, kt, vt), dt)

    return {"fwd": fwd, "fwdbwd": fwdbwd}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seqlens", nargs="+", default=["32k", "128k"])
    ap.add_argument("--masks", nargs="+", default=["causal", "documents", "window"], choices=MASKS)
    ap.add_argument("--impls", nargs="+", default=["ringflash", "flex"], choices=[*SETTINGS, "flex"],
                    help="the ringflash ones: see SETTINGS (ringflash: the library's defaults; ringflash_triton: the "
                         "Triton kernels only)")
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--window", type=int, default=4096)
    ap.add_argument("--doc-median", type=int, default=4096)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--prev", default="", help="another tree's ringflash/kernels directory: time its kernels too")
    ap.add_argument("--out", default="", help="JSON lines (default: benchmarks/results/masks_<gpu>.jsonl)")
    args = ap.parse_args()

    gpu = gpu_slug()
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", f"masks_{gpu}", "masks.jsonl")
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    prev = load_prev(args.prev) if args.prev else None
    B, H, D, dtype = 1, args.heads, args.head_dim, torch.bfloat16
    rows = []
    print(f"{'S':>6} {'mask':>10} {'mode':>7} {'impl':>15} {'ms':>9} {'TFLOP/s vis':>12} {'area':>6} {'vs flex':>8}")
    for S in map(parse_len, args.seqlens):
        g = torch.Generator(device="cuda").manual_seed(args.seed)
        q, k, v, dout = (torch.randn(B, S, H, D, generator=g, device="cuda", dtype=dtype) for _ in range(4))
        cu = documents(S, args.seed, args.doc_median)
        dense_ms = {}
        masks = list(dict.fromkeys(["causal", *args.masks]))  # the dense-causal rate first
        impls = sorted(args.impls, key=lambda i: i != "flex")  # Flex first: ringflash rows carry the ratio
        jobs = [(m, impl) for m in masks for impl in impls]
        if prev is not None:  # the other tree's kernels on the same masks, and both on full attention
            jobs += [(m, "ringflash_prev") for m in masks] + [("full", "ringflash_prev")]
            if "full" not in masks:
                jobs.append(("full", "ringflash"))
        for mask, impl in jobs:
            if impl == "flex":
                fns = flex_fns(q, k, v, dout, mask, cu, args.window)
            else:
                fns = ringflash_fns(prev if impl == "ringflash_prev" else kernels, q, k, v, dout, mask, cu, args.window)
                fns = with_settings(fns, impl)
            vis = visible_pairs(mask, S, cu, args.window)
            for mode in args.modes:
                ms = bench(fns[mode])
                tflops = 4.0 * B * H * vis * D * (1.0 if mode == "fwd" else 3.5) / (ms * 1e-3) / 1e12
                rec = dict(impl=impl, gpu=gpu, S=S, H=H, D=D, B=B, dtype="bfloat16", mask=mask, mode=mode, ms=ms,
                           tflops_visible=tflops, visible_pairs=vis, causal=mask != "full",
                           window=args.window if mask == "window" else None,
                           documents=len(cu) - 1 if mask == "documents" else None,
                           device=torch.cuda.get_device_name(), torch=torch.__version__)
                ours = impl.startswith("ringflash") and impl != "ringflash_prev"
                if ours and mask == "causal":
                    dense_ms[(impl, mode)] = (ms, vis)
                if ours and (impl, mode) in dense_ms and mask not in ("causal", "full"):
                    c_ms, c_vis = dense_ms[(impl, mode)]
                    rec["area_ratio"] = ms / (c_ms * vis / c_vis)  # against this impl's own causal rate
                flex = next((r for r in rows if r["impl"] == "flex" and r["S"] == S and r["mask"] == mask
                             and r["mode"] == mode), None)
                if ours and flex is not None:
                    rec["vs_flex"] = flex["ms"] / ms
                rows.append(rec)
                with open(out, "a") as f:
                    f.write(json.dumps(rec) + "\n")
                area = f"{rec['area_ratio']:.2f}" if "area_ratio" in rec else ""
                vf = f"{rec['vs_flex']:.2f}x" if "vs_flex" in rec else ""
                print(f"{S:>6} {mask:>10} {mode:>7} {impl:>15} {ms:9.3f} {tflops:12.1f} {area:>6} {vf:>8}", flush=True)
            del fns
            torch.cuda.empty_cache()
    print("\nringflash vs FlexAttention (time ratio, >1: ringflash faster)")
    for r in rows:
        if not r["impl"].startswith("ringflash") or r["impl"] == "ringflash_prev":
            continue
        flex = next((x for x in rows if x["impl"] == "flex" and x["S"] == r["S"] and x["mask"] == r["mask"]
                     and x["mode"] == r["mode"]), None)
        if flex is not None:
            print(f"  {r['impl']:>16} S={r['S']:>6} {r['mask']:>10} {r['mode']:>7}: {flex['ms'] / r['ms']:.2f}x")
    for r in rows:
        if r["impl"] == "ringflash_prev":
            now = next(x for x in rows if x["impl"] == "ringflash" and x["S"] == r["S"] and x["mask"] == r["mask"]
                       and x["mode"] == r["mode"])
            print(f"  kernels now / before, S={r['S']} {r['mask']} {r['mode']}: {r['ms'] / now['ms']:.3f}x speed")


if __name__ == "__main__":
    main()
