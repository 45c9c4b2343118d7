"""A small language model whose attention runs over a sequence sharded across every rank.

    torchrun --nproc-per-node 2 examples/model.py                  # CPU (gloo) or GPUs (nccl)
    torchrun --nproc-per-node 4 examples/model.py --seqlen 4096

Each rank holds the same weights and its own striped shard of the tokens. The blocks use
ringflash.MultiheadAttention (rotary embeddings from the tokens' global positions); the loss
is the mean over the whole sequence, and averaging the gradients over the ranks gives its exact
gradient. A few AdamW steps on one fixed batch of random tokens, so the loss falls.
"""

import argparse
import os

import torch
import torch.distributed as dist
import torch.nn as nn

from ringflash import MultiheadAttention, shard_batch, sharded_cross_entropy
from ringflash.batch import average_gradients

parser = argparse.ArgumentParser()
parser.add_argument("--seqlen", type=int, default=512)  # the full sequence, over all ranks
parser.add_argument("--dim", type=int, default=64)
parser.add_argument("--steps", type=int, default=10)
args = parser.parse_args()

cuda = torch.cuda.is_available()
if cuda:
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
dist.init_process_group("nccl" if cuda else "gloo")
rank, world = dist.get_rank(), dist.get_world_size()
device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")


class Block(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.norm1, self.norm2 = nn.RMSNorm(dim), nn.RMSNorm(dim)
        # 4 query heads share 2 key/value heads; the input is this rank's striped shard.
        self.attn = MultiheadAttention(dim, 4, num_kv_heads=2, causal=True, layout="striped")
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x):  # (B, S/P, dim)
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


torch.manual_seed(0)  # the same initial weights on every rank
model = nn.Sequential(nn.Embedding(256, args.dim), Block(args.dim), Block(args.dim), nn.Linear(args.dim, 256))
model.to(device)
optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)

# One batch of full sequences, the same on every rank; labels are shifted on the full sequence,
# then ids and labels are cut with the model's layout.
tokens = torch.randint(0, 256, (4, args.seqlen))
ids_local, labels_local, _ = shard_batch(tokens, layout="striped")  # (4, S/P) each
ids_local, labels_local = ids_local.to(device), labels_local.to(device)

for step in range(args.steps):
    logits_local = model(ids_local)  # (4, S/P, 256)
    loss = sharded_cross_entropy(logits_local, labels_local)  # the mean over every rank's tokens
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    average_gradients(model.parameters())  # the exact gradient of the global mean
    optimizer.step()
    if rank == 0:
        print(f"step {step} loss {loss.item():.4f}")

dist.destroy_process_group()
