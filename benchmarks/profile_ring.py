"""Where a ring step's time goes: a CUDA trace of ring attention, reduced to overlap numbers.

    torchrun --nproc-per-node 2 benchmarks/profile_ring.py --seqlen 32k --engines triton cudnn \
        --out benchmarks/results/profile_h200x2
    # the same over NCCL and over the copy-engine transport
    torchrun --nproc-per-node 2 benchmarks/profile_ring.py --transports nccl copy_engine --out ...

For each (engine, layout, mode) every rank runs a few warm-up iterations, then rank 0
records ``--iters`` iterations with ``torch.profiler`` and writes the Chrome trace
(``trace_<engine>_<layout>_<mode>.json``, open it in Perfetto). From the trace's GPU kernels
it reports, over the window from the first kernel to the last:

* ``compute_ms``  time in which at least one non-NCCL kernel runs (attention, merges, adds);
* ``nccl_ms``     time in which an NCCL kernel runs (it spins while it waits for its peer);
* ``copy_ms``     with ``--transports copy_engine``: time in which the transport's peer copies
                  or its signal kernels run (a wait kernel spins until its peer signals);
* ``overlap``     the fraction of the transfer time (``nccl_ms``, or ``copy_ms``) during
                  which compute runs too;
* ``exposed_ms``  transfers running alone: communication the compute did not hide;
* ``idle_ms``     no kernel at all (host-bound gaps, launch latency);
* the kernels that take the most time, by name: what a faster ring would have to shorten.

Results: one JSON object per configuration in ``profile.jsonl``, and a table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import defaultdict

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from ringflash import get_layout, ring_attention  # noqa: E402
import ringflash.ring as ring_mod  # noqa: E402
from ringflash import comm  # noqa: E402
from bench_ring import ENGINES, HEAD_START_ENGINES, init_nccl, parse_size, ring_backend, step_fn  # noqa: E402


def _union(intervals):
    """Merged, sorted, disjoint intervals."""
    out = []
    for a, b in sorted(intervals):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return out


def _length(intervals) -> float:
    return sum(b - a for a, b in intervals)


def _intersection(xs, ys) -> float:
    """Total length of the intersection of two merged interval lists."""
    i = j = 0
    total = 0.0
    while i < len(xs) and j < len(ys):
        a, b = max(xs[i][0], ys[j][0]), min(xs[i][1], ys[j][1])
        total += max(0.0, b - a)
        if xs[i][1] < ys[j][1]:
            i += 1
        else:
            j += 1
    return total


def summarize(trace_path: str, iters: int, top: int = 8) -> dict:
    """Overlap numbers (milliseconds per iteration) from the GPU kernels and copies of a Chrome
    trace. Transfers: NCCL's kernels; for the copy-engine transport, its copies between GPUs
    (``Memcpy PtoP``) and the signal kernels of PyTorch's symmetric memory (a wait kernel on
    the compute stream spins until a message lands). Local copies are left out, as they were
    before the copy-engine transport existed."""
    with open(trace_path) as f:
        events = json.load(f)["traceEvents"]
    kernels = [e for e in events if e.get("cat") == "kernel" and "dur" in e]
    if not kernels:
        raise RuntimeError(f"no GPU kernels in {trace_path}")
    is_signal = lambda e: "signal" in e["name"].lower()  # noqa: E731 - symmetric memory's put/wait kernels
    copies = [e for e in events if e.get("cat") == "gpu_memcpy" and "dur" in e and "ptop" in e["name"].lower()]
    kind = ["nccl" if "nccl" in e["name"].lower() else "copy" if is_signal(e) else "compute" for e in kernels]
    kind += ["copy"] * len(copies)
    events = kernels + copies
    spans = [(float(e["ts"]), float(e["ts"]) + float(e["dur"])) for e in events]
    compute = _union([s for s, k in zip(spans, kind) if k == "compute"])
    nccl = _union([s for s, k in zip(spans, kind) if k == "nccl"])
    copy = _union([s for s, k in zip(spans, kind) if k == "copy"])
    comm = _union(nccl + copy)
    window = max(b for _, b in spans) - min(a for a, _ in spans)
    busy = _length(_union(spans))
    both = _intersection(compute, comm)
    by_name = defaultdict(float)
    for e in events:
        by_name[e["name"][:90]] += float(e["dur"])
    ms = 1e-3 / iters  # trace times are microseconds
    return dict(
        window_ms=round(window * ms, 3),
        compute_ms=round(_length(compute) * ms, 3),
        nccl_ms=round(_length(nccl) * ms, 3),
        copy_ms=round(_length(copy) * ms, 3),
        overlap=round(both / _length(comm), 3) if comm else None,
        exposed_ms=round((_length(comm) - both) * ms, 3),
        idle_ms=round((window - busy) * ms, 3),
        top_kernels=[(name, round(t * ms, 3)) for name, t in sorted(by_name.items(), key=lambda x: -x[1])[:top]],
    )


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seqlen", default="32k")
    ap.add_argument("--layouts", nargs="+", default=["striped"])
    ap.add_argument("--engines", nargs="+", default=["triton"], choices=ENGINES)
    ap.add_argument("--modes", nargs="+", default=["fwd", "fwdbwd"], choices=["fwd", "fwdbwd"])
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=32)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--causal", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--last-hop-parts", type=int, nargs="+", default=[ring_mod.LAST_HOP_PARTS],
                    help="ringflash.ring.LAST_HOP_PARTS values to profile the SDPA engines' backward with")
    ap.add_argument("--head-start-us", type=float, default=ring_mod.HEAD_START_US,
                    help="ringflash.ring.HEAD_START_US: the SDPA engines' head start for transfers")
    ap.add_argument("--transports", nargs="+", default=["nccl"], choices=list(comm.TRANSPORTS),
                    help="ringflash.comm.TRANSPORT values to profile the ring with (one row each)")
    ap.add_argument("--ce-signals", default=comm.COPY_ENGINE_SIGNALS, choices=["kernel", "stream"],
                    help="ringflash.comm.COPY_ENGINE_SIGNALS for the copy-engine rows")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--out", required=True, help="directory for traces and profile.jsonl (rank 0)")
    args = ap.parse_args()

    P, rank, gpu = init_nccl()
    ring_mod.HEAD_START_US = args.head_start_us
    comm.COPY_ENGINE_SIGNALS = args.ce_signals
    os.makedirs(args.out, exist_ok=True)
    S = parse_size(args.seqlen)
    L = S // P
    H, Hkv, D = args.heads, args.kv_heads, args.head_dim
    g = torch.Generator(device="cuda").manual_seed(99 + rank)
    q = torch.randn(1, L, H, D, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(1, L, Hkv, D, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn(1, L, Hkv, D, device="cuda", dtype=torch.bfloat16, generator=g)

    rows = []
    for engine, transport in [(e, t) for e in args.engines for t in args.transports]:
        comm.TRANSPORT = transport
        for layout in args.layouts:
            lay = get_layout(layout)
            for mode, parts in [(m, n) for m in args.modes
                                for n in (args.last_hop_parts if engine in ("cudnn", "sdpa_flash") and m == "fwdbwd" else [None])]:
                if parts is not None:
                    ring_mod.LAST_HOP_PARTS = parts
                fn = step_fn(lambda a, b, c: ring_attention(a, b, c, causal=args.causal, layout=lay, backend=ring_backend(engine)),
                             q, k, v, mode)
                for _ in range(args.warmup):
                    fn()
                torch.cuda.synchronize()
                dist.barrier()
                with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA,
                                                        torch.profiler.ProfilerActivity.CPU]) as prof:
                    for _ in range(args.iters):
                        fn()
                    torch.cuda.synchronize()
                dist.barrier()
                if rank == 0:
                    tag = ("" if parts is None else f"_parts{parts}") + ("" if transport == "nccl" else f"_{transport}")
                    path = os.path.join(args.out, f"trace_{engine}_{layout}_{mode}{tag}.json")
                    prof.export_chrome_trace(path)
                    row = dict(gpu=gpu, world=P, engine=engine, layout=layout, mode=mode, S=S, H=H, Hkv=Hkv,
                               D=D, causal=args.causal, iters=args.iters, **summarize(path, args.iters))
                    if parts is not None:
                        row["last_hop_parts"] = parts
                    if transport != "nccl":
                        row.update(transport=transport, ce_signals=args.ce_signals)
                    if engine in HEAD_START_ENGINES:  # what the ring applied
                        row["head_start_us"] = args.head_start_us if P >= ring_mod.HEAD_START_MIN_RANKS else 0.0
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                    with open(os.path.join(args.out, "profile.jsonl"), "a") as f:
                        f.write(json.dumps(row) + "\n")
    if rank == 0:
        print(f"\n{'engine':7s} {'transport':11s} {'layout':10s} {'mode':7s} {'window':>8s} {'compute':>8s} "
              f"{'transfer':>8s} {'overlap':>8s} {'exposed':>8s} {'idle':>8s}   (ms per iteration, rank 0)")
        for r in rows:
            mode = r["mode"] + (f"/{r['last_hop_parts']}" if "last_hop_parts" in r else "")
            print(f"{r['engine']:7s} {r.get('transport', 'nccl'):11s} {r['layout']:10s} {mode:7s} {r['window_ms']:8.2f} "
                  f"{r['compute_ms']:8.2f} {r['nccl_ms'] + r['copy_ms']:8.2f} {r['overlap'] or 0:8.1%} "
                  f"{r['exposed_ms']:8.2f} {r['idle_ms']:8.2f}")
        for r in rows:
            print(f"\n{r['engine']} {r.get('transport', 'nccl')} {r['layout']} {r['mode']} {r.get('last_hop_parts', '')}: "
                  f"top kernels and transfers (ms per iteration)")
            for name, t in r["top_kernels"]:
                print(f"  {t:8.3f}  {name}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
