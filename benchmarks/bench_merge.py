"""The SDPA engines' elementwise passes: bandwidth of the fused merge and accumulate kernels.

    python benchmarks/bench_merge.py --out benchmarks/results/merge_h200.jsonl

Times (``triton.testing.do_bench``, median) the passes the SDPA engines run per ring step at
the shape of one rank's shard: ``accumulate_`` (a bf16 block into a float32 accumulator, and
a fresh copy), ``merge_`` (a block's output and LSE into the running ones) and PyTorch's own
``dst += src`` for the same bytes, for each launch config in ``--block-s`` x ``--warps``.
GB/s count every byte read and written once; the copy of a float32 tensor gives the bar.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys

import torch
import triton

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from ringflash.kernels import merge as merge_mod  # noqa: E402


def _median_ms(fn) -> float:
    """The median (``do_bench`` returns the mean unless asked)."""
    return triton.testing.do_bench(fn, return_mode="median")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seqlen", type=int, default=16384)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--block-s", type=int, nargs="+", default=[merge_mod.BLOCK_S])
    ap.add_argument("--warps", type=int, nargs="+", default=[merge_mod.NUM_WARPS])
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    S, H, D = args.seqlen, args.heads, args.head_dim
    gpu = torch.cuda.get_device_name().replace("NVIDIA ", "")
    dst = torch.randn(1, S, H, D, device="cuda")
    lse = torch.randn(1, H, S, device="cuda")
    src = {"bshd": torch.randn(1, S, H, D, device="cuda").bfloat16(),  # the fused ops' outputs, both layouts
           "bhsd": torch.randn(1, H, S, D, device="cuda").bfloat16().transpose(1, 2)}
    n = dst.numel()
    rows = []

    def record(name, layout, ms, nbytes, **extra):
        row = dict(gpu=gpu, op=name, src_layout=layout, S=S, H=H, D=D, ms=round(ms, 4),
                   gbps=round(nbytes / ms / 1e6, 1), **extra)
        rows.append(row)
        print(json.dumps(row), flush=True)

    record("copy_fp32", "-", _median_ms(lambda: dst.clone()), 8 * n)
    for layout, s in src.items():
        record("torch_add", layout, _median_ms(lambda: dst.add_(s)), 10 * n)
        record("torch_copy", layout, _median_ms(lambda: dst.copy_(s)), 6 * n)
        for bs, w in itertools.product(args.block_s, args.warps):
            merge_mod.BLOCK_S, merge_mod.NUM_WARPS = bs, w
            cfg = dict(block_s=bs, warps=w)
            record("accumulate", layout, _median_ms(lambda: merge_mod.accumulate_(dst, s)), 10 * n, **cfg)
            record("accumulate_fresh", layout, _median_ms(
                lambda: merge_mod.accumulate_(dst, s, fresh=True)), 6 * n, **cfg)
            record("merge", layout, _median_ms(lambda: merge_mod.merge_(dst, lse, s, lse)), 10 * n, **cfg)
    if args.out:
        with open(args.out, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    print(f"\n{'op':17s} {'src':5s} {'config':8s} {'ms':>8s} {'GB/s':>8s}")
    for r in rows:
        cfg = f"{r['block_s']}x{r['warps']}w" if "block_s" in r else "-"
        print(f"{r['op']:17s} {r['src_layout']:5s} {cfg:8s} {r['ms']:8.4f} {r['gbps']:8.0f}")


if __name__ == "__main__":
    main()
