"""Data parallel x context parallel: a 2-D ("dp", "cp") mesh, ring attention over "cp", DDP over all.

    torchrun --nproc-per-node 4 examples/dp_cp_mesh.py             # CPU (gloo) or GPUs (nccl)
    torchrun --nproc-per-node 8 examples/dp_cp_mesh.py --cp 4

The world is a (dp, cp) mesh: the cp ranks of one row share each sequence (ring attention
over mesh["cp"]), the dp rows see different sequences. The loss of ringflash's GPT is the mean
over the cp group's tokens, scaled so that averaging gradients over *all* dp x cp ranks gives
the exact gradient: so DDP runs over the whole world, as usual.
"""

import argparse
import os

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.nn.parallel import DistributedDataParallel as DDP

from ringflash import shard_batch
from ringflash.models import GPT, GPTConfig

parser = argparse.ArgumentParser()
parser.add_argument("--cp", type=int, default=2)  # context-parallel ranks per sequence
parser.add_argument("--seqlen", type=int, default=256)  # the full sequence, over the cp ranks
parser.add_argument("--steps", type=int, default=5)
args = parser.parse_args()

cuda = torch.cuda.is_available()
if cuda:
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
dist.init_process_group("nccl" if cuda else "gloo")
rank, world = dist.get_rank(), dist.get_world_size()
device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
mesh = init_device_mesh(device.type, (world // args.cp, args.cp), mesh_dim_names=("dp", "cp"))
dp_rank = mesh.get_local_rank("dp")

torch.manual_seed(0)  # DDP broadcasts rank 0's weights anyway
config = GPTConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, layout="zigzag")
model = GPT(config, group=mesh["cp"]).to(device)
model = DDP(model, device_ids=[device.index] if cuda else None)
optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)

# Each dp row its own batch (seeded by dp rank): the same full sequences on the cp ranks of a row.
g = torch.Generator().manual_seed(1000 + dp_rank)
tokens = torch.randint(0, config.vocab_size, (2, args.seqlen), generator=g)
ids_local, labels_local, _ = shard_batch(tokens, layout=config.layout, group=mesh["cp"])  # (2, S/cp)
ids_local, labels_local = ids_local.to(device), labels_local.to(device)

for step in range(args.steps):
    _, loss = model(ids_local, labels_local)  # loss: the mean over this row's sequences
    optimizer.zero_grad(set_to_none=True)
    loss.backward()  # DDP averages the gradients over all dp x cp ranks
    optimizer.step()
    # For the log only: the mean over the dp rows.
    mean = loss.detach().clone()
    dist.all_reduce(mean, group=mesh.get_group("dp"))
    if rank == 0:
        print(f"step {step} loss {mean.item() / mesh.size(0):.4f}")

dist.barrier()  # every rank done with its collectives before any tears its groups down
dist.destroy_process_group()
