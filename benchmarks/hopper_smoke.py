"""One Hopper kernel variant once, against float64: the first check on a new GPU or Triton.

    PYTHONPATH=. python benchmarks/hopper_smoke.py fwd|fwd_split|fwd_pingpong|fwd_persistent|bwd|bwd_smem_p|bwd_atomic_dq|bwd_ordered_dq|bwd_ordered_dq_2w [--case causal|full|masks|gqa]

Each variant runs in its own process (benchmarks/onegpu.sh puts each under a timeout), because a
wrong barrier phase hangs the GPU rather than failing. Prints the relative error of O (and of
dQ, dK, dV) against the float64 reference, and whether the Hopper kernels served the call.
"""

from __future__ import annotations

import argparse

import torch

from ringflash import kernels, reference
from ringflash.kernels import attention as A

VARIANTS = {"fwd": (1, False), "fwd_split": (2, False), "fwd_pingpong": (2, True), "fwd_persistent": (2, False),
            "bwd": (1, False), "bwd_smem_p": (1, False), "bwd_atomic_dq": (1, False), "bwd_ordered_dq": (1, False),
            "bwd_ordered_dq_2w": (1, False)}  # _2w: two dQ writers (HOPPER_BWD_DQ_WRITERS = 2)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("variant", choices=sorted(VARIANTS))
    p.add_argument("--case", default="causal", choices=("causal", "full", "masks", "gqa"))
    p.add_argument("--seqlen", type=int, default=1000)
    p.add_argument("--head-dim", type=int, default=128)
    a = p.parse_args()
    # bwd alone: the Triton forward, so that a faulty Hopper forward cannot hide the backward's state
    bwd = a.variant.startswith("bwd")
    A.HOPPER_FORWARD = not bwd
    A.HOPPER_BACKWARD = bwd
    A.HOPPER_BWD_HEAD_DIMS = (64, 128)
    A.HOPPER_BWD_SMEM_P = a.variant == "bwd_smem_p"
    A.HOPPER_BWD_DQ = {"bwd_atomic_dq": "atomic", "bwd_ordered_dq": "ordered",
                       "bwd_ordered_dq_2w": "ordered"}.get(a.variant, "kernel")  # bwd: the two kernels
    A.HOPPER_BWD_DQ_WRITERS = "2" if a.variant.endswith("_2w") else "1"
    A.HOPPER_FWD_SPLIT, A.HOPPER_FWD_PINGPONG = VARIANTS[a.variant]
    A.HOPPER_FWD_PERSISTENT = a.variant == "fwd_persistent"
    served = []
    for name in ("_forward_hopper", "_backward_hopper"):
        real = getattr(A, name)
        setattr(A, name, lambda *x, _r=real, _n=name, **kw: (served.append(_n), _r(*x, **kw))[1])

    g = torch.Generator(device="cuda").manual_seed(0)
    hkv = 2 if a.case == "gqa" else 4
    S, D = a.seqlen, a.head_dim
    mk = lambda h: torch.randn(2, S, h, D, generator=g, device="cuda").bfloat16()  # noqa: E731
    q, k, v, do = mk(4), mk(hkv), mk(hkv), mk(4)
    kw = dict(causal=a.case != "full")
    if a.case == "masks":
        cu = torch.tensor([0, 97, 98, 600, S], device="cuda")
        doc = torch.searchsorted(cu, torch.arange(S, device="cuda"), right=True) - 1
        kw.update(window=(200, 0), q_doc=doc, k_doc=doc)
    ref, ref_lse = reference.forward(q.double(), k.double(), v.double(), **kw)
    o, lse = kernels.forward(q, k, v, **kw)
    torch.cuda.synchronize()
    rel = lambda x, w: ((x.double() - w).norm() / w.norm()).item()  # noqa: E731
    print(f"{a.variant} {a.case}: O rel err {rel(o, ref):.3e}; served by {served}", flush=True)
    if bwd:
        delta = reference.backward_delta(ref, do.double())
        grads = kernels.backward(do, q, k, v, ref_lse.float(), delta.float(), **kw)
        torch.cuda.synchronize()
        want = reference.backward(do.double(), q.double(), k.double(), v.double(), ref_lse, delta, **kw)
        errs = ", ".join(f"{n} {rel(x, w):.3e}" for n, x, w in zip(("dq", "dk", "dv"), grads, want))
        print(f"{a.variant} {a.case}: rel err {errs}; served by {served}", flush=True)


if __name__ == "__main__":
    main()
