"""Launch configurations of the Hopper kernels, each kernel timed on its own, beside SDPA cuDNN.

    PYTHONPATH=. python benchmarks/hopper_sweep.py [--seqlen 8k] [--out sweep.jsonl]

For D = 64 and 128, causal and full, at B = 1, H = 32, bf16: the forward in each variant
(HOPPER_FWD_SPLIT 1 / 2, ping-pong) and each config of SWEEP_FWD; the dK/dV and dQ kernels of
the backward, each launched alone, per config of SWEEP_DKDV / SWEEP_DQ; and the Triton kernels
and SDPA cuDNN (forward, backward = fwd+bwd - fwd) as the yardsticks. A config that does not
compile (shared memory) is logged with its error and skipped. Prints a table, writes JSON lines.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
import torch.nn.functional as F
import triton

from ringflash import kernels
from ringflash.kernels import attention as A

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from bench_kernels import flops, inputs, parse_len  # noqa: E402

C = kernels.KernelConfig
SWEEP_FWD = {128: [C(128, 128, 8, 2), C(128, 128, 8, 3), C(128, 64, 8, 3)],
             64: [C(128, 128, 8, 2), C(128, 128, 8, 3), C(128, 64, 8, 4)]}
SWEEP_DKDV = {128: [C(32, 128, 8, 3), C(32, 128, 8, 2), C(64, 128, 8, 2), C(64, 64, 8, 2)],
              64: [C(64, 128, 8, 3), C(64, 128, 8, 2), C(128, 128, 8, 2)]}
# the dK/dV program with FA3's operand routes (HOPPER_BWD_SMEM_P)
SWEEP_DKDV_SMEM_P = {128: [C(64, 128, 8, 2), C(64, 128, 8, 3)], 64: [C(64, 128, 8, 3), C(128, 128, 8, 2)]}
SWEEP_DQ = {128: [C(128, 64, 8, 2), C(128, 64, 8, 3), C(128, 128, 8, 2), C(64, 128, 8, 2)],
            64: [C(128, 64, 8, 2), C(128, 128, 8, 2), C(128, 64, 8, 3)]}
FWD_VARIANTS = {"split1": (1, False), "split2": (2, False), "pingpong": (2, True)}


def ms_of(fn) -> float:
    fn()
    torch.cuda.synchronize()
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seqlen", default="8k")
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--head-dims", type=int, nargs="+", default=[128, 64])
    p.add_argument("--out", default="hopper_sweep.jsonl")
    a = p.parse_args()
    S, H, B = parse_len(a.seqlen), a.heads, 1
    rows = []

    def log(r):
        r = {"gpu": torch.cuda.get_device_name(), "S": S, "H": H, **r}
        rows.append(r)
        extra = r.get("error") or f"{r['ms']:.3f} ms  {r.get('tflops', 0):6.1f} TFLOP/s"
        print(f"{r['kernel']:>10} D={r['D']:<3} {'causal' if r['causal'] else 'full  '} {str(r.get('config', '')):>16} "
              f"{r.get('variant', ''):>8}  {extra}", flush=True)

    A.HOPPER_FORWARD = A.HOPPER_BACKWARD = True
    A.HOPPER_BWD_DQ = "kernel"  # the dK/dV and dQ kernels, each timed alone
    for D in a.head_dims:
        q, k, v, do = inputs(B, S, H, D, torch.bfloat16)
        for causal in (True, False):
            f_fwd = flops("fwd", B, H, S, D, causal)
            # yardsticks
            qs, ks, vs = (t.detach().transpose(1, 2).clone().requires_grad_() for t in (q, k, v))
            from torch.nn.attention import SDPBackend, sdpa_kernel
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                t_f = ms_of(lambda: F.scaled_dot_product_attention(qs, ks, vs, is_causal=causal))
                t_fb = ms_of(lambda: torch.autograd.grad(F.scaled_dot_product_attention(qs, ks, vs, is_causal=causal),
                                                         (qs, ks, vs), do.transpose(1, 2)))
            log({"kernel": "cudnn_fwd", "D": D, "causal": causal, "ms": t_f, "tflops": f_fwd / t_f * 1e-9})
            log({"kernel": "cudnn_bwd", "D": D, "causal": causal, "ms": t_fb - t_f,
                 "tflops": 2.5 * f_fwd / (t_fb - t_f) * 1e-9})
            saved = A.HOPPER_FORWARD, A.HOPPER_BACKWARD
            A.HOPPER_FORWARD = A.HOPPER_BACKWARD = False
            out, lse = kernels.forward(q, k, v, causal=causal)
            delta = kernels.backward_delta(out, do)
            t = ms_of(lambda: kernels.forward(q, k, v, causal=causal))
            log({"kernel": "triton_fwd", "D": D, "causal": causal, "ms": t, "tflops": f_fwd / t * 1e-9})
            t = ms_of(lambda: kernels.backward(do, q, k, v, lse, delta, causal=causal))
            log({"kernel": "triton_bwd", "D": D, "causal": causal, "ms": t, "tflops": 2.5 * f_fwd / t * 1e-9})
            A.HOPPER_FORWARD, A.HOPPER_BACKWARD = saved

            table = A.HOPPER_FWD_CONFIGS
            keep = table[D]
            for cfg in SWEEP_FWD[D]:
                for name, (split, pp) in FWD_VARIANTS.items():
                    table[D] = cfg
                    A.HOPPER_FWD_SPLIT, A.HOPPER_FWD_PINGPONG = split, pp
                    try:
                        t = ms_of(lambda: kernels.forward(q, k, v, causal=causal))
                        log({"kernel": "fwd", "D": D, "causal": causal, "config": list(cfg), "variant": name,
                             "ms": t, "tflops": f_fwd / t * 1e-9})
                    except Exception as e:  # noqa: BLE001  (a config that does not fit)
                        log({"kernel": "fwd", "D": D, "causal": causal, "config": list(cfg), "variant": name,
                             "error": repr(e)[:160]})
            table[D] = keep
            A.HOPPER_FWD_SPLIT, A.HOPPER_FWD_PINGPONG = 2, False

            m = A._mask_args(None, None, causal, None, None, None, S, S, q.device, None, (B, H, H))
            for kernel, sweep, table, smem_p in (("dkdv", SWEEP_DKDV, A.HOPPER_BWD_DKDV_CONFIGS, False),
                                                 ("dkdv_smem_p", SWEEP_DKDV_SMEM_P, A.HOPPER_BWD_DKDV_SMEM_P_CONFIGS, True),
                                                 ("dq", SWEEP_DQ, A.HOPPER_BWD_DQ_CONFIGS, False)):
                keep = table[D]
                A.HOPPER_BWD_SMEM_P = smem_p
                for cfg in sweep[D]:
                    table[D] = cfg
                    try:
                        c1, c2 = A._dkdv_config(D), A.HOPPER_BWD_DQ_CONFIGS[D]
                        rkv = rq = None
                        if causal:
                            rkv = A._tile_ranges(m, causal, S, S, c1.block_m, c1.block_n, by_keys=True, device=q.device)
                            rq = A._tile_ranges(m, causal, S, S, c2.block_m, c2.block_n, by_keys=False, device=q.device)
                        dq, dk, dv = (torch.empty(t.shape, device=q.device, dtype=torch.float32) for t in (q, k, v))
                        launches = A._hopper_bwd_launches(do, q, k, v, lse, delta, m, causal, 1 / D ** 0.5, dq, dk, dv,
                                                          False, False, rkv, rq)
                        grid, args, meta, warps = launches[1 if kernel == "dq" else 0]
                        from ringflash.kernels._bwd_dkdv_hopper import _attn_bwd_dkdv_hopper
                        from ringflash.kernels._bwd_dq_hopper import _attn_bwd_dq_hopper
                        fn = _attn_bwd_dq_hopper if kernel == "dq" else _attn_bwd_dkdv_hopper
                        t = ms_of(lambda: fn[grid](*args, **meta, num_warps=warps))
                        # the work of each kernel: dK/dV 4 products, dQ 3, of the forward's 2
                        log({"kernel": kernel, "D": D, "causal": causal, "config": list(cfg), "ms": t,
                             "tflops": (1.5 if kernel == "dq" else 2.0) * f_fwd / t * 1e-9})
                    except Exception as e:  # noqa: BLE001
                        log({"kernel": kernel, "D": D, "causal": causal, "config": list(cfg), "error": repr(e)[:160]})
                table[D] = keep
                A.HOPPER_BWD_SMEM_P = False
    with open(a.out, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
