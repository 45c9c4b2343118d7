# The copy-engine transport's signal timeout (SIGNALS=stream|kernel): rank 1 stops taking part in ring calls; rank 0's
# next call must fail with an error after COPY_ENGINE_TIMEOUT_S instead of hanging.
import os, time, torch, torch.distributed as dist  # noqa: E401
from ringflash import comm, ring_attention
comm.TRANSPORT = "copy_engine"; comm.COPY_ENGINE_TIMEOUT_S = 3; comm.COPY_ENGINE_SIGNALS = os.environ.get("SIGNALS", "stream")
local = int(os.environ["LOCAL_RANK"]); dev = torch.device("cuda", local); torch.cuda.set_device(dev)
dist.init_process_group("nccl", device_id=dev); rank = dist.get_rank()
q = torch.randn(1, 1024, 8, 128, device=dev, dtype=torch.bfloat16)
ring_attention(q, q, q, causal=True); torch.cuda.synchronize(); dist.barrier()
print(f"rank {rank}: first call done", flush=True)
if rank == 0:
    t = time.time()
    try:
        ring_attention(q, q, q, causal=True); torch.cuda.synchronize()
        print(f"rank 0: no error after {time.time() - t:.1f} s", flush=True)
    except Exception as e:  # noqa: BLE001
        print(f"rank 0: {type(e).__name__} after {time.time() - t:.1f} s: {str(e).splitlines()[0][:200]}", flush=True)
else:
    time.sleep(20)
os._exit(0)
