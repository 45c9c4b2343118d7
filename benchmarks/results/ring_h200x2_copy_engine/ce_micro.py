# How much a ring transfer slows the attention kernel it runs beside: NCCL P2P against a
# copy-engine write into the peer's symmetric-memory buffer. torchrun --nproc-per-node 2.
import json, os, torch, torch.distributed as dist
import torch.distributed._symmetric_memory as symm_mem
from ringflash import kernels
os.environ.setdefault("TORCH_NCCL_HIGH_PRIORITY", "1")
dist.init_process_group("nccl"); rank, world = dist.get_rank(), dist.get_world_size()
dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))); torch.cuda.set_device(dev)
OUT = os.environ.get("OUT", "/tmp"); nxt, prv = (rank + 1) % world, (rank - 1) % world
res = []
for S, Hkv, causal in [(8192, 32, True), (8192, 32, False), (8192, 8, True), (32768, 32, True)]:
    H, D = 32, 128
    q = torch.randn(1, S, H, D, device=dev, dtype=torch.bfloat16); k = torch.randn(1, S, Hkv, D, device=dev, dtype=torch.bfloat16); v = torch.randn_like(k)
    n = 2 * k.numel()
    src = torch.randn(n, device=dev, dtype=torch.bfloat16); dst = torch.empty_like(src)
    buf = symm_mem.empty(n, dtype=torch.bfloat16, device=dev); hdl = symm_mem.rendezvous(buf, dist.group.WORLD)
    peer = hdl.get_buffer(nxt, (n,), torch.bfloat16)
    side = torch.cuda.Stream(device=dev)
    def compute():
        kernels.forward(q, k, v, causal=causal)
    def nccl():
        return dist.batch_isend_irecv([dist.P2POp(dist.isend, src, nxt), dist.P2POp(dist.irecv, dst, prv)])
    def ce():
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            peer.copy_(src)
    def run(mode, iters=20):
        tc, tt = [], []
        for i in range(iters + 3):
            dist.barrier(); torch.cuda.synchronize()
            e0, e1, e2 = (torch.cuda.Event(enable_timing=True) for _ in range(3))
            e0.record()
            w = None
            if mode in ("nccl", "nccl_only"): w = nccl()
            if mode in ("ce", "ce_only"): ce()
            if not mode.endswith("_only"): compute()
            e1.record()
            if w: [x.wait() for x in w]
            if mode.startswith("ce"): torch.cuda.current_stream().wait_stream(side)
            e2.record(); torch.cuda.synchronize()
            if i >= 3: tc.append(e0.elapsed_time(e1)); tt.append(e0.elapsed_time(e2))
        tc.sort(); tt.sort()
        return round(tc[len(tc) // 2], 3), round(tt[len(tt) // 2], 3)
    row = dict(S=S, Hkv=Hkv, causal=causal, mib=round(n * 2 / 2**20, 1))
    for mode in ("compute", "nccl_only", "ce_only", "nccl", "ce", "compute"):
        row[mode] = run(mode)
    # correctness of the CE write: the peer's buffer holds our src
    dist.barrier(); torch.cuda.synchronize()
    ok = torch.equal(buf, hdl.get_buffer(rank, (n,), torch.bfloat16))
    peer.copy_(src); torch.cuda.synchronize(); dist.barrier()
    got = buf.clone(); exp = torch.empty_like(src); [w.wait() for w in dist.batch_isend_irecv([dist.P2POp(dist.isend, src, nxt), dist.P2POp(dist.irecv, exp, prv)])]; torch.cuda.synchronize()
    row["ce_data_ok"] = bool(ok and torch.equal(got, exp))
    if rank == 0:
        print(json.dumps(row), flush=True); res.append(row)
if rank == 0:
    with open(os.path.join(OUT, "ce_micro.jsonl"), "w") as f:
        for r in res: f.write(json.dumps(r) + "\n")
dist.destroy_process_group()
