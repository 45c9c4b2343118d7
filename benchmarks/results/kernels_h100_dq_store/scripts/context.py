"""One call's time (events around it) after different calls before it (nothing, our forward,
cuDNN's forward, bf16 matmuls, 20 ms idle, our backward), and its host enqueue time. Run from the
repository root."""
import sys, time, statistics, torch
sys.path.insert(0, 'benchmarks')
from bench_kernels import inputs, make_fns
from ringflash import kernels
torch.backends.cuda.matmul.allow_tf32 = True
for S, causal in ((16384, True), (8192, False)):
    q, k, v, dout = inputs(1, S, 32, 128, torch.bfloat16)
    bf = torch.bfloat16
    ours_fwd = lambda: kernels.forward(q, k, v, causal=causal, out_dtype=bf)
    out, lse = ours_fwd()
    delta = kernels.backward_delta(out, dout)
    ours_bwd = lambda: kernels.backward(dout, q, k, v, lse, delta, causal=causal, grad_dtype=bf)
    cf, cb, _ = make_fns("sdpa_cudnn", q, k, v, dout, causal)
    a = torch.randn(8192, 8192, device="cuda", dtype=bf); b = torch.randn(8192, 8192, device="cuda", dtype=bf)
    mm = lambda: [a @ b for _ in range(3)]
    def idle():
        torch.cuda.synchronize(); time.sleep(0.02)
    pres = {"none": lambda: None, "ours_fwd": ours_fwd, "cudnn_fwd": cf, "matmul": mm, "idle": idle, "ours_bwd": ours_bwd}
    posts = {"ours_bwd": ours_bwd, "cudnn_bwd": cb, "ours_fwd": ours_fwd}
    for _ in range(3):
        ours_fwd(); ours_bwd(); cf(); cb(); mm()
    torch.cuda.synchronize()
    for post_name, post in posts.items():
        for pre_name, pre in pres.items():
            ts, hs = [], []
            for _ in range(12):
                pre()
                e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                e0.record(); h0 = time.perf_counter(); post(); h1 = time.perf_counter(); e1.record()
                hs.append(h1 - h0)
                ts.append((e0, e1))
            torch.cuda.synchronize()
            ms = sorted(x.elapsed_time(y) for x, y in ts)
            print(f"S={S} {'causal' if causal else 'full'} {post_name:9s} after {pre_name:9s}: median {statistics.median(ms):7.3f} ms  min {ms[0]:7.3f}  max {ms[-1]:7.3f}  host {1e3*statistics.median(hs):.3f} ms", flush=True)
