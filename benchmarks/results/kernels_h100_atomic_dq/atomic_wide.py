import json, os, torch, triton
from ringflash import kernels
from ringflash.kernels import attention as A
A.BWD_DQ_PARTS = 1
dev = "cuda"
OUT = os.environ.get("OUT", "/tmp")
fh = open(os.path.join(OUT, "atomic_wide.jsonl"), "w")
print(torch.cuda.get_device_name())
for D in (128, 64):
    for S in (8192, 32768):
        for Hkv in (32, 8):
            for causal in (True, False):
                if D == 64 and (Hkv == 8 or S == 8192):
                    continue
                q = torch.randn(1, S, 32, D, device=dev, dtype=torch.bfloat16)
                k = torch.randn(1, S, Hkv, D, device=dev, dtype=torch.bfloat16); v = torch.randn_like(k); do = torch.randn_like(q)
                out, lse = kernels.forward(q, k, v, causal=causal); o = out.to(q.dtype); delta = kernels.backward_delta(o, do)
                f = 4 * 32 * S * S * D / (2 if causal else 1) * 2.5
                r = dict(gpu=torch.cuda.get_device_name(), S=S, H=32, Hkv=Hkv, D=D, causal=causal, mode="bwd")
                for rnd in range(2):  # interleaved A/B, two rounds
                    for det in (True, False):
                        t = triton.testing.do_bench(lambda: kernels.backward(do, q, k, v, lse, delta, causal=causal, deterministic=det), warmup=30, rep=200)
                        r.setdefault("det" if det else "atomic", []).append(round(f / t / 1e9, 1))
                r["ratio"] = round(max(r["atomic"]) / max(r["det"]), 3)
                print(json.dumps(r), flush=True); fh.write(json.dumps(r) + "\n")
