"""Sparse attention on one GPU: each ringflash.sparse mode's kernel time against ringflash dense
causal attention, in the same run; and, with ``--layouts``, how each ring layout maps a block
pattern onto the kernels' tiles.

    PYTHONPATH=. python benchmarks/bench_sparse.py --layouts              # every default: a few minutes
    PYTHONPATH=. python benchmarks/bench_sparse.py --seqlens 32k --head-dims 128 --masks hash
    TRITON_INTERPRET=1 PYTHONPATH=. python benchmarks/bench_sparse.py --cpu-model --layouts   # counts only

Shapes: B = 1, H = 32, D in ``--head-dims`` (64 and 128), S in ``--seqlens`` (8k, 16k, 32k),
bf16, causal. Sparse settings (the levels of the sparse-attention papers):

* ``hash``: ``HashSparse`` with 2, 4, 8, 16 buckets. Bucket ids are drawn uniformly at random per
  (token, head), independently for queries and keys, as in the paper's runtime benchmark
  (``--hash-ids lsh`` adds ids from ``hash_buckets`` of the random q and k: nearly uniform too).
  Passed with ``checked=True`` (as ``ringflash.nn`` does), so the call does not synchronise.
* ``qkdrop``: ``QKDrop`` dropping 30, 50, 70 % of the queries and of the keys per head
  (``keep_random``; density about (1 - f)^2).
* ``block_sparse``: ``BlockSparse`` patterns of 128-token blocks: ``local=4,global=1``,
  ``local=8,global=1,random=2`` and ``density=0.25`` (the diagonal plus as many random earlier
  blocks per row as bring the density nearest 0.25; the count depends on S).

``density`` is exact: visible (query, key) pairs over causal pairs, counted without an S x S
matrix (hash: per bucket, the running count of earlier keys of the bucket at each query; qkdrop:
kept queries times the running count of kept keys; block: per query, the kept blocks before its
own times the block size plus its place in its own block when the diagonal block is kept, which
agrees with ``BlockSparse.density(causal=True)``).

What is timed (medians of ``triton.testing.do_bench``, as benchmarks/bench_kernels.py):

* ``impl = "ringflash"``: ``flash_attention(q, k, v, causal=True, sparsity=sp)`` as a user calls it
  (inputs that require grad; ``fwd+bwd`` adds ``autograd.grad``). For qkdrop and hash this
  includes the per-head sort of the tokens, their moves and the unsort. For block patterns the
  tile lists are cached by position tensors, and ``flash_attention``'s default positions are made
  once per shape, so calls after the first reuse them (``lists_built_per_call`` in the rows counts
  the lists built by a call after the first: 0).
* ``impl = "ringflash-kernel"``: the kernels alone (``ringflash.kernels.forward``, then
  ``backward_delta`` + ``backward``, and the casts to bf16): for qkdrop and hash on inputs
  sorted once beforehand, with the per-head composite attributes of ``ringflash.sparse.composite``;
  for block patterns with fixed position tensors, so the tile lists come from the cache (as in
  the ring, which keeps its positions).
* ``impl = "sdpa_flash"``: PyTorch SDPA's flash backend, dense causal, as a reference.

Modes: ``fwd``, ``fwd+bwd``, and ``bwd`` derived as their difference (``derived: true``).
Each sparse row carries ``dense_ms`` (ringflash dense causal of the same impl, shape and mode, in
this run), ``ratio = ms / dense_ms``, ``expected = density``, ``work_efficiency = ratio / density``
(1.0: time proportional to visible work; the bar is <= 1.2) and ``speedup = dense_ms / ms``.

``--layouts``: for P in ``--worlds`` (4, 8) ranks of a global ``--layout-seqlen`` (32k), every
layout (contiguous, striped, zigzag, striped128 = ``Striped(stripe=128)``) and each block
pattern (and dense causal): for every rank r and every ring step (keys of rank src), whether
the ring runs it (``ringflash.mask.block_visible``, as the ring's plan), the tiles the forward
kernel visits (``_ranges_kernel`` then ``blocks.tile_lists``, the kernel's own lists, with the
GPU's forward tile sizes for ``--layout-head-dim``), and on a GPU its time (the kernel on one GPU
with that rank's and src's positions, folding into a running O/LSE as the ring does; CUDA events
over repeated calls, median of 3). Per (layout, P, pattern): tile density = visible pairs /
computed pairs, the ring's pace = max over ranks of the summed step times, and that pace over
the dense causal pace of the same layout, next to the density; ``pace_loop_ms``: the same with
each rank's steps timed back to back as one loop (host launch gaps included).

``--cpu-model``: no GPU, nothing timed (needs ``TRITON_INTERPRET=1``, which it sets when it
can): the densities, the layouts' tile counts, and with ``--smoke`` every timed callable run once
under the interpreter (float32) to check that it runs.

Every row is one JSON line in ``--out`` (default ``benchmarks/results/sparse_<gpu>/sparse.jsonl``,
one folder per run); a row whose call fails (e.g. out of memory) records ``error`` and the run
goes on.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import statistics
import sys
import time

if "--cpu-model" in sys.argv:  # before anything imports the kernels (triton.jit decides then)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_kernels import bench, gpu_slug, make_fns, parse_len  # noqa: E402

from ringflash import kernels  # noqa: E402
from ringflash.kernels import attention as katt  # noqa: E402
from ringflash.kernels import blocks as kblocks  # noqa: E402
from ringflash.layout import Striped, get_layout  # noqa: E402
from ringflash.mask import block_visible, make_mask  # noqa: E402
from ringflash.ops import flash_attention  # noqa: E402
from ringflash.reference import default_positions  # noqa: E402
from ringflash.sparse import (  # noqa: E402
    BlockSparse,
    HashSparse,
    QKDrop,
    block_pattern,
    composite,
    gather_tokens,
    hash_buckets,
    hash_projection,
    keep_random,
    sort_order,
)

MASKS = ("causal", "hash", "qkdrop", "block_sparse")
MODES = ("fwd", "fwd+bwd")
IMPLS = ("ringflash", "ringflash-kernel", "sdpa_flash")
LAYOUTS = ("contiguous", "striped", "zigzag", "striped128")
BAR = 1.2
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

LAYOUT_MAPS = {
    "contiguous": "rank r holds global blocks [r L/bs, (r+1) L/bs) in order: a tile of <= bs tokens lies in one "
                  "block, so the tile lists are exact; the ring runs a step wherever the pattern reaches back",
    "striped": "rank r holds tokens r, r+P, r+2P, ...: a tile of T tokens spans T*P positions, i.e. T*P/bs "
               "blocks, and is visited if any of their block pairs is kept; the element rule masks the rest",
    "zigzag": "rank r holds chunks r and 2P-1-r of S/(2P) tokens: tiles lie in one block (chunks are multiples "
              "of bs), two runs of blocks per rank",
    "striped128": "stripes of 128 tokens dealt round-robin: with bs = 128 each stripe is one block, so rank r "
                  "holds blocks r, r+P, ...; tiles lie in one block, the causal work is balanced",
}


# -- settings and their exact densities ------------------------------------------------------


def parse_block(spec: str) -> dict:
    """'local=4,global=1,random=2,seed=0' or 'density=0.25' -> a dict of those keys."""
    out = {}
    for part in filter(None, spec.split(",")):
        name, _, value = part.partition("=")
        name = name.strip()
        if name not in ("local", "global", "random", "seed", "density"):
            raise ValueError(f"block pattern keys are local, global, random, seed, density; got {spec!r}")
        out[name] = float(value) if name == "density" else int(value)
    return out


def block_visible_per_query(bp: BlockSparse) -> torch.Tensor:
    """Visible keys of every query position 0..S-1 under causal + the pattern (int64, exact):
    the kept blocks before the query's own block, ``bs`` keys each, plus ``p % bs + 1`` keys of
    its own block when the diagonal block is kept."""
    pat, bs = bp.pattern, bp.block_size
    lower = torch.tril(pat, -1).sum(1).to(torch.int64)
    diag = torch.diagonal(pat).to(torch.int64)
    p = torch.arange(bp.seqlen, dtype=torch.int64)
    i = p // bs
    return lower[i] * bs + diag[i] * (p % bs + 1)


def make_block(S: int, block_size: int, spec: dict) -> tuple[BlockSparse, str]:
    """The pattern of ``spec`` for a global length S, and its setting string."""
    seed = spec.get("seed", 0)
    if "density" in spec:
        target = spec["density"]
        nb = S // block_size

        def dens(r):
            return block_pattern(S, block_size, local=1, random=r, seed=seed).density(True)

        lo, hi = 0, nb  # density is non-decreasing in r (the top-r random blocks are nested)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if dens(mid) <= target else (lo, mid)
        r = min((lo, hi), key=lambda x: abs(dens(x) - target))
        bp = block_pattern(S, block_size, local=1, random=r, seed=seed)
        return bp, f"block:size={block_size},local=1,random={r},seed={seed} (density~{target:g})"
    kw = dict(local=spec.get("local", 0), global_=spec.get("global", 0), random=spec.get("random", 0), seed=seed)
    bp = block_pattern(S, block_size, **kw)
    return bp, (f"block:size={block_size},local={kw['local']},global={kw['global_']},random={kw['random']},"
                f"seed={seed}")


def hash_visible(qb: torch.Tensor, kb: torch.Tensor, nb: int) -> int:
    """Causal pairs with equal buckets, summed over (b, h): per bucket, each query of the bucket
    sees the running count of the bucket's keys at or before it. qb, kb: (B, S, H)."""
    vis = 0
    for c in range(nb):
        cum = (kb == c).to(torch.int32).cumsum(1)
        vis += int(((qb == c).to(torch.int32) * cum).sum(dtype=torch.int64))
    return vis


def qkdrop_visible(q_keep: torch.Tensor, k_keep: torch.Tensor) -> int:
    """Causal pairs of a kept query and a kept key, summed over (b, h). (B, S, H) booleans."""
    return int((q_keep.to(torch.int32) * k_keep.to(torch.int32).cumsum(1)).sum(dtype=torch.int64))


def settings(args, S: int, B: int, H: int, D: int, device, q=None, k=None) -> list[dict]:
    """Every sparse setting of the run at length S: dicts with mask, sparsity (the setting's
    string), sp (the ringflash.sparse object), visible pairs, density and setting fields."""
    causal_pairs = B * H * S * (S + 1) // 2
    out = [dict(mask="causal", sparsity="dense", label="dense", sp=None, visible=causal_pairs, extra={})]
    if "hash" in args.masks:
        for nb in args.hash_buckets:
            for ids in args.hash_ids:
                if ids == "random":
                    g = torch.Generator(device=device).manual_seed(args.seed * 7919 + nb)
                    qb = torch.randint(0, nb, (B, S, H), generator=g, device=device, dtype=torch.int32)
                    kb = torch.randint(0, nb, (B, S, H), generator=g, device=device, dtype=torch.int32)
                else:
                    proj = hash_projection(H, D, nb, seed=args.seed)
                    qb, kb = hash_buckets(q, proj, nb), hash_buckets(k, proj, nb)
                sp = HashSparse(qb, kb, nb, checked=True)
                name = f"hash:{nb}" + ("" if ids == "random" else ":lsh")
                out.append(dict(mask="hash", sparsity=name, label=name, sp=sp,
                                visible=hash_visible(qb, kb, nb), extra=dict(buckets=nb, hash_ids=ids)))
    if "qkdrop" in args.masks:
        pos = torch.arange(S, device=device)
        for f in args.qkdrop:
            qk = keep_random(pos, B, H, f, seed=2 * args.seed)
            kk = keep_random(pos, B, H, f, seed=2 * args.seed + 1)
            out.append(dict(mask="qkdrop", sparsity=f"qkdrop:{f:g}", label=f"qkdrop:{f:g}", sp=QKDrop(qk, kk),
                            visible=qkdrop_visible(qk, kk), extra=dict(drop=f)))
    if "block_sparse" in args.masks:
        for spec in args.block_patterns:
            if S % args.block_size:
                continue
            bp, name = make_block(S, args.block_size, parse_block(spec))
            per_q = int(block_visible_per_query(bp).sum())
            d_lib = bp.density(causal=True)
            assert abs(per_q / (S * (S + 1) // 2) - d_lib) < 1e-9, (name, per_q, d_lib)
            label = spec + (f" (random={name.split('random=')[1].split(',')[0]})" if "density" in spec else "")
            out.append(dict(mask="block_sparse", sparsity=name, label=label, sp=bp, visible=B * H * per_q,
                            extra=dict(block_size=args.block_size, pattern=spec,
                                       blocks_kept=int(torch.tril(bp.pattern).sum()),
                                       density_lib=d_lib)))
    for s in out:
        s["density"] = s["visible"] / causal_pairs
    return out


# -- what is timed ---------------------------------------------------------------------------


def user_fns(qg, kg, vg, dout, sp):
    """flash_attention as a user calls it (inputs that require grad)."""

    def fwd():
        return flash_attention(qg, kg, vg, causal=True, sparsity=sp, backend="triton")

    def fwdbwd():
        o = flash_attention(qg, kg, vg, causal=True, sparsity=sp, backend="triton")
        return torch.autograd.grad(o, (qg, kg, vg), dout)

    return {"fwd": fwd, "fwd+bwd": fwdbwd}


def kernel_fns(q, k, v, dout, sp):
    """The kernels alone: dense causal; token sparsity on inputs sorted once beforehand with
    their per-head composite attributes; block patterns with fixed position tensors."""
    S, dtype = q.shape[1], q.dtype
    kw: dict = {}
    if isinstance(sp, (HashSparse, QKDrop)):
        q_pos, k_pos = default_positions(S, S, q.device)
        q_cpos, q_cdoc, k_cpos, k_cdoc = composite(sp, q_pos, k_pos, None, None, 1)
        q_order, _ = sort_order(q_cpos)
        k_order, _ = sort_order(k_cpos)
        kw = dict(q_pos=torch.gather(q_cpos, -1, q_order), q_doc=torch.gather(q_cdoc, -1, q_order),
                  k_pos=torch.gather(k_cpos, -1, k_order), k_doc=torch.gather(k_cdoc, -1, k_order))
        q, dout = gather_tokens(q, q_order), gather_tokens(dout, q_order)
        k, v = gather_tokens(k, k_order), gather_tokens(v, k_order)
    elif isinstance(sp, BlockSparse):
        pos = torch.arange(S, device=q.device, dtype=torch.int64)
        kw = dict(q_pos=pos, k_pos=pos, blocks=sp)

    def fwd():
        o, lse = kernels.forward(q, k, v, causal=True, **kw)
        return o.to(dtype), lse

    def fwdbwd():
        o, lse = kernels.forward(q, k, v, causal=True, **kw)
        o = o.to(dtype)
        delta = kernels.backward_delta(o, dout)
        return [g.to(dtype) for g in kernels.backward(dout, q, k, v, lse, delta, causal=True, **kw)]

    return {"fwd": fwd, "fwd+bwd": fwdbwd}


def sdpa_fns(q, k, v, dout):
    fwd, _, fwdbwd = make_fns("sdpa_flash", q, k, v, dout, True)
    return {"fwd": fwd, "fwd+bwd": fwdbwd}


def list_builds(fn) -> int:
    """How many times one call of ``fn`` (after a first one) builds block tile lists."""
    fn()
    orig, n = kblocks.tile_lists, [0]

    def counted(*a, **kw):
        n[0] += 1
        return orig(*a, **kw)

    kblocks.tile_lists = counted
    try:
        fn()
    finally:
        kblocks.tile_lists = orig
    return n[0]


def run_once(fn) -> None:
    fn()
    return None


def env_fields(gpu: str) -> dict:
    import triton

    dev = torch.cuda.get_device_name() if torch.cuda.is_available() and gpu != "cpu" else "cpu"
    return dict(gpu=gpu, device=dev, torch=torch.__version__, triton=triton.__version__)


# -- the kernels part ------------------------------------------------------------------------


def kernel_part(args, device, dtype, timer, gpu, write) -> list[dict]:
    B, H = 1, args.heads
    rows: list[dict] = []
    hdr = (f"{'S':>6} {'D':>4} {'mask':>12} {'setting':>30} {'mode':>7} {'impl':>16} {'ms':>9} "
           f"{'density':>8} {'ratio':>7} {'eff':>6} {'speedup':>8}")
    print(hdr)
    for S in map(parse_len, args.seqlens):
        for D in args.head_dims:
            g = torch.Generator(device=device).manual_seed(args.seed)
            q, k, v, dout = (torch.randn(B, S, H, D, generator=g, device=device, dtype=dtype) for _ in range(4))
            qg, kg, vg = (t.detach().clone().requires_grad_() for t in (q, k, v))
            try:
                sets = settings(args, S, B, H, D, device, q, k)
            except Exception as e:  # noqa: BLE001
                rec = dict(part="kernels", S=S, H=H, D=D, B=B, error=repr(e)[:300], **env_fields(gpu))
                write(rec)
                print(f"{S:>6} {D:>4} settings failed: {rec['error']}")
                continue
            dense: dict = {}
            for st in sets:
                impls = [i for i in args.impls if i != "sdpa_flash" or st["mask"] == "causal"]
                for impl in impls:
                    base = dict(part="kernels", impl=impl, S=S, H=H, D=D, B=B,
                                dtype=str(dtype).replace("torch.", ""), causal=True, mask=st["mask"],
                                sparsity=st["sparsity"], label=st["label"], density=st["density"],
                                visible_pairs=st["visible"], causal_pairs=B * H * S * (S + 1) // 2,
                                **st["extra"], **env_fields(gpu))
                    times = {}
                    try:
                        if impl == "ringflash":
                            fns = user_fns(qg, kg, vg, dout, st["sp"])
                        elif impl == "ringflash-kernel":
                            fns = kernel_fns(q, k, v, dout, st["sp"])
                        else:
                            fns = sdpa_fns(q, k, v, dout)
                        if isinstance(st["sp"], BlockSparse) and impl != "sdpa_flash":
                            base["lists_built_per_call"] = {m: list_builds(fns[m]) for m in args.modes}
                    except Exception as e:  # noqa: BLE001
                        fns, err = None, repr(e)[:300]
                    for mode in args.modes:
                        rec = dict(base, mode=mode)
                        try:
                            if fns is None:
                                raise RuntimeError(err)
                            if timer is run_once and "lists_built_per_call" in base:
                                rec["ms"] = None  # list_builds has run it (twice) already
                            else:
                                rec["ms"] = timer(fns[mode])
                        except Exception as e:  # noqa: BLE001  (out of memory, a compile error: record it, go on)
                            rec["ms"] = None
                            rec["error"] = repr(e)[:300]
                            if torch.cuda.is_available():
                                torch.cuda.empty_cache()
                        times[mode] = rec["ms"]
                        rows.append(finish(rec, dense, write))
                    if len(args.modes) == 2 and all(times.get(m) is not None for m in MODES):
                        rec = dict(base, mode="bwd", ms=times["fwd+bwd"] - times["fwd"], derived=True)
                        rows.append(finish(rec, dense, write))
                    del fns
                    if torch.cuda.is_available():
                        torch.cuda.empty_cache()
            del q, k, v, dout, qg, kg, vg, sets
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    return rows


def finish(rec: dict, dense: dict, write) -> dict:
    """Fill in the comparison with dense causal of the same impl, shape and mode; write; print."""
    key = (rec["impl"], rec["S"], rec["D"], rec["mode"])
    ms = rec.get("ms")
    if ms is not None:
        mult = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}[rec["mode"]]
        rec["tflops_visible"] = 4.0 * rec["D"] * rec["visible_pairs"] * mult / (ms * 1e-3) / 1e12 if ms > 0 else None
    if rec["mask"] == "causal" and ms is not None:
        dense[key] = ms
    elif rec["mask"] != "causal" and ms is not None and dense.get(key):
        d = dense[key]
        rec.update(dense_ms=d, ratio=ms / d, expected=rec["density"], work_efficiency=ms / d / rec["density"],
                   speedup=d / ms)
        rec["meets_bar"] = rec["work_efficiency"] <= BAR
    write(rec)
    f = lambda x, fmt: ("" if x is None else format(x, fmt))  # noqa: E731
    msg = rec.get("error", "")[:60]
    label = rec.get("label", rec["sparsity"])[:30]
    speedup = f(rec.get("speedup"), "7.2f") + ("x" if "speedup" in rec else " ")
    print(f"{rec['S']:>6} {rec['D']:>4} {rec['mask']:>12} {label:>30} {rec['mode']:>7} {rec['impl']:>16} "
          f"{f(ms, '9.3f'):>9} {rec['density']:8.4f} {f(rec.get('ratio'), '7.3f'):>7} "
          f"{f(rec.get('work_efficiency'), '6.2f'):>6} {speedup:>8} {msg}", flush=True)
    return rec


def summary(rows: list[dict]) -> None:
    """Work efficiency (ratio / density) per setting, impl and mode, over the shapes."""
    groups: dict = {}
    for r in rows:
        if r.get("work_efficiency") is None:
            continue
        setting = r["pattern"] if r["mask"] == "block_sparse" else r["sparsity"]  # block: the same spec at every S
        groups.setdefault((r["mask"], setting, r["impl"], r["mode"]), []).append(r)
    if not groups:
        return
    print(f"\nwork efficiency = (ms / dense ms) / density; the bar is <= {BAR} (min-max over S and D)")
    print(f"{'mask':>12} {'setting':>28} {'impl':>16} {'mode':>7} {'density':>15} {'efficiency':>12} {'speedup':>14} "
          f"{'meets':>6}")
    for (mask, setting, impl, mode), rs in groups.items():
        eff = [r["work_efficiency"] for r in rs]
        dn = [r["density"] for r in rs]
        sp = [r["speedup"] for r in rs]
        ok = sum(r["meets_bar"] for r in rs)
        print(f"{mask:>12} {setting[:28]:>28} {impl:>16} {mode:>7} {min(dn):6.3f}-{max(dn):6.3f}  "
              f"{min(eff):5.2f}-{max(eff):5.2f} {min(sp):6.2f}-{max(sp):6.2f}x {ok:>3}/{len(rs)}")


# -- the layouts part ------------------------------------------------------------------------


def make_layout(name: str):
    if name.startswith("striped") and name != "striped":
        return Striped(stripe=int(name[len("striped"):]))
    return get_layout(name)


def fwd_tiles(head_dim: int) -> tuple[int, int]:
    """The forward kernel's (block_m, block_n) on a GPU for this head dim (causal), bf16."""
    bd = katt._block_d(head_dim)
    cfg = katt.FWD_CONFIGS.get((bd, True)) or katt.FWD_CONFIGS[bd]
    return cfg.block_m, cfg.block_n


def step_tiles(q_pos, k_pos, bp, block_m: int, block_n: int, ranges=None) -> dict:
    """Tiles the forward kernel visits for these positions (causal, with the pattern ``bp`` or
    none): the kernel's own ranges (``_ranges_kernel``; the causal rule's, the same for every
    pattern, so they can be passed in as ``ranges``) and, for a pattern, its tile lists."""
    L_q, L_k = q_pos.shape[0], k_pos.shape[0]
    m = katt._mask_args(q_pos, k_pos, True, None, None, None, L_q, L_k, q_pos.device, bp)
    if ranges is None:
        ranges = katt._tile_ranges(m, True, L_q, L_k, block_m, block_n, by_keys=False, device=q_pos.device)
    rows_t = torch.clamp(L_q - torch.arange(0, L_q, block_m, device=q_pos.device), max=block_m).to(torch.int64)
    if bp is None:
        lo, hi = ranges[0, :, 0].to(torch.int64), torch.clamp(ranges[0, :, 3].to(torch.int64), max=L_k)
        keys = torch.clamp(hi - lo, min=0)
        tiles = int(((keys + block_n - 1) // block_n).sum())
        computed = int((rows_t * keys).sum())
        full = int(((ranges[0, :, 2] - ranges[0, :, 1]) // block_n).clamp(min=0).sum())
    else:
        _, counts = kblocks.tile_lists(ranges, m.q_pos, m.k_pos, bp, block_m, block_n, by_keys=False)
        counts = counts.to(torch.int64)
        tiles = int(counts[:, 1].sum())
        full = int(counts[:, 0].sum())
        # L_k is a multiple of block_n wherever block patterns are used here; otherwise an upper bound
        computed = int((rows_t * counts[:, 1] * block_n).sum())
    return dict(tiles=tiles, full_tiles=full, computed=computed, ranges=ranges)


def events_time(fn, reps: int = 10, rounds: int = 3) -> float:
    """Milliseconds per call: CUDA events around ``reps`` back-to-back calls, median of ``rounds``
    (steps are short, many and launched back to back in a ring, so no cache flush between)."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(rounds):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        for _ in range(reps):
            fn()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) / reps)
    return statistics.median(times)


def layout_part(args, device, dtype, timed: bool, gpu: str, write) -> list[dict]:
    S, H, D, B = parse_len(args.layout_seqlen), args.heads, args.layout_head_dim, 1
    bm, bn = fwd_tiles(D)
    patterns = [("causal", "dense", None, S * (S + 1) // 2)]
    for spec in args.block_patterns:
        bp, name = make_block(S, args.block_size, parse_block(spec))
        patterns.append((spec, name, bp, int(block_visible_per_query(bp).sum())))
    if timed:
        g = torch.Generator(device=device).manual_seed(args.seed)
        q, k, v = (torch.randn(B, S, H, D, generator=g, device=device, dtype=dtype) for _ in range(3))
    rows = []
    print(f"\nlayouts: S = {S}, H = {H}, D = {D}, forward tiles {bm} x {bn}, block size {args.block_size}; "
          f"per rank and ring step: the kernel's tiles" + (" and time" if timed else " (no timing)"))
    print(f"{'P':>3} {'layout':>11} {'pattern':>26} {'density':>8} {'tile dens':>9} {'blk/tile':>8} {'steps':>5} "
          f"{'launched':>8} {'pace ms':>9} {'mean ms':>9} {'vs dense':>8} {'eff':>6} {'loop ms':>9} {'vs dense':>8}")
    for P in args.worlds:
        L = S // P
        for lname in args.layout_names:
            lay = make_layout(lname)
            try:
                lay.check_seqlen(S, P)
            except ValueError as e:
                write(dict(part="layouts", layout=lname, P=P, S=S, error=str(e)[:300], **env_fields(gpu)))
                continue
            host = [lay.local_positions(L, rank=r, world_size=P, device="cpu") for r in range(P)]
            pos = [h.to(device) for h in host]
            shards = None
            if timed:
                shards = [[t.index_select(1, pos[r]).contiguous() for t in (q, k, v)] for r in range(P)]
            dense_pace, step_ranges = None, {}
            for spec, name, bp, vis_total in patterns:
                per_q = block_visible_per_query(bp) if bp is not None else torch.arange(1, S + 1, dtype=torch.int64)
                mask = make_mask(True, None, None, S, blocks=bp)
                nb = bp.num_blocks if bp is not None else S // args.block_size
                inc = kblocks._incidence(host[0], bm, nb, args.block_size)
                blocks_per_tile = float(inc.sum(1).mean())
                rank_ms, rank_loop_ms, rank_comp, rank_vis, launched, last_step, steps_out = [], [], [], [], 0, 0, []
                err = None
                for r in range(P):
                    ms_r, comp_r, calls = 0.0, 0, []
                    if timed:
                        out = torch.zeros(B, L, H, D, dtype=torch.float32, device=device)
                        lse = torch.full((B, H, L), -math.inf, dtype=torch.float32, device=device)
                    for s in range(P):
                        src = (r - s) % P
                        if not block_visible(mask, host[r], host[src]):
                            continue
                        launched += 1
                        last_step = max(last_step, s)
                        c = step_tiles(pos[r], pos[src], bp, bm, bn, step_ranges.get((r, src)))
                        step_ranges[(r, src)] = c.pop("ranges")
                        comp_r += c["computed"]
                        step_ms = None
                        if timed and err is None:
                            qr, (kr, vr) = shards[r][0], shards[src][1:]
                            kw = dict(q_pos=pos[r], k_pos=pos[src], causal=True, blocks=bp, out=out, lse=lse)
                            call = functools.partial(kernels.forward, qr, kr, vr, **kw)
                            try:
                                step_ms = events_time(call)
                                ms_r += step_ms
                                calls.append(call)
                            except Exception as e:  # noqa: BLE001
                                err = repr(e)[:300]
                                torch.cuda.empty_cache()
                        steps_out.append(dict(rank=r, step=s, src=src, ms=step_ms, **c))
                    if timed and err is None:
                        # the rank's steps back to back, as its ring issues them (no communication)
                        rank_loop_ms.append(events_time(lambda: [step() for step in calls], reps=3))
                    rank_ms.append(ms_r)
                    rank_comp.append(comp_r)
                    rank_vis.append(int(per_q[host[r]].sum()))
                assert sum(rank_vis) == vis_total
                computed = sum(rank_comp)
                rec = dict(part="layouts", layout=lname, P=P, S=S, L=L, H=H, D=D, B=B, block_size=args.block_size,
                           block_m=bm, block_n=bn, pattern=spec, sparsity=name,
                           density=vis_total / (S * (S + 1) // 2), visible_pairs=vis_total, computed_pairs=computed,
                           tile_density=vis_total / computed if computed else None,
                           computed_over_visible=computed / vis_total if vis_total else None,
                           pace_efficiency_tiles=vis_total / (P * max(rank_comp)) if max(rank_comp) else None,
                           blocks_per_tile=blocks_per_tile, steps=last_step + 1, launched=launched,
                           rank_visible=rank_vis, rank_computed=rank_comp, step_detail=steps_out,
                           **env_fields(gpu))
                if timed and err is None:
                    pace = max(rank_ms)
                    rec.update(rank_ms=rank_ms, pace_ms=pace, mean_ms=sum(rank_ms) / P,
                               balance=pace / (sum(rank_ms) / P) if sum(rank_ms) else None,
                               rank_loop_ms=rank_loop_ms, pace_loop_ms=max(rank_loop_ms))
                    if bp is None:
                        dense_pace = (pace, max(rank_loop_ms))
                    elif dense_pace:
                        rec.update(dense_pace_ms=dense_pace[0], pace_ratio=pace / dense_pace[0],
                                   work_efficiency=pace / dense_pace[0] / rec["density"],
                                   dense_pace_loop_ms=dense_pace[1], pace_loop_ratio=max(rank_loop_ms) / dense_pace[1])
                elif err is not None:
                    rec["error"] = err
                write(rec)
                rows.append(rec)
                f = lambda x, fmt: ("" if x is None else format(x, fmt))  # noqa: E731
                print(f"{P:>3} {lname:>11} {spec[:26]:>26} {rec['density']:8.4f} {f(rec['tile_density'], '9.3f'):>9} "
                      f"{blocks_per_tile:8.2f} {rec['steps']:>5} {launched:>8} {f(rec.get('pace_ms'), '9.3f'):>9} "
                      f"{f(rec.get('mean_ms'), '9.3f'):>9} {f(rec.get('pace_ratio'), '8.3f'):>8} "
                      f"{f(rec.get('work_efficiency'), '6.2f'):>6} {f(rec.get('pace_loop_ms'), '9.3f'):>9} "
                      f"{f(rec.get('pace_loop_ratio'), '8.3f'):>8} {rec.get('error', '')[:40]}", flush=True)
            del shards
            if timed:
                torch.cuda.empty_cache()
    print("\nhow each layout maps global blocks onto local tiles (blk/tile above: blocks a query tile touches):")
    for lname in args.layout_names:
        print(f"  {lname}: {LAYOUT_MAPS.get(lname, '')}")
    best: dict = {}
    for r in rows:
        if r["pattern"] != "causal" and r.get("pace_ms") is not None:
            key = (r["P"], r["pattern"])
            if key not in best or r["pace_ms"] < best[key]["pace_ms"]:
                best[key] = r
    for (P, spec), r in sorted(best.items()):
        print(f"  fastest ring pace, P = {P}, {spec}: {r['layout']} ({r['pace_ms']:.3f} ms, "
              f"tile density {r['tile_density']:.3f})")
    return rows


# -- main ------------------------------------------------------------------------------------


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seqlens", nargs="+", default=["8k", "16k", "32k"])
    ap.add_argument("--head-dims", nargs="+", type=int, default=[64, 128])
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--masks", nargs="+", default=list(MASKS[1:]), choices=MASKS,
                    help="sparse modes to run (dense causal always runs: it is the baseline)")
    ap.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS)
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    ap.add_argument("--hash-buckets", nargs="+", type=int, default=[2, 4, 8, 16])
    ap.add_argument("--hash-ids", nargs="+", default=["random"], choices=["random", "lsh"])
    ap.add_argument("--qkdrop", nargs="+", type=float, default=[0.3, 0.5, 0.7])
    ap.add_argument("--block-patterns", nargs="+",
                    default=["local=4,global=1", "local=8,global=1,random=2", "density=0.25"])
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-kernels", action="store_true", help="skip the kernels part (e.g. only --layouts)")
    ap.add_argument("--layouts", action="store_true", help="also the layouts part")
    ap.add_argument("--layout-seqlen", default="32k")
    ap.add_argument("--layout-head-dim", type=int, default=128)
    ap.add_argument("--worlds", nargs="+", type=int, default=[4, 8])
    ap.add_argument("--layout-names", nargs="+", default=list(LAYOUTS))
    ap.add_argument("--cpu-model", action="store_true", help="no GPU: densities and tile counts, nothing timed")
    ap.add_argument("--smoke", action="store_true", help="with --cpu-model: run every timed callable once")
    ap.add_argument("--out", default="", help="JSON lines (default: benchmarks/results/sparse_<gpu>/sparse.jsonl)")
    args = ap.parse_args(argv)

    if args.cpu_model:
        if not kernels.INTERPRETED:
            raise SystemExit("--cpu-model runs the tile ranges under Triton's interpreter: set TRITON_INTERPRET=1")
        device, dtype, gpu = torch.device("cpu"), torch.float32, "cpu"
        timer = run_once if args.smoke else None
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no GPU: use --cpu-model (counts only)")
        device, dtype, gpu = torch.device("cuda"), torch.bfloat16, gpu_slug()
        timer = bench
    out = args.out or os.path.join(RESULTS, f"sparse_{gpu}", "sparse.jsonl")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)

    def write(rec: dict) -> None:
        with open(out, "a") as f:
            f.write(json.dumps(rec) + "\n")

    t0 = time.time()
    rows = []
    if not args.no_kernels:
        if timer is None:  # densities only
            print(f"{'S':>6} {'D':>4} {'mask':>12} {'setting':>30} {'density':>8}  sparsity")
            for S in map(parse_len, args.seqlens):
                for D in args.head_dims:
                    g = torch.Generator(device=device).manual_seed(args.seed)
                    q, k = (torch.randn(1, S, args.heads, D, generator=g, device=device, dtype=dtype) for _ in range(2))
                    for st in settings(args, S, 1, args.heads, D, device, q, k):
                        rec = dict(part="kernels", impl="count", mode="count", S=S, H=args.heads, D=D, B=1,
                                   causal=True, mask=st["mask"], sparsity=st["sparsity"], label=st["label"],
                                   density=st["density"], visible_pairs=st["visible"],
                                   causal_pairs=S * (S + 1) // 2 * args.heads, ms=None,
                                   **st["extra"], **env_fields(gpu))
                        write(rec)
                        rows.append(rec)
                        print(f"{S:>6} {D:>4} {st['mask']:>12} {st['label'][:30]:>30} {st['density']:8.4f}  "
                              f"{st['sparsity']}")
        else:
            rows = kernel_part(args, device, dtype, timer, gpu, write)
            summary(rows)
    if args.layouts:
        layout_part(args, device, dtype, not args.cpu_model, gpu, write)
    print(f"\n{len(rows)} kernel rows; wrote {out} ({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
