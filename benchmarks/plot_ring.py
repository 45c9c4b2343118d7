"""Plots and a markdown table from the ring benchmark's JSON lines.

    python benchmarks/plot_ring.py benchmarks/results/ring_h200x2_matrix/ring_H200x2_32k.jsonl \
        --out benchmarks/results/ring_h200x2

Writes ``<out>_throughput.png`` (per-GPU TFLOP/s against S, causal and full, with PyTorch's
context parallel and the single-GPU kernel at the per-rank size),
``<out>_striped_vs_contiguous.png`` (when the file has contiguous rows), ``<out>_engines.png``
(causal, every engine and layout beside PyTorch's context parallel, one bar group per S and
Hkv, forward and fwd+bwd) and prints a markdown table of the causal rows (peak memory there
includes the copy-engine transport's receive workspace, ``workspace_gib``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import defaultdict

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from ringflash.ring import HEAD_START_US, LAST_HOP_PARTS  # noqa: E402  (rows without the fields ran with them)


def load(paths):
    """The timed rows of ``paths``. Each row also gets ``_file`` (the index of its file: one
    run, whose single-GPU rows are its baseline) and ``_tag`` (what tells it from rows of the
    same series in other runs: the NCCL variables that differ between rows, and the number of
    GPUs when the files mix them)."""
    rows = []
    for i, p in enumerate(paths):
        with open(p) as f:
            rows += [dict(json.loads(line), _file=i) for line in f if line.strip()]
    rows = [r for r in rows if "tflops_per_gpu" in r]
    varying = sorted(_varying_env(rows))
    worlds = {r["world"] for r in rows}
    for r in rows:
        tag = [f"{k}={r['nccl_env'][k]}" for k in varying if k in r.get("nccl_env", {})]
        if len(worlds) > 1:
            tag.append(f"{r['world']} GPUs")
        r["_tag"] = ", ".join(tag)
    return rows


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
    causals = [c for c in (True, False) if any(r["causal"] == c for r in rows)] or [True]
    # one color per series across the panels (each panel has its own subset of the series)
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    colors = {name: cycle[i % len(cycle)] for i, name in enumerate(sorted({_label(r) for r in rows}))}
    fig, axes = plt.subplots(1, len(causals), figsize=(5.5 * len(causals), 4), sharey=True, squeeze=False)
    axes = axes[0]
    for ax, causal in zip(axes, causals):
        series = defaultdict(list)
        for r in rows:
            if r["causal"] != causal:
                continue
            name = _label(r)
            series[name].append((r["S"], r["tflops_per_gpu"]))
        for name, pts in sorted(series.items()):
            pts.sort()
            style = "--" if name.startswith("torch") else (":" if name.startswith("single_gpu") else "-")
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", label=name, color=colors[name])
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length S (all ranks)")
        ax.set_title(f"{'causal' if causal else 'full'}, {args.mode}, {world} GPUs, Hkv={args.hkv}")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("TFLOP/s per GPU")
    for ax in axes:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(f"{args.out}_throughput.png", dpi=120)

    engines_plot(load(args.files), f"{args.out}_engines.png", plt)

    # Striped (and zigzag) over contiguous, causal: the load-balancing gain.
    by = {(r["S"], r["layout"], r["mode"]): r["tflops_per_gpu"] for r in load(args.files)
          if r["impl"] == "ringflash" and r["causal"] and r["Hkv"] == args.hkv
          and r.get("engine", "triton") == "triton" and r.get("transport", "nccl") == "nccl"}
    seqs = sorted({k[0] for k in by if (k[0], "contiguous", k[2]) in by})
    if not seqs:
        print_table(args)
        return
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

    print_table(args)


def _label(r) -> str:
    """A series name: ringflash rows by engine and layout, the others by impl; then what tells
    the row from the same series in other runs (``_tag``, see :func:`load`)."""
    name = _series(r)
    return f"{name} [{r['_tag']}]" if r.get("_tag") else name


def _series(r) -> str:
    engine = r.get("engine")  # files from before the engine choice: the Triton kernels
    if r["impl"] == "single_gpu" and engine not in (None, "triton"):
        return f"single_gpu {engine}"
    if r["impl"] not in ("ringflash", "ringflash_local"):
        return r["impl"]
    name = f"{r['impl']} {r['layout']}" if engine is None else f"{r['impl']} {engine} {r['layout']}"
    parts = r.get("last_hop_parts", LAST_HOP_PARTS)
    if parts != LAST_HOP_PARTS:
        name += f" (last hop in {parts})"
    start = r.get("head_start_us", HEAD_START_US)
    if engine not in (None, "triton") and start != HEAD_START_US:
        name += f" (head start {start:g} us)"
    if r.get("transport", "nccl") != "nccl":
        signals = f", {r['ce_signals']} signals" if "ce_signals" in r else ""
        name += f" ({r['transport'].replace('_', ' ')}{signals})"
    return name


def engines_plot(rows, path, plt) -> None:
    """Causal rows: one bar per series in every (S, Hkv) group, forward and fwd+bwd panels."""
    rows = [r for r in rows if r["causal"]]
    modes = [m for m in ("fwd", "fwdbwd") if any(r["mode"] == m for r in rows)]
    if not modes:
        return
    groups = sorted({(r["S"], r["Hkv"]) for r in rows})
    names = sorted({_label(r) for r in rows})
    fig, axes = plt.subplots(1, len(modes), figsize=(6 * len(modes), 4), sharey=True, squeeze=False)
    width = 0.8 / len(names)
    for ax, mode in zip(axes[0], modes):
        val = {(r["S"], r["Hkv"], _label(r)): r["tflops_per_gpu"] for r in rows if r["mode"] == mode}
        for i, name in enumerate(names):
            ax.bar([j + i * width for j in range(len(groups))], [val.get((S, h, name), 0) for S, h in groups],
                   width, label=name)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(groups))], [f"{S // 1024}k\nHkv={h}" for S, h in groups])
        ax.set_title(f"causal, {mode}, {rows[0]['world']} GPUs")
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel("TFLOP/s per GPU")
    axes[0][-1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _varying_env(rows) -> set:
    """The NCCL variables whose value is not the same in every row (the A/B ones)."""
    names = {k for r in rows for k in r.get("nccl_env", {})}
    return {k for k in names if len({r.get("nccl_env", {}).get(k) for r in rows}) > 1}


def print_table(args) -> None:
    """Causal rows, with the ratio to the single-GPU row of the same run (file), GPUs, NCCL
    environment, shape, mode and engine, and a column for the NCCL variables that differ between
    rows, if any do."""
    rows = sorted(load(args.files), key=lambda r: (r["S"], r["Hkv"], not r["causal"], r["mode"], r["impl"],
                                                   r.get("engine", "triton"), r["layout"], r.get("transport", "nccl"),
                                                   r.get("ce_signals", ""), sorted(r.get("nccl_env", {}).items())))
    varying = sorted(_varying_env(rows))
    def key(r, engine):  # a single-GPU baseline from the same run, GPUs, shape and environment
        return (r["_file"], r["_tag"], r["world"], r["S"], r["H"], r["Hkv"], r["D"], r["causal"], r["mode"], engine)

    single = {key(r, r.get("engine", "triton")): r["tflops_per_gpu"] for r in rows if r["impl"] == "single_gpu"}
    env_col = " NCCL |" if varying else ""
    print(f"| S | Hkv | mode | impl | engine | layout | TFLOP/s/GPU | vs single GPU | peak GiB |{env_col}")
    print("|---|---|---|---|---|---|---|---|---|" + ("---|" if varying else ""))
    for r in rows:
        if r["causal"]:
            engine = r.get("engine", "triton")
            engine = "triton" if engine.startswith("triton") else engine  # the A/B variants
            base = single.get(key(r, engine))
            env = ", ".join(f"{k}={r['nccl_env'][k]}" for k in varying if k in r.get("nccl_env", {}))
            print(f"| {r['S'] // 1024}k | {r['Hkv']} | {r['mode']} | {r['impl']} | {r.get('engine', 'triton')} | "
                  f"{r['layout']}{'/%d' % r['last_hop_parts'] if 'last_hop_parts' in r else ''}"
                  f"{'+%gus' % r['head_start_us'] if 'head_start_us' in r else ''}"
                  f"{' (copy engine' + (', %s signals' % r['ce_signals'] if 'ce_signals' in r else '') + ')' if r.get('transport') == 'copy_engine' else ''} | "
                  f"{r['tflops_per_gpu']:.0f} | {'%.3f' % (r['tflops_per_gpu'] / base) if base else '-'} | "
                  # the copy-engine transport's receive workspace is outside the allocator's peak
                  f"{r['peak_mem_gib'] + r.get('workspace_gib', 0):.1f} |" + (f" {env or '-'} |" if varying else ""))


if __name__ == "__main__":
    main()
