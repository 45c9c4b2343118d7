import sys, os, torch
sys.path.insert(0, "benchmarks"); sys.path.insert(0, ".")
from bench_masks import ringflash_fns, documents
from bench_kernels import bench
from ringflash import kernels
from ringflash.kernels import attention as A
C = A.KernelConfig
S, H, D = 32768, 32, 128
g = torch.Generator(device="cuda").manual_seed(0)
q, k, v, dout = (torch.randn(1, S, H, D, generator=g, device="cuda", dtype=torch.bfloat16) for _ in range(4))
cu = documents(S)
base_kv, base_q, base_f = dict(A.BWD_DKDV_CONFIGS), dict(A.BWD_DQ_CONFIGS), dict(A.FWD_CONFIGS)
for mask in ("window", "documents", "causal"):
    for name, dkdv, dq in [("base", base_kv[128], base_q[128]),
                           ("kv128x128", C(128, 128, 8, 2), base_q[128]),
                           ("kv64x64", C(64, 64, 4, 3), base_q[128]),
                           ("kv64x128s4", C(64, 128, 8, 4), base_q[128]),
                           ("dq128x128", base_kv[128], C(128, 128, 8, 2)),
                           ("dq64x64", base_kv[128], C(64, 64, 4, 3)),
                           ("dq128x64s4", base_kv[128], C(128, 64, 8, 4))]:
        A.BWD_DKDV_CONFIGS[128] = dkdv; A.BWD_DQ_CONFIGS[128] = dq
        fns = ringflash_fns(kernels, q, k, v, dout, mask, cu, 4096)
        try:
            ms = bench(fns["fwdbwd"]); f = bench(fns["fwd"])
            print(f"{mask:>10} {name:>12} fwdbwd {ms:8.3f} ms  bwd~{ms - f:8.3f} ms", flush=True)
        except Exception as e:
            print(mask, name, "failed", type(e).__name__, str(e)[:100], flush=True)
    A.BWD_DKDV_CONFIGS[128] = base_kv[128]; A.BWD_DQ_CONFIGS[128] = base_q[128]
    for name, fc in [("fwd128x64", C(128, 64, 8, 3)), ("fwd128x64w4", C(128, 64, 4, 3)), ("fwd64x128", C(64, 128, 4, 3))]:
        A.FWD_CONFIGS[128] = fc
        fns = ringflash_fns(kernels, q, k, v, dout, mask, cu, 4096)
        print(f"{mask:>10} {name:>12} fwd {bench(fns['fwd']):8.3f} ms", flush=True)
    A.FWD_CONFIGS[128] = base_f[128]
