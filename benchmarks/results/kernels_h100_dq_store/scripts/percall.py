"""Each call timed alone (a synchronisation before it), 25 calls, ringflash and SDPA cuDNN: the
spread, and the host time a synchronised call exposes. Run from the repository root."""
import sys, os, torch, statistics
sys.path.insert(0, 'benchmarks')
from bench_kernels import inputs, make_fns
for S, causal in ((16384, True), (8192, True), (16384, False)):
    q, k, v, dout = inputs(1, S, 32, 128, torch.bfloat16)
    for impl in ("ringflash_default", "sdpa_cudnn"):
        fwd, bwd, fwdbwd = make_fns(impl, q, k, v, dout, causal)
        for name, fn in (("bwd", bwd), ("fwdbwd", fwdbwd)):
            for _ in range(3): fn()
            ts = []
            for _ in range(25):
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                torch.cuda.synchronize(); a.record(); fn(); b.record(); torch.cuda.synchronize()
                ts.append(a.elapsed_time(b))
            ts.sort()
            print(f"{impl:18s} S={S} {'causal' if causal else 'full'} {name:6s} min {ts[0]:.3f} med {statistics.median(ts):.3f} max {ts[-1]:.3f} ms  all: {' '.join(f'{t:.2f}' for t in ts)}", flush=True)
