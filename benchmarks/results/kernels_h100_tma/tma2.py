import json, os, torch, triton, triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor
from ringflash import kernels
from ringflash.kernels import attention as A
from ringflash.kernels._bwd import _attn_bwd
LOG2E = 1.4426950408889634

@triton.jit
def dkdv_simple(Q, DO, desc_q, desc_do, K, V, LSE, DELTA, DK, DV, S, H, sm_scale, qk_scale,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr, MODE: tl.constexpr, TLRANGE: tl.constexpr):
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
    for start_m in tl.range(0, S, BLOCK_M, disable_licm=not TLRANGE):
        rows = start_m + offs_m
        if MODE == 2:
            q = desc_q.load([start_m, h * D])
            do = desc_do.load([start_m, h * D])
        elif MODE == 4:
            q = desc_q.load([0, start_m, h, 0])
            q = q.reshape(q.shape[1], q.shape[3])
            do = desc_do.load([0, start_m, h, 0])
            do = do.reshape(do.shape[1], do.shape[3])
        elif MODE == 3:
            q = desc_q.load([0, start_m, h * D])
            q = q.reshape(q.shape[1], q.shape[2])
            do = desc_do.load([0, start_m, h * D])
            do = do.reshape(do.shape[1], do.shape[2])
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
fh = open(os.path.join(OUT, "tma2.jsonl"), "w")
dev = "cuda"
S, H, D = 16384, 32, 128
q = torch.randn(1, S, H, D, device=dev, dtype=torch.bfloat16); k = torch.randn_like(q); v = torch.randn_like(q); do = torch.randn_like(q)
out, lse = kernels.forward(q, k, v, causal=False); o = out.to(q.dtype); delta = kernels.backward_delta(o, do)
scale = D ** -0.5
f = 4 * 2 * S * S * D * H
def log(**r):
    print(json.dumps(r), flush=True); fh.write(json.dumps(r) + "\n")
bm, bn, w, st = 64, 128, 8, 3
dk2 = torch.empty(k.shape, dtype=torch.float32, device=dev); dv2 = torch.empty_like(dk2)
descs = {1: (q, do), 2: tuple(TensorDescriptor.from_tensor(t.view(S, H * D), [bm, D]) for t in (q, do)),
         3: tuple(TensorDescriptor(t.view(1, S, H * D), [1, S, H * D], [S * H * D, H * D, 1], [1, bm, D]) for t in (q, do)),
         4: tuple(TensorDescriptor(t, list(t.shape), list(t.stride()), [1, bm, 1, D]) for t in (q, do))}
for mode in (1, 2, 3, 4):
    for tlr in (True, False):
        run = lambda: dkdv_simple[(S // bn, H)](q, do, *descs[mode], k, v, lse, delta, dk2, dv2, S, H, scale, scale * LOG2E,
                                                BLOCK_M=bm, BLOCK_N=bn, D=D, MODE=mode, TLRANGE=tlr, num_warps=w, num_stages=st)
        try:
            run(); torch.cuda.synchronize()
            log(kernel="simple", mode=mode, licm=tlr, tflops=round(f / triton.testing.do_bench(run, warmup=30, rep=200) / 1e9, 1))
        except Exception as e:
            log(kernel="simple", mode=mode, licm=tlr, error=str(e)[-200:])
# the real dK/dV launch, pointer vs descriptors, causal and full, MHA and GQA
for causal in (False, True):
    for Hkv in (32, 8):
        kk = torch.randn(1, S, Hkv, D, device=dev, dtype=torch.bfloat16); vv = torch.randn_like(kk)
        out, lse = kernels.forward(q, kk, vv, causal=causal); o = out.to(q.dtype); delta = kernels.backward_delta(o, do)
        pos = torch.arange(S, device=dev)
        dq = torch.empty(q.shape, dtype=torch.float32, device=dev); dk = torch.empty(kk.shape, dtype=torch.float32, device=dev); dv = torch.empty_like(dk)
        c1 = A.BWD_DKDV_CONFIGS[128]
        for tma in (False, True):
            d4 = A._qdo_descriptors(q, do, c1.block_m, D) if tma else (q, do)
            args = (q, kk, vv, do, lse, delta, pos, pos, dq, dk, dv, *d4, scale, scale * LOG2E,
                    q.stride(0), q.stride(1), q.stride(2), kk.stride(0), kk.stride(1), kk.stride(2), vv.stride(0), vv.stride(1), vv.stride(2),
                    do.stride(0), do.stride(1), do.stride(2), dq.stride(0), dq.stride(1), dq.stride(2),
                    dk.stride(0), dk.stride(1), dk.stride(2), dv.stride(0), dv.stride(1), dv.stride(2), 0, 0,
                    1, H, H // Hkv, 1, S, S)
            meta = dict(HEAD_DIM=D, BLOCK_D=D, BLOCK_M1=c1.block_m, BLOCK_N1=c1.block_n, BLOCK_M2=128, BLOCK_N2=64,
                        CAUSAL=causal, ACC_DKDV=False, ACC_DQ=False, DOT_PREC="tf32", DO_DKDV=True, DO_DQ=False, TMA=tma,
                        num_warps=c1.num_warps, num_stages=c1.num_stages)
            grid = (triton.cdiv(S, c1.block_n) * Hkv,)
            t = triton.testing.do_bench(lambda: _attn_bwd[grid](*args, **meta), warmup=30, rep=200)
            log(kernel="ringflash_dkdv", causal=causal, Hkv=Hkv, tma=tma, tflops=round(f / (2 if causal else 1) / t / 1e9, 1))
