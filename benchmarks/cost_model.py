"""Which Ulysses x ring split to use: a cost model of one causal attention layer, forward+backward.

    python benchmarks/cost_model.py --seqlen 1m --nodes 4 --gpus-per-node 8          # every split
    python benchmarks/cost_model.py --seqlen 1m --sweep-nodes 2 4 8 16 32 64           # the best per size

For ``P = nodes x gpus_per_node`` ranks split as ``R`` ring positions x ``U`` Ulysses ranks
(``U`` divides the GPUs of a node, so every all-to-all stays inside a node), bf16, per layer:

* compute: ``3.5 x 4 x S^2 x H x D / 2`` FLOPs (causal, FlashAttention convention), spread
  evenly over the ``P`` ranks (the striped layout's balance), at ``--tflops`` per GPU (the local
  kernel's measured forward+backward rate);
* ring: ``R`` steps of ``1/R`` of the compute each; between steps each rank sends its K/V block
  (``S/R`` tokens x its K/V heads: ``Hkv/U``, or one when ``Hkv < U``) forward, and in the
  backward K/V again plus the float32 dK/dV sum: a step costs ``max(compute, transfer)``, the
  first step of each pass none of the transfer. Hops go over the slowest link of the ring: the
  network (``--net-gbs`` per GPU) once the ring leaves a node, NVLink (``--nvlink-gbs``) inside one;
* all-to-all (``U > 1``): q, k, v in and the output back in the forward, dO in and dQ, dK, dV back
  in the backward, each rank sending ``(U-1)/U`` of its share over NVLink. With ``--chunks C``
  (``HybridGroup(chunks=C)``) the first chunk's exchange in and the last one's out stay exposed
  (``1/C`` of it); the rest runs beside the other chunks' compute and is exposed only where it
  outlasts that compute. Without chunks none of it is hidden.

It ignores the merges, the kernel's efficiency on shorter blocks and launch overheads; the
numbers are estimates to rank the splits, not promises.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass

BYTES = 2  # bf16
GRAD_BYTES = 4  # the float32 dK/dV sum that travels in the backward


@dataclass
class Estimate:
    ring: int
    ulysses: int
    compute_ms: float
    ring_transfer_ms: float  # the transfers of every hop, hidden or not
    ring_exposed_ms: float  # the part of them not hidden behind compute
    all_to_all_ms: float  # every exchange, hidden or not
    total_ms: float
    all_to_all_exposed_ms: float = 0.0  # the part not hidden behind compute (all of it with one chunk)
    chunks: int = 1


def parse_len(s: str) -> int:
    s = s.lower()
    scale = {"k": 1024, "m": 1024 * 1024}.get(s[-1], 1)
    return int(float(s[:-1] if scale > 1 else s) * scale)


def estimate(*, seqlen: int, heads: int, kv_heads: int, head_dim: int, nodes: int, gpus_per_node: int,
             ulysses: int, tflops: float, nvlink_gbs: float, net_gbs: float, chunks: int = 1) -> Estimate:
    """The modelled time of one causal layer, forward+backward, under a ring x ulysses split."""
    P = nodes * gpus_per_node
    if gpus_per_node % ulysses or heads % ulysses:
        raise ValueError(f"ulysses {ulysses} must divide the GPUs per node ({gpus_per_node}) and the heads ({heads})")
    R = P // ulysses
    compute_s = 3.5 * 4 * seqlen * seqlen * heads * head_dim / 2 / P / (tflops * 1e12)
    kv_heads_per_rank = kv_heads // ulysses if kv_heads % ulysses == 0 else 1
    block = seqlen // R * kv_heads_per_rank * head_dim  # elements of one K (or V) block
    link = net_gbs if nodes > 1 and R > 1 and R * ulysses > gpus_per_node else nvlink_gbs
    hop_fwd_s = 2 * block * BYTES / (link * 1e9)
    hop_bwd_s = 2 * block * (BYTES + GRAD_BYTES) / (link * 1e9)
    step_fwd, step_bwd = compute_s / 3.5 / R, compute_s * 2.5 / 3.5 / R
    hops = max(R - 1, 0)
    transfer_s = hops * (hop_fwd_s + hop_bwd_s)
    exposed_s = hops * (max(0.0, hop_fwd_s - step_fwd) + max(0.0, hop_bwd_s - step_bwd))
    a2a_s = 0.0
    if ulysses > 1:
        local = seqlen // P
        kv_sent = kv_heads if kv_heads % ulysses == 0 else ulysses  # replicated K/V heads travel too
        fwd = local * (heads + 2 * kv_sent + heads) * head_dim  # q, k, v in; out back
        bwd = local * (heads + heads + 2 * kv_sent) * head_dim  # dO in; dq, dk, dv back
        a2a_s = (fwd + bwd) * BYTES * (ulysses - 1) / ulysses / (nvlink_gbs * 1e9)
    if chunks < 1:
        raise ValueError(f"chunks must be at least 1; got {chunks}")
    rest = a2a_s * (chunks - 1) / chunks
    a2a_exposed_s = a2a_s / chunks + max(0.0, rest - compute_s * (chunks - 1) / chunks)
    total_s = compute_s + exposed_s + a2a_exposed_s
    ms = 1e3
    return Estimate(R, ulysses, compute_s * ms, transfer_s * ms, exposed_s * ms, a2a_s * ms, total_s * ms,
                    a2a_exposed_s * ms, chunks)


def splits(args, nodes: int) -> list[Estimate]:
    out = []
    for u in range(1, args.gpus_per_node + 1):
        if args.gpus_per_node % u == 0 and args.heads % u == 0 and (args.kv_heads % u == 0 or u % args.kv_heads == 0):
            out.append(estimate(seqlen=args.seqlen, heads=args.heads, kv_heads=args.kv_heads, head_dim=args.head_dim,
                                nodes=nodes, gpus_per_node=args.gpus_per_node, ulysses=u, tflops=args.tflops,
                                nvlink_gbs=args.nvlink_gbs, net_gbs=args.net_gbs, chunks=args.chunks))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seqlen", type=parse_len, default=parse_len("1m"))
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--nodes", type=int, default=4)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--tflops", type=float, default=400.0, help="the local kernel's fwd+bwd TFLOP/s per GPU")
    p.add_argument("--nvlink-gbs", type=float, default=260.0, help="GB/s per GPU per direction inside a node")
    p.add_argument("--net-gbs", type=float, default=25.0, help="GB/s per GPU per direction between nodes")
    p.add_argument("--chunks", type=int, default=1, help="head chunks that pipeline the all-to-alls (HybridGroup(chunks=))")
    p.add_argument("--sweep-nodes", type=int, nargs="*", help="print the best split for each node count")
    p.add_argument("--json", help="write the rows here")
    args = p.parse_args()

    rows = []
    for nodes in args.sweep_nodes or [args.nodes]:
        ests = splits(args, nodes)
        best = min(ests, key=lambda e: e.total_ms)
        for e in ests if not args.sweep_nodes else [best]:
            rows.append({"nodes": nodes, "seqlen": args.seqlen, **asdict(e), "best": e is best})
    print(f"S = {args.seqlen}, H = {args.heads}, Hkv = {args.kv_heads}, D = {args.head_dim}, {args.gpus_per_node} GPUs "
          f"per node, {args.tflops:g} TFLOP/s, NVLink {args.nvlink_gbs:g} GB/s, network {args.net_gbs:g} GB/s per GPU")
    print(f"{'nodes':>5} {'ring x ulysses':>14} {'compute':>9} {'ring xfer':>9} {'exposed':>9} {'a2a':>8} "
          f"{'total ms':>9}")
    for r in rows:
        print(f"{r['nodes']:>5} {str(r['ring']) + ' x ' + str(r['ulysses']):>14} {r['compute_ms']:>9.1f} "
              f"{r['ring_transfer_ms']:>9.1f} {r['ring_exposed_ms']:>9.1f} {r['all_to_all_ms']:>8.1f} "
              f"{r['total_ms']:>9.1f}{'  <- best' if r['best'] and not args.sweep_nodes else ''}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
