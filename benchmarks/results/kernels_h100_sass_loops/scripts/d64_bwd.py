"""D = 64 backward: the Hopper backward (ordered dQ, two writers) per dK/dV config, the Triton backward, cuDNN."""
# Run from the repository root: PYTHONPATH=. python3 benchmarks/results/kernels_h100_sass_loops/scripts/d64_bwd.py out.json
import json, sys, torch, triton, torch.nn.functional as F
sys.path.insert(0, "benchmarks")
from bench_kernels import flops, inputs
from ringflash import kernels
from ringflash.kernels import attention as A
from torch.nn.attention import SDPBackend, sdpa_kernel
C = kernels.KernelConfig
ms = lambda fn: (fn(), torch.cuda.synchronize(), triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median"))[2]
rows = []
for S in (8192, 16384):
    q, k, v, do = inputs(1, S, 32, 64, torch.bfloat16)
    for causal in (True, False):
        f = flops("bwd", 1, 32, S, 64, causal)
        qs, ks, vs = (t.detach().transpose(1, 2).clone().requires_grad_() for t in (q, k, v))
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            tf = ms(lambda: F.scaled_dot_product_attention(qs, ks, vs, is_causal=causal))
            tfb = ms(lambda: torch.autograd.grad(F.scaled_dot_product_attention(qs, ks, vs, is_causal=causal), (qs, ks, vs), do.transpose(1, 2)))
        res = {"cudnn": tfb - tf}
        A.HOPPER_FORWARD = A.HOPPER_BACKWARD = False
        out, lse = kernels.forward(q, k, v, causal=causal)
        delta = kernels.backward_delta(out, do)
        res["triton"] = ms(lambda: kernels.backward(do, q, k, v, lse, delta, causal=causal))
        A.HOPPER_BACKWARD = True; A.HOPPER_BWD_HEAD_DIMS = (64, 128)
        for cfg in (C(64, 128, 8, 3), C(64, 128, 8, 2), C(128, 128, 8, 2)):
            A.HOPPER_BWD_DKDV_SMEM_P_CONFIGS[64] = cfg
            for dq in ("ordered", "atomic"):
                A.HOPPER_BWD_DQ = dq
                try:
                    res[f"hopper_{dq}_{list(cfg)}"] = ms(lambda: kernels.backward(do, q, k, v, lse, delta, causal=causal))
                except Exception as e:
                    print("error", cfg, dq, repr(e)[:200])
        A.HOPPER_BWD_DQ = "ordered"; A.HOPPER_BWD_DKDV_SMEM_P_CONFIGS[64] = C(64, 128, 8, 3)
        for name, t in res.items():
            r = {"S": S, "causal": causal, "impl": name, "ms": t, "tflops": f / t * 1e-9, "vs_cudnn": res["cudnn"] / t}
            rows.append(r); print(f"{S:6d} {'causal' if causal else 'full  '} {name:36s} {t:7.3f} ms {r['tflops']:6.1f} TFLOP/s  {r['vs_cudnn']:.2f}x cuDNN", flush=True)
json.dump(rows, open(sys.argv[1], "w"), indent=1)
