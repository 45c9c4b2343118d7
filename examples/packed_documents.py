"""Packed documents and a sliding window through the ring, against attention over the whole sequence.

    torchrun --nproc-per-node 2 examples/packed_documents.py        # CPU (gloo) or GPUs (nccl)
    torchrun --nproc-per-node 4 examples/packed_documents.py --seqlen 8192

Several documents of random lengths are packed into one sequence; `cu_seqlens` holds their
boundaries over the whole sequence (the same on every rank). Every rank passes its striped shard
with those boundaries and a causal window; the gathered result is compared with the same masks
applied on one process. Then a GPT trains a few steps on the packed batch: shard_batch cuts it,
restarts the positions at each document, and stops each document's last token from predicting
the next document.
"""

import argparse
import os

import torch
import torch.distributed as dist

from ringflash import get_layout, reference, ring_attention, shard_batch
from ringflash.models import GPT, GPTConfig

parser = argparse.ArgumentParser()
parser.add_argument("--seqlen", type=int, default=1024)  # the full sequence, over all ranks
parser.add_argument("--window", type=int, default=100)  # each token sees itself and this many before it
args = parser.parse_args()

cuda = torch.cuda.is_available()
if cuda:
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
dist.init_process_group("nccl" if cuda else "gloo")
rank, world = dist.get_rank(), dist.get_world_size()
device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
dtype = torch.bfloat16 if cuda else torch.float32

torch.manual_seed(0)  # the same documents, tensors and weights on every rank
ends = sorted(torch.randperm(args.seqlen - 1)[:7].add(1).tolist())  # 8 documents, any lengths
cu = [0, *ends, args.seqlen]
q, k, v = (torch.randn(1, args.seqlen, h, 64) for h in (8, 2, 2))  # (batch, seqlen, heads, head_dim)

layout = get_layout("striped")
q_l, k_l, v_l = (layout.shard(x, rank=rank, world_size=world).to(device, dtype) for x in (q, k, v))
out_l = ring_attention(q_l, k_l, v_l, causal=True, window=(args.window, 0), cu_seqlens=cu, layout=layout)
out = layout.unshard(out_l).float().cpu()
ref, _ = reference.attention(q.double(), k.double(), v.double(), causal=True, window=(args.window, 0), cu_seqlens=cu)
err = ((out.double() - ref).norm() / ref.norm()).item()
if rank == 0:
    print(f"documents {cu}: relative error {err:.1e}")

model = GPT(GPTConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, window=args.window)).to(device)
optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
tokens = torch.randint(0, 256, (1, args.seqlen))
ids_l, labels_l, *_ = shard_batch(tokens.to(device), layout="striped", cu_seqlens=cu)
for step in range(5):
    _, loss = model(ids_l, labels_l, cu_seqlens=cu)  # loss: the mean over every rank's tokens
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
    print("OK" if err < tolerance else f"FAILED: error {err:.1e} above {tolerance:.0e}")
dist.destroy_process_group()
raise SystemExit(0 if err < tolerance else 1)
