"""Where a call's GPU time goes: each CUDA kernel of one call, for ringflash and SDPA's cuDNN.

    PYTHONPATH=. python benchmarks/profile_kernels.py --seqlens 8k 16k --causal both --out kernels_profile.jsonl

For each implementation, length, mask and mode (``bwd``, ``fwdbwd``; the callables of
``bench_kernels.make_fns``, so the same calls that benchmark times): 3 calls to warm up, then
``torch.profiler`` (CUDA activity) over ``--calls`` calls. Each kernel's device time per call,
its share of the call's kernel time, and the call's elapsed time (CUDA events around the same
calls, outside the profiler) are printed; one JSON line per (impl, S, mask, mode). A kernel
that is not the attention product itself (the delta rows, zero fills, casts, the dQ counters)
is what the call pays around it.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_kernels import flops, gpu_slug, inputs, make_fns, parse_len  # noqa: E402


def profile_call(fn, calls: int) -> tuple[dict, float]:
    """({kernel name: device microseconds per call}, elapsed milliseconds per call)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    torch.cuda.synchronize()
    elapsed = start.elapsed_time(end) / calls
    totals: dict = collections.defaultdict(float)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            totals[ev.name] += ev.device_time / calls
    return dict(totals), elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seqlens", nargs="+", default=["8k", "16k"])
    ap.add_argument("--causal", choices=["true", "false", "both"], default="both")
    ap.add_argument("--impls", nargs="+", default=["ringflash_default", "sdpa_cudnn"])
    ap.add_argument("--modes", nargs="+", default=["bwd", "fwdbwd"], choices=["fwd", "bwd", "fwdbwd"])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--calls", type=int, default=5)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    causals = {"true": [True], "false": [False], "both": [False, True]}[args.causal]
    out = open(args.out, "a") if args.out else None
    print(f"# {gpu_slug()}, torch {torch.__version__}; B = {args.batch}, H = {args.heads}, D = {args.head_dim}, bf16")
    for S in map(parse_len, args.seqlens):
        q, k, v, dout = inputs(args.batch, S, args.heads, args.head_dim, torch.bfloat16)
        for causal in causals:
            for impl in args.impls:
                fns = dict(zip(("fwd", "bwd", "fwdbwd"), make_fns(impl, q, k, v, dout, causal)))
                for mode in args.modes:
                    kernels_us, ms = profile_call(fns[mode], args.calls)
                    total = sum(kernels_us.values())
                    tf = flops(mode, args.batch, args.heads, S, args.head_dim, causal) / ms * 1e-9
                    print(f"\n{impl}  S={S}  {'causal' if causal else 'full'}  {mode}: "
                          f"{ms * 1e3:.0f} us a call ({tf:.0f} TFLOP/s), kernels {total:.0f} us")
                    for name, us in sorted(kernels_us.items(), key=lambda kv: -kv[1]):
                        print(f"  {us:9.1f} us  {100 * us / total:5.1f}%  {name[:110]}")
                    if out:
                        out.write(json.dumps(dict(impl=impl, S=S, causal=causal, mode=mode, call_us=ms * 1e3,
                                                  tflops=tf, kernels_us=kernels_us, gpu=gpu_slug())) + "\n")
                        out.flush()
                del fns
    if out:
        out.close()


if __name__ == "__main__":
    main()
