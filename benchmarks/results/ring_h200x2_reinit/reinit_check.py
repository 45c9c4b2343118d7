"""Ring attention across destroy_process_group + init_process_group in one process: each
round's ring result against float64 attention. argv: transport grow(0/1) free(0/1)."""
import os
import sys
import time
import torch
import torch.distributed as dist
from ringflash import comm, reference, get_layout, ring_attention

transport, grow, free = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
comm.TRANSPORT = transport
local = int(os.environ["LOCAL_RANK"])
torch.cuda.set_device(local)
lay = get_layout("striped")
t0 = time.time()
log = lambda *a: print(f"[{transport} grow={grow} free={free} rank {local} {time.time() - t0:6.1f}s]", *a, flush=True)  # noqa: E731
for rnd in range(3):
    dist.init_process_group("nccl", device_id=torch.device("cuda", local))
    r, P = dist.get_rank(), dist.get_world_size()
    log(f"round {rnd} init, group name {dist.group.WORLD.group_name}")
    g = torch.Generator().manual_seed(100 + rnd)
    S = 2048 * (rnd + 1 if grow else 1)
    q, k, v, do = (torch.randn(1, S, h, 64, generator=g, dtype=torch.float64) for h in (8, 4, 4, 8))
    qq, kk, vv = (x.clone().requires_grad_() for x in (q, k, v))
    ref, _ = reference.attention(qq, kk, vv, causal=True)
    ref.backward(do)
    sh = lambda x: lay.shard(x, rank=r, world_size=P).cuda().bfloat16()  # noqa: E731
    ql, kl, vl = (sh(x).requires_grad_() for x in (q, k, v))
    out = ring_attention(ql, kl, vl, causal=True, layout="striped")
    out.backward(sh(do))
    torch.cuda.synchronize()
    errs = []
    for got, want in zip((out, ql.grad, kl.grad, vl.grad), (ref, qq.grad, kk.grad, vv.grad)):
        mine, want_mine = got.detach().double().cpu(), lay.shard(want, rank=r, world_size=P)
        errs.append(((mine - want_mine).norm() / want_mine.norm()).item())
    log(f"round {rnd} S={S} workspace bytes {comm.workspace_bytes()} errs out/dq/dk/dv " + " ".join(f"{e:.2e}" for e in errs))
    if free:
        comm.free_workspaces()
    dist.destroy_process_group()
    log(f"round {rnd} destroyed")
