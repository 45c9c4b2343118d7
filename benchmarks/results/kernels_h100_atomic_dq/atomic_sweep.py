import json, os, sys, time, itertools
import torch, triton
import torch.nn.functional as F
from ringflash import kernels
from ringflash.kernels import attention as A
from ringflash.kernels.attention import KernelConfig
OUT = os.environ.get("OUT", "/tmp")
T0 = time.time()
dev = "cuda"
print(torch.cuda.get_device_name(), triton.__version__, torch.__version__, flush=True)
rec = open(os.path.join(OUT, "atomic_sweep.jsonl"), "w")

def log(**r):
    print(json.dumps(r), flush=True); rec.write(json.dumps(r) + "\n"); rec.flush()

def mk(S, H, Hkv, D, seed=0):
    g = torch.Generator(device=dev).manual_seed(seed)
    q = torch.randn(1, S, H, D, device=dev, dtype=torch.bfloat16, generator=g)
    k = torch.randn(1, S, Hkv, D, device=dev, dtype=torch.bfloat16, generator=g)
    v = torch.randn(1, S, Hkv, D, device=dev, dtype=torch.bfloat16, generator=g)
    do = torch.randn(1, S, H, D, device=dev, dtype=torch.bfloat16, generator=g)
    return q, k, v, do

def fl(S, H, D, causal):
    return 2.5 * 4 * H * S * S * D / (2 if causal else 1)

def rel(x, r):
    return ((x.double() - r).norm() / r.norm()).item()

# correctness vs float64, S=2k (and odd 3000 GQA)
for (S, H, Hkv, D, causal) in [(2048, 8, 8, 128, True), (3000, 8, 2, 128, True), (2048, 8, 8, 64, False)]:
    q, k, v, do = mk(S, H, Hkv, D, seed=1)
    out, lse = kernels.forward(q, k, v, causal=causal)
    o = out.to(q.dtype)
    delta = kernels.backward_delta(o, do)
    qq, kk, vv = (t.double().transpose(1, 2).requires_grad_() for t in (q, k, v))
    G = H // Hkv
    ref = F.scaled_dot_product_attention(qq, kk.repeat_interleave(G, 1), vv.repeat_interleave(G, 1), is_causal=causal)
    gr = torch.autograd.grad(ref, (qq, kk, vv), do.double().transpose(1, 2))
    gr = [g.transpose(1, 2) for g in gr]
    res = {}
    for det in (True, False):
        g = kernels.backward(do, q, k, v, lse, delta, causal=causal, deterministic=det)
        res["det" if det else "atomic"] = [rel(x, r) for x, r in zip(g, gr)]
    g2 = kernels.backward(do, q, k, v, lse, delta, causal=causal, deterministic=False)
    g1 = kernels.backward(do, q, k, v, lse, delta, causal=causal, deterministic=False)
    res["atomic_repeat_dkdv_equal"] = bool(torch.equal(g1[1], g2[1]) and torch.equal(g1[2], g2[2]))
    res["atomic_repeat_dq_maxdiff"] = (g1[0] - g2[0]).abs().max().item()
    with torch.nn.attention.sdpa_kernel([torch.nn.attention.SDPBackend.CUDNN_ATTENTION]):
        qs, ks, vs = (t.transpose(1, 2).detach().requires_grad_() for t in (q, k, v))
        o2 = F.scaled_dot_product_attention(qs, ks.repeat_interleave(G, 1), vs.repeat_interleave(G, 1), is_causal=causal)
        gs = torch.autograd.grad(o2, (qs, ks, vs), do.transpose(1, 2))
    res["cudnn"] = [rel(x.transpose(1, 2), r) for x, r in zip(gs, gr)]
    log(kind="check", S=S, H=H, Hkv=Hkv, D=D, causal=causal, **res)

def bench_ours(q, k, v, do, causal, det, cfg=None):
    out, lse = kernels.forward(q, k, v, causal=causal)
    o = out.to(q.dtype)
    saved = dict(A.BWD_ATOMIC_CONFIGS)
    if cfg is not None:
        A.BWD_ATOMIC_CONFIGS[q.shape[-1]] = cfg
    try:
        def f():
            delta = kernels.backward_delta(o, do)
            kernels.backward(do, q, k, v, lse, delta, causal=causal, deterministic=det)
        f(); torch.cuda.synchronize()
        return triton.testing.do_bench(f, warmup=50, rep=300)
    finally:
        A.BWD_ATOMIC_CONFIGS.clear(); A.BWD_ATOMIC_CONFIGS.update(saved)

def bench_sdpa(q, k, v, do, causal, backend):
    G = q.shape[2] // k.shape[2]
    with torch.nn.attention.sdpa_kernel([backend]):
        qs, ks, vs = (t.transpose(1, 2).detach().requires_grad_() for t in (q, k, v))
        o = F.scaled_dot_product_attention(qs, ks.repeat_interleave(G, 1) if G > 1 else ks,
                                           vs.repeat_interleave(G, 1) if G > 1 else vs, is_causal=causal)
        dos = do.transpose(1, 2)
        f = lambda: torch.autograd.grad(o, (qs, ks, vs), dos, retain_graph=True)
        f(); torch.cuda.synchronize()
        return triton.testing.do_bench(f, warmup=50, rep=300)

SWEEP = [KernelConfig(*c) for c in [(64, 128, 8, 3), (64, 128, 8, 2), (128, 128, 8, 2), (64, 64, 4, 3),
                                    (128, 64, 8, 3), (32, 128, 8, 3), (64, 128, 4, 2)]]
S = 16384
for causal in (True, False):
    q, k, v, do = mk(S, 32, 32, 128)
    f = fl(S, 32, 128, causal)
    t = bench_ours(q, k, v, do, causal, True)
    log(kind="sweep", S=S, causal=causal, impl="det", tflops=f / t / 1e9)
    for cfg in SWEEP:
        try:
            t = bench_ours(q, k, v, do, causal, False, cfg)
            log(kind="sweep", S=S, causal=causal, impl="atomic", cfg=list(cfg), tflops=f / t / 1e9)
        except Exception as e:
            log(kind="sweep", S=S, causal=causal, impl="atomic", cfg=list(cfg), error=str(e)[:200])
        if time.time() - T0 > 420:
            break
    log(kind="sweep", S=S, causal=causal, impl="cudnn",
        tflops=f / bench_sdpa(q, k, v, do, causal, torch.nn.attention.SDPBackend.CUDNN_ATTENTION) / 1e9)
print("elapsed", time.time() - T0)
