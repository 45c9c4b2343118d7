import json, os, importlib, torch, triton, torch.nn.functional as F
from ringflash.kernels.attention import KernelConfig
dev = "cuda"; OUT = os.environ.get("OUT", "/tmp")
fh = open(os.path.join(OUT, "loops2.jsonl"), "w")
gpu = torch.cuda.get_device_name()
mods = {n: importlib.import_module(p + ".kernels") for n, p in
        [("old", "ringflash_old"), ("reorder_dkdv_dq", "ringflash"), ("if_partial", "ringflash_v2"), ("reorder_dkdv", "ringflash_v3")]}
def log(r):
    print(json.dumps(r), flush=True); fh.write(json.dumps(r) + "\n")
def rel(x, r): return ((x.double() - r).norm() / r.norm()).item()
S, H, Hkv, D = 3000, 8, 2, 128
q = torch.randn(1, S, H, D, device=dev, dtype=torch.bfloat16); k = torch.randn(1, S, Hkv, D, device=dev, dtype=torch.bfloat16)
v = torch.randn_like(k); do = torch.randn_like(q)
qq, kk, vv = (t.double().transpose(1, 2).requires_grad_() for t in (q, k, v))
ref = F.scaled_dot_product_attention(qq, kk.repeat_interleave(4, 1), vv.repeat_interleave(4, 1), is_causal=True)
gr = [g.transpose(1, 2) for g in torch.autograd.grad(ref, (qq, kk, vv), do.double().transpose(1, 2))]
r = dict(kind="accuracy", S=S, H=H, Hkv=Hkv, D=D, causal=True)
for name, mod in mods.items():
    out, lse = mod.forward(q, k, v, causal=True); o = out.to(q.dtype); delta = mod.backward_delta(o, do)
    r[name] = [rel(x, y) for x, y in zip(mod.backward(do, q, k, v, lse, delta, causal=True), gr)]
log(r)
shapes = [(128, 16384, 32, True), (128, 16384, 32, False), (128, 16384, 8, True), (128, 16000, 32, True),
          (64, 16384, 32, True), (64, 16384, 32, False), (64, 16384, 8, True), (256, 16384, 32, True)]
variants = list(mods) + ["reorder_dkdv_dq+d64_64x64"]
for D, S, Hkv, causal in shapes:
    H = 32
    q = torch.randn(1, S, H, D, device=dev, dtype=torch.bfloat16); k = torch.randn(1, S, Hkv, D, device=dev, dtype=torch.bfloat16)
    v = torch.randn_like(k); do = torch.randn_like(q)
    f = 2.5 * 4 * H * S * S * D / (2 if causal else 1)
    r = dict(kind="bwd", gpu=gpu, S=S, H=H, Hkv=Hkv, D=D, causal=causal)
    for rnd in range(2):
        for name in variants:
            mod = mods[name.split("+")[0]]
            A = importlib.import_module(mod.__name__ + ".attention")
            saved = A.BWD_DKDV_CONFIGS[64]
            if name.endswith("d64_64x64"):
                A.BWD_DKDV_CONFIGS[64] = KernelConfig(64, 64, 4, 3)
            out, lse = mod.forward(q, k, v, causal=causal); o = out.to(q.dtype); delta = mod.backward_delta(o, do)
            t = triton.testing.do_bench(lambda: (mod.backward_delta(o, do), mod.backward(do, q, k, v, lse, delta, causal=causal)), warmup=20, rep=100)
            A.BWD_DKDV_CONFIGS[64] = saved
            r.setdefault(name, []).append(round(f / t / 1e9, 1))
    log(r)
