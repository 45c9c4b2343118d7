import json, os, sys, torch, triton, torch.nn.functional as F
import ringflash.kernels as new
import ringflash_old.kernels as old
dev = "cuda"; OUT = os.environ.get("OUT", "/tmp")
fh = open(os.path.join(OUT, "loops_ab.jsonl"), "w")
gpu = torch.cuda.get_device_name()
print(gpu, triton.__version__, flush=True)
def log(r):
    print(json.dumps(r), flush=True); fh.write(json.dumps(r) + "\n")
def rel(x, r): return ((x.double() - r).norm() / r.norm()).item()
# accuracy against float64, odd length, GQA, causal and full
for causal in (True, False):
    S, H, Hkv, D = 3000, 8, 2, 128
    q = torch.randn(1, S, H, D, device=dev, dtype=torch.bfloat16); k = torch.randn(1, S, Hkv, D, device=dev, dtype=torch.bfloat16)
    v = torch.randn_like(k); do = torch.randn_like(q)
    qq, kk, vv = (t.double().transpose(1, 2).requires_grad_() for t in (q, k, v))
    ref = F.scaled_dot_product_attention(qq, kk.repeat_interleave(4, 1), vv.repeat_interleave(4, 1), is_causal=causal)
    gr = [g.transpose(1, 2) for g in torch.autograd.grad(ref, (qq, kk, vv), do.double().transpose(1, 2))]
    ref = ref.transpose(1, 2)
    r = dict(kind="accuracy", S=S, H=H, Hkv=Hkv, D=D, causal=causal)
    for name, mod in (("old", old), ("new", new)):
        out, lse = mod.forward(q, k, v, causal=causal); o = out.to(q.dtype); delta = mod.backward_delta(o, do)
        g = mod.backward(do, q, k, v, lse, delta, causal=causal)
        r[name] = [rel(o, ref)] + [rel(x, y) for x, y in zip(g, gr)]
    log(r)
shapes = [(128, 16384, 32, True), (128, 16384, 32, False), (128, 8192, 32, True), (128, 32768, 32, True),
          (128, 16384, 8, True), (128, 16384, 8, False), (64, 16384, 32, True), (64, 16384, 8, True), (64, 16384, 32, False),
          (256, 16384, 32, True), (96, 16384, 32, True), (128, 16000, 32, True)]
for D, S, Hkv, causal in shapes:
    H = 32
    q = torch.randn(1, S, H, D, device=dev, dtype=torch.bfloat16); k = torch.randn(1, S, Hkv, D, device=dev, dtype=torch.bfloat16)
    v = torch.randn_like(k); do = torch.randn_like(q)
    f = 4 * H * S * S * D / (2 if causal else 1)
    r = dict(kind="speed", gpu=gpu, S=S, H=H, Hkv=Hkv, D=D, causal=causal)
    for rnd in range(2):
        for name, mod in (("old", old), ("new", new)):
            out, lse = mod.forward(q, k, v, causal=causal); o = out.to(q.dtype); delta = mod.backward_delta(o, do)
            tf = triton.testing.do_bench(lambda: mod.forward(q, k, v, causal=causal), warmup=25, rep=150)
            tb = triton.testing.do_bench(lambda: (mod.backward_delta(o, do), mod.backward(do, q, k, v, lse, delta, causal=causal)), warmup=25, rep=150)
            r.setdefault(name + "_fwd", []).append(round(f / tf / 1e9, 1)); r.setdefault(name + "_bwd", []).append(round(2.5 * f / tb / 1e9, 1))
    r["fwd_ratio"] = round(max(r["new_fwd"]) / max(r["old_fwd"]), 3); r["bwd_ratio"] = round(max(r["new_bwd"]) / max(r["old_bwd"]), 3)
    log(r)
for causal in (True, False):
    S = 16384
    q = torch.randn(1, 32, S, 128, device=dev, dtype=torch.bfloat16, requires_grad=True); k = torch.randn_like(q, requires_grad=True); v = torch.randn_like(q, requires_grad=True)
    f = 4 * 32 * S * S * 128 / (2 if causal else 1)
    with torch.nn.attention.sdpa_kernel([torch.nn.attention.SDPBackend.CUDNN_ATTENTION]):
        o = F.scaled_dot_product_attention(q, k, v, is_causal=causal); do = torch.randn_like(o)
        tf = triton.testing.do_bench(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal), warmup=25, rep=150)
        tb = triton.testing.do_bench(lambda: torch.autograd.grad(o, (q, k, v), do, retain_graph=True), warmup=25, rep=150)
    log(dict(kind="speed", impl="sdpa_cudnn", S=S, D=128, Hkv=32, causal=causal, fwd=round(f / tf / 1e9, 1), bwd=round(2.5 * f / tb / 1e9, 1)))
