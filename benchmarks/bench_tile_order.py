"""The order in which causal grids run their tiles, on one GPU: each head's tiles in turn,
longest first (``LPT_L2_BYTES = 0``), against the longest tiles of a section of heads first,
sections sized to 16 or 32 MB of K/V (``ringflash.kernels.attention.LPT_L2_BYTES``).

    PYTHONPATH=. python benchmarks/bench_tile_order.py --out dir     # dir/tile_order.jsonl
    python benchmarks/bench_tile_order.py --table dir/tile_order.jsonl

Causal attention, B = 1, H = 32, bf16, S = 4k / 8k / 16k at D = 128 and 8k at D = 64; the
forward and the backward as flash_attention calls them (results in bf16), and SDPA's cuDNN
forward for scale. The settings alternate within one process over three rounds (the order of
the settings reversed every other round), so that drift of the GPU's clocks falls on all of
them; the table gives the median of the rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

CASES = ((4096, 128), (8192, 128), (16384, 128), (8192, 64))
BUDGETS = (0, 16 << 20, 32 << 20)
ROUNDS = 3


def measure(out_dir: str) -> str:
    import torch
    import torch.nn.functional as F
    import triton
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from ringflash import kernels
    from ringflash.kernels import attention as A

    gpu = torch.cuda.get_device_name()
    calls = {}
    for S, D in CASES:
        torch.manual_seed(0)
        q, k, v, do = (torch.randn(1, S, 32, D, device="cuda", dtype=torch.bfloat16) for _ in range(4))
        out, lse = kernels.forward(q, k, v, causal=True, out_dtype=q.dtype)
        delta = kernels.backward_delta(out, do)

        def fwd(q=q, k=k, v=v):
            return kernels.forward(q, k, v, causal=True, out_dtype=q.dtype)

        def bwd(q=q, k=k, v=v, do=do, lse=lse, delta=delta):
            return kernels.backward(do, q, k, v, lse, delta, causal=True, grad_dtype=q.dtype)

        def cudnn(qt=q.transpose(1, 2), kt=k.transpose(1, 2), vt=v.transpose(1, 2)):
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                return F.scaled_dot_product_attention(qt, kt, vt, is_causal=True)

        calls[(S, D)] = ({"fwd": fwd, "bwd": bwd}, cudnn)
        for budget in BUDGETS:  # compile and warm every setting first
            A.LPT_L2_BYTES = budget
            fwd()
            bwd()
    torch.cuda.synchronize()
    rows = []
    for rnd in range(ROUNDS):
        for (S, D), (fns, cudnn) in calls.items():
            rows.append(dict(gpu=gpu, S=S, D=D, round=rnd, impl="sdpa_cudnn", mode="fwd",
                             ms=triton.testing.do_bench(cudnn, warmup=20, rep=100)))
            for mode, fn in fns.items():
                for budget in BUDGETS if rnd % 2 == 0 else BUDGETS[::-1]:
                    A.LPT_L2_BYTES = budget
                    rows.append(dict(gpu=gpu, S=S, D=D, round=rnd, impl=f"lpt_{budget >> 20}mb", mode=mode,
                                     ms=triton.testing.do_bench(fn, warmup=20, rep=100)))
    path = os.path.join(out_dir, "tile_order.jsonl")
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return path


def table(path: str) -> None:
    rows = [json.loads(line) for line in open(path)]
    print(f"{'S':>6} {'D':>4} {'mode':>4} " + " ".join(f"{b >> 20:>6}MB ms" for b in BUDGETS)
          + "  speed vs 0 MB (median of rounds)")
    for S, D in CASES:
        for mode in ("fwd", "bwd"):
            med = {b: statistics.median(r["ms"] for r in rows
                                        if (r["S"], r["D"], r["mode"], r["impl"]) == (S, D, mode, f"lpt_{b >> 20}mb"))
                   for b in BUDGETS}
            print(f"{S:>6} {D:>4} {mode:>4} " + " ".join(f"{med[b]:>11.3f}" for b in BUDGETS) + "  "
                  + " ".join(f"{med[0] / med[b]:.3f}" for b in BUDGETS[1:]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=".", help="directory for tile_order.jsonl")
    ap.add_argument("--table", default=None, help="only print the table of this JSON-lines file (CPU)")
    a = ap.parse_args()
    table(a.table or measure(a.out))


if __name__ == "__main__":
    main()
