import json, os, torch, triton, torch.nn.functional as F
from ringflash import kernels
from ringflash.kernels import attention as A
from ringflash.kernels.attention import KernelConfig
dev = "cuda"; OUT = os.environ.get("OUT", "/tmp")
fh = open(os.path.join(OUT, "ws_fwd.jsonl"), "w")
print(torch.cuda.get_device_name(), triton.__version__)
S = 16384
q = torch.randn(1, S, 32, 128, device=dev, dtype=torch.bfloat16); k = torch.randn_like(q); v = torch.randn_like(q)
ref = {c: kernels.forward(q, k, v, causal=c)[0] for c in (True, False)}
for causal in (True, False):
    f = 4 * 32 * S * S * 128 / (2 if causal else 1)
    for cfg in [(128, 128, 8, 3), (128, 128, 8, 2), (128, 64, 4, 3), (128, 128, 4, 3), (128, 64, 8, 3), (64, 128, 4, 3)]:
        for ws in (False, True):
            A.FWD_CONFIGS[128] = KernelConfig(*cfg); A.FWD_WARP_SPEC = ws
            r = dict(S=S, causal=causal, cfg=cfg, ws=ws)
            try:
                o = kernels.forward(q, k, v, causal=causal)[0]
                r["maxdiff"] = (o - ref[causal]).abs().max().item()
                r["tflops"] = round(f / triton.testing.do_bench(lambda: kernels.forward(q, k, v, causal=causal), warmup=30, rep=200) / 1e9, 1)
            except Exception as e:
                r["error"] = str(e)[:160]
            print(json.dumps(r), flush=True); fh.write(json.dumps(r) + "\n")
    with torch.nn.attention.sdpa_kernel([torch.nn.attention.SDPBackend.CUDNN_ATTENTION]):
        qs, ks, vs = (t.transpose(1, 2) for t in (q, k, v))
        t = triton.testing.do_bench(lambda: F.scaled_dot_product_attention(qs, ks, vs, is_causal=causal), warmup=30, rep=200)
    r = dict(S=S, causal=causal, impl="cudnn", tflops=round(f / t / 1e9, 1)); print(json.dumps(r)); fh.write(json.dumps(r) + "\n")
