"""Does TMA help the dK/dV kernel? Simplified (full attention, MHA, B=1, even shapes) dK/dV
kernels with pointer loads and with TMA descriptor loads of Q/dO, next to ringflash's own
dK/dV launch, on one GPU."""
import json, os, torch, triton, triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor
from ringflash import kernels
from ringflash.kernels import attention as A
from ringflash.kernels._bwd import _attn_bwd

LOG2E = 1.4426950408889634

@triton.jit
def dkdv_simple(Q, DO, desc_q, desc_do, K, V, LSE, DELTA, DK, DV, S, H, sm_scale, qk_scale,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr, TMA: tl.constexpr):
    pid_n = tl.program_id(0)
    h = tl.program_id(1)
    HD = H * D
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    k = tl.load(K + cols[:, None] * HD + h * D + offs_d[None, :])
    v = tl.load(V + cols[:, None] * HD + h * D + offs_d[None, :])
    dk = tl.zeros([BLOCK_N, D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, D], dtype=tl.float32)
    for start_m in tl.range(0, S, BLOCK_M):
        rows = start_m + offs_m
        if TMA:
            q = desc_q.load([start_m, h * D])
            do = desc_do.load([start_m, h * D])
        else:
            q = tl.load(Q + rows[:, None] * HD + h * D + offs_d[None, :])
            do = tl.load(DO + rows[:, None] * HD + h * D + offs_d[None, :])
        lse2 = tl.load(LSE + h * S + rows) * 1.4426950408889634
        qkT = tl.dot(k, tl.trans(q))
        pT = tl.math.exp2(qkT * qk_scale - lse2[None, :])
        dv = tl.dot(pT.to(do.dtype), do, dv)
        di = tl.load(DELTA + h * S + rows)
        dpT = tl.dot(v, tl.trans(do))
        dsT = pT * (dpT - di[None, :])
        dk = tl.dot(dsT.to(q.dtype), q, dk)
    tl.store(DK + cols[:, None] * HD + h * D + offs_d[None, :], dk * sm_scale)
    tl.store(DV + cols[:, None] * HD + h * D + offs_d[None, :], dv)

OUT = os.environ.get("OUT", "/tmp")
fh = open(os.path.join(OUT, "tma_dkdv.jsonl"), "w")
print(torch.cuda.get_device_name(), triton.__version__)
dev = "cuda"
for S in (16384, 32768):
    H, D = 32, 128
    q = torch.randn(1, S, H, D, device=dev, dtype=torch.bfloat16); k = torch.randn_like(q); v = torch.randn_like(q); do = torch.randn_like(q)
    out, lse = kernels.forward(q, k, v, causal=False); o = out.to(q.dtype); delta = kernels.backward_delta(o, do)
    scale = D ** -0.5
    f_dkdv = 4 * 4 * S * S * H * D / 2  # 4 products of 2*S*S*D per head... as convention: count real flops of dK/dV kernel
    f_dkdv = 4 * 2 * S * S * D * H
    # ringflash's dK/dV launch alone
    dq = torch.empty(q.shape, dtype=torch.float32, device=dev); dk = torch.empty(k.shape, dtype=torch.float32, device=dev); dv = torch.empty_like(dk)
    c1 = A.BWD_DKDV_CONFIGS[128]
    args = (q, k, v, do, lse, delta, lse, lse, dq, dk, dv, scale, scale * LOG2E,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
            do.stride(0), do.stride(1), do.stride(2), dq.stride(0), dq.stride(1), dq.stride(2),
            dk.stride(0), dk.stride(1), dk.stride(2), dv.stride(0), dv.stride(1), dv.stride(2), 0, 0,
            1, H, 1, 1, S, S)
    meta = dict(HEAD_DIM=D, BLOCK_D=D, BLOCK_M1=c1.block_m, BLOCK_N1=c1.block_n, BLOCK_M2=128, BLOCK_N2=64,
                CAUSAL=False, ACC_DKDV=False, ACC_DQ=False, DOT_PREC="tf32", DO_DKDV=True, DO_DQ=False,
                num_warps=c1.num_warps, num_stages=c1.num_stages)
    grid = (triton.cdiv(S, c1.block_n) * H,)
    t = triton.testing.do_bench(lambda: _attn_bwd[grid](*args, **meta), warmup=30, rep=200)
    ref_dk, ref_dv = dk.clone(), dv.clone()
    r = dict(S=S, impl="ringflash_dkdv", cfg=list(c1), tflops=round(f_dkdv / t / 1e9, 1)); print(json.dumps(r), flush=True); fh.write(json.dumps(r) + "\n")
    q2, do2 = q.view(S, H * D), do.view(S, H * D)
    for (bm, bn, w, st) in [(64, 128, 8, 3), (64, 128, 8, 2), (64, 128, 8, 4), (128, 128, 8, 2), (64, 64, 4, 3)]:
        for tma in (False, True):
            r = dict(S=S, impl="simple_tma" if tma else "simple_ptr", cfg=[bm, bn, w, st])
            try:
                dq_ = torch.empty_like(q2)
                dq_desc = TensorDescriptor.from_tensor(q2, [bm, D]); do_desc = TensorDescriptor.from_tensor(do2, [bm, D])
                dk2 = torch.empty(k.shape, dtype=torch.float32, device=dev); dv2 = torch.empty_like(dk2)
                run = lambda: dkdv_simple[(S // bn, H)](q, do, dq_desc, do_desc, k, v, lse, delta, dk2, dv2, S, H, scale, scale * LOG2E,
                                                        BLOCK_M=bm, BLOCK_N=bn, D=D, TMA=tma, num_warps=w, num_stages=st)
                run(); torch.cuda.synchronize()
                r["err_dk"] = ((dk2 - ref_dk).norm() / ref_dk.norm()).item(); r["err_dv"] = ((dv2 - ref_dv).norm() / ref_dv.norm()).item()
                r["tflops"] = round(f_dkdv / triton.testing.do_bench(run, warmup=30, rep=200) / 1e9, 1)
            except Exception as e:
                r["error"] = str(e)[-200:]
            print(json.dumps(r), flush=True); fh.write(json.dumps(r) + "\n")
