"""The Hopper forward at D = 64 with three consumer warpgroups (192-row tiles, FA3's shape) against
the default two (128 rows), the Triton forward and SDPA cuDNN; then each variant checked against
float64 (tests/test_kernels_hopper_gpu.py's check, forward and backward).

    PYTHONPATH=. python benchmarks/results/kernels_d64_tiles/fwd_tiles.py --out fwd_tiles.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F
import triton

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..")
sys.path[:0] = [os.path.join(ROOT, "benchmarks"), os.path.join(ROOT, "tests")]
from bench_kernels import flops, inputs, parse_len  # noqa: E402

from ringflash import kernels  # noqa: E402
from ringflash.kernels import attention as A  # noqa: E402

C = kernels.KernelConfig
# (name, config, registers a thread of the worker consumer partitions)
VARIANTS = [("128x128 s2", C(128, 128, 8, 2), 240), ("192x128 s2 r152", C(192, 128, 12, 2), 152),
            ("192x128 s2 r160", C(192, 128, 12, 2), 160), ("192x64 s3", C(192, 64, 12, 3), 160),
            ("192x64 s4", C(192, 64, 12, 4), 160)]


def ms_of(fn) -> float:
    fn()
    torch.cuda.synchronize()
    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")


def use(cfg, regs):
    A.HOPPER_FWD_CONFIGS[64] = cfg
    A.HOPPER_CONSUMER_REGS[cfg.num_warps // 4] = regs
    A._DERIVED.clear()


def correct(name) -> str:
    import test_kernels_hopper_gpu as T
    from ringflash.mask import doc_ids

    calls = []
    real_f, real_b = A._forward_hopper, A._backward_hopper
    A._forward_hopper = lambda *a, **k: (calls.append("fwd"), real_f(*a, **k))[1]
    A._backward_hopper = lambda *a, **k: (calls.append("bwd"), real_b(*a, **k))[1]
    try:
        for dtype in (torch.bfloat16, torch.float16):
            for causal in (False, True):
                for shape in ((2, 1000, 1000, 8, 8), (2, 1000, 1000, 8, 2), (1, 333, 1111, 4, 2),
                              (1, 1111, 555, 4, 2), (1, 1, 1, 2, 1), (1, 4097, 4097, 4, 4)):
                    B, Sq, Sk, H, Hkv = shape
                    q, k, v = T.make(B, Sq, Sk, H, Hkv, 64, dtype, seed=Sq)
                    T.check(q, k, v, calls, causal=causal)
        S = 3000
        q, k, v = T.make(1, S, S, 4, 2, 64, torch.bfloat16, seed=5)
        docs = doc_ids([0, 700, 2000, S], torch.arange(S, device="cuda"))
        T.check(q, k, v, calls, causal=True, window=(500, 0), q_doc=docs, k_doc=docs)
        T.check(q, k, v, calls, causal=False, window=(300, 200))
    except AssertionError as e:
        return f"FAIL {name}: {e}"
    finally:
        A._forward_hopper, A._backward_hopper = real_f, real_b
    return "ok"


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--seqlens", nargs="+", default=["8k", "16k"])
    p.add_argument("--out", default="fwd_tiles.jsonl")
    p.add_argument("--check", nargs="*", default=None, help="check these variants after timing (default: every one; no names: none)")
    a = p.parse_args()
    A.HOPPER_FORWARD = A.HOPPER_BACKWARD = True
    A.HOPPER_FWD_HEAD_DIMS = (64, 128)
    fh = open(a.out, "w")

    def log(r):
        fh.write(json.dumps(r) + "\n")
        fh.flush()

    from torch.nn.attention import SDPBackend, sdpa_kernel
    H, B, D = 32, 1, 64
    for s in a.seqlens:
        S = parse_len(s)
        q, k, v, do = inputs(B, S, H, D, torch.bfloat16)
        for causal in (False, True):
            f = flops("fwd", B, H, S, D, causal)
            res = {}
            qs, ks, vs = (t.transpose(1, 2) for t in (q, k, v))
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                res["cudnn"] = ms_of(lambda: F.scaled_dot_product_attention(qs, ks, vs, is_causal=causal))
            A.HOPPER_FORWARD = False
            res["triton"] = ms_of(lambda: kernels.forward(q, k, v, causal=causal, out_dtype=torch.bfloat16))
            A.HOPPER_FORWARD = True
            for name, cfg, regs in VARIANTS:
                use(cfg, regs)
                res[name] = ms_of(lambda: kernels.forward(q, k, v, causal=causal, out_dtype=torch.bfloat16))
            for impl, ms in res.items():
                row = {"gpu": torch.cuda.get_device_name(), "S": S, "H": H, "D": D, "causal": causal, "impl": impl,
                       "ms": ms, "tflops": f / ms * 1e-9, "vs_cudnn": res["cudnn"] / ms}
                log(row)
                print(f"S={s:>4} {'causal' if causal else 'full  '} {impl:18s} {ms:8.3f} ms {row['tflops']:6.1f} "
                      f"TFLOP/s  {row['vs_cudnn']:.3f}x cuDNN", flush=True)
    for name, cfg, regs in VARIANTS:
        if a.check is None or name in a.check:
            use(cfg, regs)
            r = correct(name)
            print(f"{name:18s} float64 check: {r}", flush=True)
            log({"variant": name, "check": r})
    fh.close()


if __name__ == "__main__":
    main()
