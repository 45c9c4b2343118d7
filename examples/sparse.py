"""Sparse attention through the ring: a block pattern, QK-dropping and hash buckets, against the
same masks applied on one process; then a GPT with hash-sparse attention trains a few steps.

    torchrun --nproc-per-node 2 examples/sparse.py        # CPU (gloo) or GPUs (nccl)

A block pattern is global (the same object on every rank). Keep flags and bucket ids are per
(batch, token, head): every rank passes those of its own tokens, cut by the layout like q and k.
"""

import argparse
import os

import torch
import torch.distributed as dist

from ringflash import MultiheadAttention, get_layout, reference, ring_attention, shard_batch, sparse
from ringflash.models import GPT, GPTConfig

parser = argparse.ArgumentParser()
parser.add_argument("--seqlen", type=int, default=1024)  # the full sequence, over all ranks
parser.add_argument("--block", type=int, default=64)  # tokens per block of the block pattern
args = parser.parse_args()

cuda = torch.cuda.is_available()
if cuda:
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
dist.init_process_group("nccl" if cuda else "gloo")
rank, world = dist.get_rank(), dist.get_world_size()
device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
dtype = torch.bfloat16 if cuda else torch.float32

torch.manual_seed(0)  # the same tensors, flags and ids on every rank
S, H, Hkv = args.seqlen, 8, 2
q, k, v = (torch.randn(1, S, h, 64) for h in (H, Hkv, Hkv))  # (batch, seqlen, heads, head_dim)
modes = {
    "block": sparse.block_pattern(S, args.block, local=2, global_=1, random=1),
    "qkdrop": sparse.QKDrop(torch.rand(1, S, H) > 0.5, torch.rand(1, S, Hkv) > 0.5),
    "hash": sparse.HashSparse(torch.randint(0, 4, (1, S, H)), torch.randint(0, 4, (1, S, Hkv)), 4),
}

# Zigzag (or stripes of the block size) keeps each kernel tile inside one block (docs/usage.md).
layout = get_layout("zigzag")
shard = lambda x: layout.shard(x, rank=rank, world_size=world).to(device)  # noqa: E731
worst = 0.0
for name, mode in modes.items():
    if isinstance(mode, sparse.QKDrop):
        local = sparse.QKDrop(shard(mode.q_keep), shard(mode.k_keep))
    elif isinstance(mode, sparse.HashSparse):
        local = sparse.HashSparse(shard(mode.q_buckets), shard(mode.k_buckets), mode.num_buckets)
    else:
        local = mode
    out_l = ring_attention(*(shard(x).to(dtype) for x in (q, k, v)), causal=True, layout=layout, sparsity=local)
    out = layout.unshard(out_l).float().cpu()
    ref, _ = reference.attention(q.double(), k.double(), v.double(), causal=True, sparsity=mode)
    err = ((out.double() - ref).norm() / ref.norm()).item()
    worst = max(worst, err)
    if rank == 0:
        print(f"{name}: relative error {err:.1e}")
mha = MultiheadAttention(128, H, num_kv_heads=Hkv, causal=True, layout=layout).to(device, dtype)  # your model's layer
y_l = mha(shard(torch.randn(1, S, 128)).to(dtype), sparsity=local)  # this batch's bucket ids (local: hash), one call
model = GPT(GPTConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, layout="zigzag", sparsity="hash:4")).to(device)
optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
tokens = torch.randint(0, 256, (1, S))
ids_l, labels_l, _ = shard_batch(tokens.to(device), layout=layout)  # this rank's tokens and targets
for step in range(5):
    _, loss = model(ids_l, labels_l)  # loss: the mean over every rank's tokens
    optimizer.zero_grad(set_to_none=True)
    loss.backward()  # then average the gradients over the ranks (DDP does it)
    for p in model.parameters():
        dist.all_reduce(p.grad)
        p.grad /= world
    optimizer.step()
    if rank == 0:
        print(f"step {step} loss {loss.item():.4f}")
tolerance = 2e-2 if cuda else 1e-5
if rank == 0:
    print("OK" if worst < tolerance else f"FAILED: error {worst:.1e} above {tolerance:.0e}")
dist.barrier()
dist.destroy_process_group()
raise SystemExit(0 if worst < tolerance else 1)
