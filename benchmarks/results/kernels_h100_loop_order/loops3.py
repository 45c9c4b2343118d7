import json, os, importlib, torch, triton
dev = "cuda"; OUT = os.environ.get("OUT", "/tmp")
fh = open(os.path.join(OUT, "loops3.jsonl"), "w")
gpu = torch.cuda.get_device_name()
mods = {n: importlib.import_module(p + ".kernels") for n, p in [("old", "ringflash_old"), ("new", "ringflash")]}
for D, S, Hkv, causal in [(32, 16384, 32, True), (32, 16384, 32, False), (32, 16384, 8, True), (128, 16384, 32, True), (64, 16384, 32, True)]:
    H = 32
    q = torch.randn(1, S, H, D, device=dev, dtype=torch.bfloat16); k = torch.randn(1, S, Hkv, D, device=dev, dtype=torch.bfloat16)
    v = torch.randn_like(k); do = torch.randn_like(q)
    f = 2.5 * 4 * H * S * S * D / (2 if causal else 1)
    r = dict(kind="bwd", gpu=gpu, S=S, H=H, Hkv=Hkv, D=D, causal=causal)
    for rnd in range(2):
        for name, mod in mods.items():
            out, lse = mod.forward(q, k, v, causal=causal); o = out.to(q.dtype); delta = mod.backward_delta(o, do)
            t = triton.testing.do_bench(lambda: (mod.backward_delta(o, do), mod.backward(do, q, k, v, lse, delta, causal=causal)), warmup=20, rep=100)
            r.setdefault(name, []).append(round(f / t / 1e9, 1))
    print(json.dumps(r), flush=True); fh.write(json.dumps(r) + "\n")
