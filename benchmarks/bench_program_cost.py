"""What a masked call pays besides its tiles: forward and backward time of sliding windows and
of equal-length documents against the key tiles they leave, on one GPU.

    PYTHONPATH=. python benchmarks/bench_program_cost.py --out dir        # measure (GPU)
    python benchmarks/bench_program_cost.py --analyze dir/program_cost.jsonl   # the table (CPU)

S = 32k, H = 32, D = 128, bf16, B = 1; dense causal, windows of 512-16k keys and documents of
512-32k tokens, each with the Triton kernels (forward and backward), with the Hopper forward as
one program per query tile and, with ``--persistent``, as persistent programs
(RINGFLASH_HOPPER_FWD_PERSISTENT), whose point is to hide that fixed part; with ``--fused-bwd``,
the Triton backward with its dK/dV and dQ programs in one grid (BWD_FUSED). Results are stored in
bf16, as flash_attention asks (rows with ``stores``; earlier rows stored float32). The number of
query-tile programs is the same in every case
(S / 128 x H), so a least-squares fit of time against the tiles walked, time = a * tiles + c,
splits each call into a per-tile rate ``a`` (compare with dense causal's time per tile) and a
part ``c`` that does not shrink with the tiles: the programs' fixed cost. ``area`` is a call's
time over its visible pairs at the dense-causal rate (1.0: a masked call costs its share of a
causal one); ``tile_area`` is what the tile grid alone would make it.
"""

from __future__ import annotations

import argparse
import json
import os

S, H, D, BLOCK = 32768, 32, 128, 128
SMS = 132  # H100 SXM and H200: the programs' fixed cost is c x SMS / programs on each SM
WINDOWS = (512, 1024, 2048, 4096, 8192, 16384)
DOC_LENGTHS = (512, 1024, 2048, 4096, 8192, 16384, 32768)


# name: (Hopper forward, persistent Hopper forward, backward's two program kinds in one grid)
VARIANTS = {"triton": (False, False, False), "hopper": (True, False, False), "hopper_persistent": (True, True, False),
            "triton_fused_bwd": (False, False, True)}


def measure(out_dir: str, persistent: bool = False, fused_bwd: bool = False) -> str:
    import torch
    import triton

    from ringflash import kernels
    from ringflash.kernels import attention as A

    path = os.path.join(out_dir, "program_cost.jsonl")
    torch.manual_seed(0)
    q, k, v, do = (torch.randn(1, S, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    pos = torch.arange(S, device="cuda")
    cases = [("causal", None, dict(causal=True))]
    cases += [("window", w, dict(causal=True, window=(w - 1, 0))) for w in WINDOWS]
    for n in DOC_LENGTHS:
        d = (pos // n).to(torch.int32)
        cases.append(("docs", n, dict(causal=True, q_doc=d, k_doc=d)))
    gpu = torch.cuda.get_device_name()
    with open(path, "w") as f:
        for variant, (hopper, persist, fused) in VARIANTS.items():
            if (persist and not persistent) or (fused and not fused_bwd):
                continue
            A.HOPPER_FORWARD, A.HOPPER_FWD_PERSISTENT, A.BWD_FUSED = hopper, persist, fused
            for name, p, kw in cases:
                row = dict(gpu=gpu, S=S, H=H, D=D, mask=name, param=p, hopper=hopper, variant=variant,
                           fwd_ms=triton.testing.do_bench(lambda: kernels.forward(q, k, v, **kw, out_dtype=q.dtype),
                                                          warmup=20, rep=100), stores=str(q.dtype))
                if not hopper:  # the backward has no Hopper kernel by default
                    out, lse = kernels.forward(q, k, v, **kw, out_dtype=q.dtype)
                    delta = kernels.backward_delta(out, do)
                    row["bwd_ms"] = triton.testing.do_bench(
                        lambda: kernels.backward(do, q, k, v, lse, delta, **kw, grad_dtype=q.dtype), warmup=20, rep=100)
                print(json.dumps(row), flush=True)
                f.write(json.dumps(row) + "\n")
    return path


def tiles(mask: str, p) -> int:
    """Key tiles of BLOCK x BLOCK walked by all query-tile programs (any visible pair), all heads."""
    n = 0
    for i in range(S // BLOCK):
        first, last = i * BLOCK, i * BLOCK + BLOCK - 1
        lo = 0 if mask == "causal" else max(0, first - (p - 1)) if mask == "window" else first // p * p
        n += last // BLOCK - lo // BLOCK + 1
    return n * H


def visible(mask: str, p) -> int:
    if mask == "causal":
        return S * (S + 1) // 2
    if mask == "window":
        return sum(min(i + 1, p) for i in range(S))
    r = S % p  # a last, shorter document
    return (S // p) * p * (p + 1) // 2 + r * (r + 1) // 2


def analyze(path: str) -> None:
    import numpy as np

    rows = [json.loads(line) for line in open(path)]
    programs = S // BLOCK * H
    titles = {"triton": "Triton kernels", "hopper": "Hopper forward", "hopper_persistent": "Hopper forward, persistent",
              "triton_fused_bwd": "Triton kernels, backward in one grid"}
    for variant, title in titles.items():
        # rows written before the persistent variant existed carry only ``hopper``
        mine = [r for r in rows if r.get("variant", "hopper" if r["hopper"] else "triton") == variant]
        if not mine:
            continue
        base = next(r for r in mine if r["mask"] == "causal")
        print(f"\n{title} ({base['gpu']}), S = {S}, H = {H}, D = {D}")
        print(f"{'mask':>7} {'param':>6} {'tiles/prog':>10} {'tile_area':>9} {'fwd area':>8} {'bwd area':>8}")
        for r in mine:
            t, vis = tiles(r["mask"], r["param"]), visible(r["mask"], r["param"])
            share = vis / visible("causal", None)
            bwd = f"{r['bwd_ms'] / (share * base['bwd_ms']):8.3f}" if "bwd_ms" in r else f"{'':>8}"
            print(f"{r['mask']:>7} {str(r['param']):>6} {t / programs:10.1f} {t * BLOCK * BLOCK / H / vis:9.3f} "
                  f"{r['fwd_ms'] / (share * base['fwd_ms']):8.3f} {bwd}")
        for part in ("fwd", "bwd"):
            pts = [(tiles(r["mask"], r["param"]), r[f"{part}_ms"]) for r in mine
                   if r["mask"] != "causal" and f"{part}_ms" in r]
            if len(pts) < 2:
                continue
            a, c = np.polyfit([x for x, _ in pts], [y for _, y in pts], 1)
            causal_rate = base[f"{part}_ms"] / tiles("causal", None)
            print(f"{part}: {a * 1e6:.2f} ms per million tiles (dense causal, fixed cost included: "
                  f"{causal_rate * 1e6:.2f}); fixed part {c:.3f} ms = {c * 1e3 * SMS / programs:.1f} us per "
                  f"query-tile program on one of {SMS} SMs")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="/tmp/ringflash-program-cost")
    ap.add_argument("--analyze", metavar="JSONL", help="print the table of an earlier run (no GPU needed)")
    ap.add_argument("--persistent", action="store_true", help="also the persistent Hopper forward")
    ap.add_argument("--fused-bwd", action="store_true",
                    help="also the Triton backward with its dK/dV and dQ programs in one grid (BWD_FUSED)")
    a = ap.parse_args()
    if a.analyze:
        analyze(a.analyze)
        return
    os.makedirs(a.out, exist_ok=True)
    analyze(measure(a.out, a.persistent, a.fused_bwd))


if __name__ == "__main__":
    main()
