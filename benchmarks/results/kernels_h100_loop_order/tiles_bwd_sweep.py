# Backward launch configs re-swept under the masked-loops-first order: dK/dV and dQ tiles at
# D = 128, 64, 256 (one table varied at a time, the other at its default).
import json, os, importlib, torch, triton
dev = "cuda"; OUT = os.environ.get("OUT", "/tmp")
fh = open(os.path.join(OUT, "tiles_bwd_sweep.jsonl"), "w")
gpu = torch.cuda.get_device_name()
new = importlib.import_module("ringflash.kernels"); att = importlib.import_module("ringflash.kernels.attention")
KC = att.KernelConfig
def emit(r):
    print(json.dumps(r), flush=True); fh.write(json.dumps(r) + "\n"); fh.flush()
def bench(q, k, v, do, causal):
    out, lse = new.forward(q, k, v, causal=causal); o = out.to(q.dtype); delta = new.backward_delta(o, do)
    return triton.testing.do_bench(lambda: (new.backward_delta(o, do), new.backward(do, q, k, v, lse, delta, causal=causal)), warmup=20, rep=100)
H, S = 32, 16384
plan = {
    128: dict(dkdv=[KC(64, 128, 8, 3), KC(64, 128, 8, 2), KC(128, 128, 8, 2), KC(64, 64, 4, 3), KC(64, 64, 8, 3), KC(128, 64, 8, 3), KC(32, 128, 8, 3)],
              dq=[KC(128, 64, 8, 3), KC(128, 64, 8, 2), KC(128, 128, 8, 2), KC(64, 64, 4, 3), KC(64, 128, 8, 3), KC(128, 32, 8, 3), KC(64, 64, 8, 3)],
              cases=[(32, True), (32, False), (8, True)]),
    64: dict(dkdv=[], dq=[KC(128, 64, 4, 3), KC(128, 64, 8, 3), KC(64, 64, 4, 3), KC(128, 128, 8, 3), KC(64, 128, 4, 3)],
             cases=[(32, True), (8, True)]),
    256: dict(dkdv=[KC(64, 64, 8, 2), KC(32, 64, 4, 2), KC(64, 32, 8, 2), KC(64, 64, 8, 1), KC(32, 64, 8, 2)],
              dq=[KC(128, 32, 8, 2), KC(64, 32, 4, 2), KC(64, 64, 8, 2), KC(128, 64, 8, 2), KC(64, 32, 8, 2)],
              cases=[(32, True)]),
}
for D, p in plan.items():
    for Hkv, causal in p["cases"]:
        q = torch.randn(1, S, H, D, device=dev, dtype=torch.bfloat16); k = torch.randn(1, S, Hkv, D, device=dev, dtype=torch.bfloat16)
        v = torch.randn_like(k); do = torch.randn_like(q)
        f = 2.5 * 4 * H * S * S * D / (2 if causal else 1)
        for table_name, table in (("dkdv", att.BWD_DKDV_CONFIGS), ("dq", att.BWD_DQ_CONFIGS)):
            saved = table[D]
            grouped_saved = att.BWD_DKDV_GROUPED_CONFIGS.get(D)
            for c in p[table_name]:
                table[D] = c
                if table_name == "dkdv" and grouped_saved is not None:
                    att.BWD_DKDV_GROUPED_CONFIGS[D] = c
                try:
                    t = [round(f / bench(q, k, v, do, causal) / 1e9, 1) for _ in range(2)]
                except Exception as e:
                    t = repr(e)[:160]
                emit(dict(gpu=gpu, S=S, H=H, Hkv=Hkv, D=D, causal=causal, table=table_name, cfg=list(c), tflops=t))
            table[D] = saved
            if grouped_saved is not None:
                att.BWD_DKDV_GROUPED_CONFIGS[D] = grouped_saved
