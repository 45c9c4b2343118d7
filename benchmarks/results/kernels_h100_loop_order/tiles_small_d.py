# D = 16/32/64 backward tile sweep under the masked-loops-first order; D = 16 old vs new.
import json, os, importlib, torch, triton
dev = "cuda"; OUT = os.environ.get("OUT", "/tmp")
fh = open(os.path.join(OUT, "tiles_small_d.jsonl"), "w")
gpu = torch.cuda.get_device_name()
new = importlib.import_module("ringflash.kernels"); old = importlib.import_module("ringflash_old.kernels")
att = importlib.import_module("ringflash.kernels.attention")
KC = att.KernelConfig
def emit(r):
    print(json.dumps(r), flush=True); fh.write(json.dumps(r) + "\n"); fh.flush()
def bench(mod, q, k, v, do, causal):
    out, lse = mod.forward(q, k, v, causal=causal); o = out.to(q.dtype); delta = mod.backward_delta(o, do)
    return triton.testing.do_bench(lambda: (mod.backward_delta(o, do), mod.backward(do, q, k, v, lse, delta, causal=causal)), warmup=20, rep=100)
def inputs(S, H, Hkv, D):
    q = torch.randn(1, S, H, D, device=dev, dtype=torch.bfloat16); k = torch.randn(1, S, Hkv, D, device=dev, dtype=torch.bfloat16)
    return q, k, torch.randn_like(k), torch.randn_like(q)
cands = [KC(64, 64, 4, 3), KC(64, 128, 4, 3), KC(64, 128, 4, 2), KC(64, 128, 8, 3), KC(128, 64, 4, 3), KC(128, 128, 8, 3), KC(32, 128, 4, 3)]
saved = (dict(att.BWD_DKDV_CONFIGS), dict(att.BWD_DKDV_GROUPED_CONFIGS))
H, S = 32, 16384
# 1) old package vs new at D = 16 and 32 (defaults).
for D in (16, 32):
    for Hkv, causal in [(32, True), (32, False), (8, True)]:
        q, k, v, do = inputs(S, H, Hkv, D); f = 2.5 * 4 * H * S * S * D / (2 if causal else 1)
        r = dict(kind="old_new", gpu=gpu, S=S, H=H, Hkv=Hkv, D=D, causal=causal)
        for rnd in range(2):
            for name, mod in (("old", old), ("new", new)):
                r.setdefault(name, []).append(round(f / bench(mod, q, k, v, do, causal) / 1e9, 1))
        emit(r)
# 2) dK/dV tile sweep (MHA and grouped tables set alike).
for D in (16, 32, 64):
    for Hkv, causal in [(32, True), (32, False), (8, True)]:
        q, k, v, do = inputs(S, H, Hkv, D); f = 2.5 * 4 * H * S * S * D / (2 if causal else 1)
        for c in cands:
            att.BWD_DKDV_CONFIGS[D] = c; att.BWD_DKDV_GROUPED_CONFIGS[D] = c
            try:
                t = [round(f / bench(new, q, k, v, do, causal) / 1e9, 1) for _ in range(2)]
            except Exception as e:
                t = repr(e)[:200]
            emit(dict(kind="dkdv_tiles", gpu=gpu, S=S, H=H, Hkv=Hkv, D=D, causal=causal, cfg=list(c), tflops=t))
        att.BWD_DKDV_CONFIGS.clear(); att.BWD_DKDV_CONFIGS.update(saved[0])
        att.BWD_DKDV_GROUPED_CONFIGS.clear(); att.BWD_DKDV_GROUPED_CONFIGS.update(saved[1])
