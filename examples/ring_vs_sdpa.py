"""Ring attention over a sharded sequence equals SDPA over the whole sequence, gradients included.

    torchrun --nproc-per-node 2 examples/ring_vs_sdpa.py                  # CPU (gloo) or GPUs (nccl)
    torchrun --nproc-per-node 4 examples/ring_vs_sdpa.py --seqlen 4096

Every rank draws the same seeded q, k, v (the full sequence), keeps its striped shard, runs
causal ring attention and its backward, then gathers the shards back. Each rank compares them
with PyTorch's scaled_dot_product_attention on the full tensors (in float32); rank 0 prints
the relative errors, and every rank exits with status 1 if one is above the tolerance.
"""

import argparse
import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ringflash import get_layout, ring_attention

parser = argparse.ArgumentParser()
parser.add_argument("--batch", type=int, default=2)
parser.add_argument("--seqlen", type=int, default=1024)  # the full sequence, over all ranks
parser.add_argument("--heads", type=int, default=8)
parser.add_argument("--kv-heads", type=int, default=2)  # GQA: only these heads travel the ring
parser.add_argument("--head-dim", type=int, default=64)
args = parser.parse_args()

cuda = torch.cuda.is_available()
if cuda:
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
dist.init_process_group("nccl" if cuda else "gloo")
rank, world = dist.get_rank(), dist.get_world_size()
device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
dtype, tol = (torch.bfloat16, 2e-2) if cuda else (torch.float32, 1e-4)  # Triton on GPUs, reference on CPU

# The same full tensors on every rank (same seed), and the gradient of the output to push back.
g = torch.Generator(device=device).manual_seed(0)
B, S, H, Hkv, D = args.batch, args.seqlen, args.heads, args.kv_heads, args.head_dim
q = torch.randn(B, S, H, D, device=device, dtype=dtype, generator=g)
k = torch.randn(B, S, Hkv, D, device=device, dtype=dtype, generator=g)
v = torch.randn(B, S, Hkv, D, device=device, dtype=dtype, generator=g)
dout = torch.randn(B, S, H, D, device=device, dtype=dtype, generator=g)

# This rank's shards: tokens rank, rank + P, rank + 2P, ... (balanced causal work).
layout = get_layout("striped")
q_local, k_local, v_local = (layout.shard(t, rank=rank, world_size=world).requires_grad_() for t in (q, k, v))
out_local = ring_attention(q_local, k_local, v_local, causal=True, layout=layout)  # (B, S/P, H, D)
out_local.backward(layout.shard(dout, rank=rank, world_size=world))
ring = [layout.unshard(t.detach()) for t in (out_local, q_local.grad, k_local.grad, v_local.grad)]

# SDPA over the full sequence, in float32: (B, H, S, D), with the K/V heads repeated for GQA.
q32, k32, v32 = (t.float().requires_grad_() for t in (q, k, v))
out32 = F.scaled_dot_product_attention(
    q32.transpose(1, 2),
    k32.repeat_interleave(H // Hkv, dim=2).transpose(1, 2),
    v32.repeat_interleave(H // Hkv, dim=2).transpose(1, 2),
    is_causal=True,
).transpose(1, 2)  # (B, S, H, D)
out32.backward(dout.float())
sdpa = [out32.detach(), q32.grad, k32.grad, v32.grad]

errors = {name: ((a.float() - b).norm() / b.norm()).item() for name, a, b in zip(["out", "dq", "dk", "dv"], ring, sdpa)}
if rank == 0:
    print(f"ring attention (striped, causal) on {world} ranks, {dtype} on {device.type}, "
          f"(B, S, H, Hkv, D) = {(B, S, H, Hkv, D)}, vs SDPA in float32")
    for name, err in errors.items():
        print(f"{name:>3} relative error {err:.2e}")
ok = max(errors.values()) <= tol
if rank == 0:
    print(f"max relative error {max(errors.values()):.2e} {'<=' if ok else '>'} tolerance {tol:.0e}: {'OK' if ok else 'FAIL'}")
dist.destroy_process_group()
sys.exit(0 if ok else 1)
