import json, os, torch, triton, triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor
from ringflash import kernels
LOG2E = 1.4426950408889634

@triton.jit
def tile(dk, dv, k, v, Q, DO, desc_q, desc_do, LSE, DELTA, start_m, h, S, HD, qk_scale, offs_m, offs_d,
         D: tl.constexpr, TMA: tl.constexpr):
    rows = start_m + offs_m
    if TMA:
        q = desc_q.load([0, start_m, h, 0])
        q = q.reshape(q.shape[1], q.shape[3])
        do = desc_do.load([0, start_m, h, 0])
        do = do.reshape(do.shape[1], do.shape[3])
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
    return dk, dv


@triton.jit
def dkdv_simple(Q, DO, desc_q, desc_do, K, V, LSE, DELTA, DK, DV, S, H, sm_scale, qk_scale, G1,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr, TMA: tl.constexpr,
                NEST: tl.constexpr, SPLIT: tl.constexpr):
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
    empty = G1 * 0
    if NEST:
        for g in range(0, G1):
            if SPLIT:
                for start_m in range(0, empty, BLOCK_M):
                    dk, dv = tile(dk, dv, k, v, Q, DO, desc_q, desc_do, LSE, DELTA, start_m, h, S, HD, qk_scale, offs_m, offs_d, D, TMA)
            for start_m in range(0, S, BLOCK_M):
                dk, dv = tile(dk, dv, k, v, Q, DO, desc_q, desc_do, LSE, DELTA, start_m, h, S, HD, qk_scale, offs_m, offs_d, D, TMA)
            if SPLIT:
                for start_m in range(S, S + empty, BLOCK_M):
                    dk, dv = tile(dk, dv, k, v, Q, DO, desc_q, desc_do, LSE, DELTA, start_m, h, S, HD, qk_scale, offs_m, offs_d, D, TMA)
    else:
        if SPLIT:
            for start_m in range(0, empty, BLOCK_M):
                dk, dv = tile(dk, dv, k, v, Q, DO, desc_q, desc_do, LSE, DELTA, start_m, h, S, HD, qk_scale, offs_m, offs_d, D, TMA)
        for start_m in range(0, S, BLOCK_M):
            dk, dv = tile(dk, dv, k, v, Q, DO, desc_q, desc_do, LSE, DELTA, start_m, h, S, HD, qk_scale, offs_m, offs_d, D, TMA)
        if SPLIT:
            for start_m in range(S, S + empty, BLOCK_M):
                dk, dv = tile(dk, dv, k, v, Q, DO, desc_q, desc_do, LSE, DELTA, start_m, h, S, HD, qk_scale, offs_m, offs_d, D, TMA)
    tl.store(DK + cols[:, None] * HD + h * D + offs_d[None, :], dk * sm_scale)
    tl.store(DV + cols[:, None] * HD + h * D + offs_d[None, :], dv)

OUT = os.environ.get("OUT", "/tmp")
fh = open(os.path.join(OUT, "tma3.jsonl"), "w")
dev = "cuda"
S, H, D = 16384, 32, 128
q = torch.randn(1, S, H, D, device=dev, dtype=torch.bfloat16); k = torch.randn_like(q); v = torch.randn_like(q); do = torch.randn_like(q)
out, lse = kernels.forward(q, k, v, causal=False); o = out.to(q.dtype); delta = kernels.backward_delta(o, do)
scale = D ** -0.5
f = 4 * 2 * S * S * D * H
bm, bn, w, st = 64, 128, 8, 3
dk2 = torch.empty(k.shape, dtype=torch.float32, device=dev); dv2 = torch.empty_like(dk2)
d4 = tuple(TensorDescriptor(t, list(t.shape), list(t.stride()), [1, bm, 1, D]) for t in (q, do))
for tma in (False, True):
    for nest, split in [(False, False), (True, False), (False, True), (True, True)]:
        run = lambda: dkdv_simple[(S // bn, H)](q, do, *d4, k, v, lse, delta, dk2, dv2, S, H, scale, scale * LOG2E, 1,
                                                BLOCK_M=bm, BLOCK_N=bn, D=D, TMA=tma, NEST=nest, SPLIT=split, num_warps=w, num_stages=st)
        r = dict(tma=tma, nest=nest, split=split)
        try:
            run(); torch.cuda.synchronize()
            r["tflops"] = round(f / triton.testing.do_bench(run, warmup=30, rep=200) / 1e9, 1)
        except Exception as e:
            r["error"] = str(e)[-200:]
        print(json.dumps(r), flush=True); fh.write(json.dumps(r) + "\n")
