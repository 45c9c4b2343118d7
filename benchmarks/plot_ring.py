"""Plots and a markdown table from the ring benchmark's JSON lines.

    python benchmarks/plot_ring.py benchmarks/results/ring_h200x2_run3/ring_H200x2_same_run.jsonl \
        --out benchmarks/results/ring_h200x2

Writes ``<out>_throughput.png`` (per-GPU TFLOP/s against S, one panel per layout, with
PyTorch's context parallel and the single-GPU kernel at the per-rank size),
``<out>_striped_vs_contiguous.png`` and prints a markdown table of the causal rows.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict


def load(paths):
    rows = []
    for p in paths:
        with open(p) as f:
            rows += [json.loads(line) for line in f if line.strip()]
    return [r for r in rows if "tflops_per_gpu" in r]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("files", nargs="+")
    ap.add_argument("--out", required=True, help="path prefix of the PNGs")
    ap.add_argument("--hkv", type=int, default=8)
    ap.add_argument("--mode", default="fwdbwd")
    args = ap.parse_args()
    rows = [r for r in load(args.files) if r["Hkv"] == args.hkv and r["mode"] == args.mode]

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    world = rows[0]["world"] if rows else "?"
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, causal in zip(axes, (True, False)):
        series = defaultdict(list)
        for r in rows:
            if r["causal"] != causal:
                continue
            name = f"ringflash {r['layout']}" if r["impl"] == "ringflash" else r["impl"]
            series[name].append((r["S"], r["tflops_per_gpu"]))
        for name, pts in sorted(series.items()):
            pts.sort()
            style = "--" if name.startswith("torch") else (":" if name == "single_gpu" else "-")
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length S (all ranks)")
        ax.set_title(f"{'causal' if causal else 'full'}, {args.mode}, {world} GPUs, Hkv={args.hkv}")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("TFLOP/s per GPU")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(f"{args.out}_throughput.png", dpi=120)

    # Striped (and zigzag) over contiguous, causal: the load-balancing gain.
    by = {(r["S"], r["layout"], r["mode"]): r["tflops_per_gpu"] for r in load(args.files)
          if r["impl"] == "ringflash" and r["causal"] and r["Hkv"] == args.hkv}
    seqs = sorted({k[0] for k in by})
    fig, ax = plt.subplots(figsize=(6, 3.5))
    width = 0.2
    for i, (lay, mode) in enumerate([("striped", "fwd"), ("striped", "fwdbwd"), ("zigzag", "fwd"), ("zigzag", "fwdbwd")]):
        ratios = [by.get((s, lay, mode), 0) / by[(s, "contiguous", mode)] if (s, "contiguous", mode) in by else 0 for s in seqs]
        ax.bar([j + i * width for j in range(len(seqs))], ratios, width, label=f"{lay} {mode}")
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks([j + 1.5 * width for j in range(len(seqs))], [f"{s // 1024}k" for s in seqs])
    ax.set_ylabel("speed-up over contiguous")
    ax.set_title(f"causal, {world} GPUs, Hkv={args.hkv}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(f"{args.out}_striped_vs_contiguous.png", dpi=120)

    print("| S | mode | impl | layout | TFLOP/s/GPU | peak GiB |")
    print("|---|---|---|---|---|---|")
    for r in sorted(load(args.files), key=lambda r: (r["S"], r["Hkv"], not r["causal"], r["mode"], r["impl"], r["layout"])):
        if r["causal"] and r["Hkv"] == args.hkv:
            print(f"| {r['S'] // 1024}k | {r['mode']} | {r['impl']} | {r['layout']} | {r['tflops_per_gpu']:.0f} | {r['peak_mem_gib']:.1f} |")


if __name__ == "__main__":
    main()
