import os, re, torch, triton, json
from ringflash import kernels
from ringflash.kernels import attention as A
from ringflash.kernels.attention import KernelConfig
orig = A._attn_bwd
seen = []
MODE = {"store": False}
class P:
    def __getitem__(self, grid):
        def launch(*a, **kw):
            if MODE["store"] and kw.get("DQ_ATOMIC"):
                kw["DQ_ATOMIC"] = 2
            k = orig[grid](*a, **kw); seen.append((kw.get("DQ_ATOMIC"), kw.get("DO_DQ"), kw.get("num_stages"), kw.get("BLOCK_M1"), kw.get("BLOCK_N1"), k)); return k
        return launch
A._attn_bwd = P()
dev = "cuda"
for S in (16384,):
    q=torch.randn(1,S,32,128,device=dev,dtype=torch.bfloat16); k=torch.randn_like(q); v=torch.randn_like(q); do=torch.randn_like(q)
    out,lse=kernels.forward(q,k,v,causal=True); o=out.to(q.dtype); delta=kernels.backward_delta(o,do)
    f=4*32*S*S*128/2*2.5
    for name, det, store, cfg, parts in [("det", True, False, None, 2), ("atomic_p1", False, False, None, 1), ("atomic_p2", False, False, None, 2),
                                 ("plainstore_p2", False, True, None, 2),
                                 ("atomic_p2_64x128x8x2", False, False, KernelConfig(64,128,8,2), 2),
                                 ("atomic_p2_64x128x8x4", False, False, KernelConfig(64,128,8,4), 2),
                                 ("atomic_p2_128x128x8x2", False, False, KernelConfig(128,128,8,2), 2),
                                 ("atomic_p2_32x128x4x3", False, False, KernelConfig(32,128,4,3), 2),
                                 ("atomic_p2_64x64x4x3", False, False, KernelConfig(64,64,4,3), 2)]:
        MODE["store"] = store
        A.BWD_DQ_PARTS = parts
        if cfg: A.BWD_ATOMIC_CONFIGS[128] = cfg
        try:
            seen.clear()
            t = triton.testing.do_bench(lambda: kernels.backward(do,q,k,v,lse,delta,causal=True,deterministic=det), warmup=30, rep=200)
            info = []
            for at, dq, st, bm, bn, kern in seen[:2]:
                ptx = kern.asm["ptx"]
                info.append(dict(atomic=at, do_dq=dq, stages=st, bm=bm, bn=bn, n_regs=kern.n_regs, n_spills=kern.n_spills,
                                 ops=sorted(set(re.findall(r"\b(?:atom|red)\.[\w.]+", ptx))),
                                 n_atom=len(re.findall(r"\b(?:atom|red)\.", ptx))))
            print(json.dumps(dict(name=name, S=S, tflops=round(f/t/1e9,1), info=info)), flush=True)
        except Exception as e:
            print(name, "ERR", str(e)[:150], flush=True)
        A.BWD_ATOMIC_CONFIGS[128] = KernelConfig(64,128,8,3)
