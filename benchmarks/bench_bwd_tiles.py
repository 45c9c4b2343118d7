"""Launch configurations of the Triton backward under masks, on one GPU: each dK/dV and dQ
tile shape with the other kind at the table's, and the Hopper backward, against the default.

    PYTHONPATH=. python benchmarks/bench_bwd_tiles.py --out dir      # dir/bwd_tiles.jsonl

S = 32k, H = 32, D = 128, bf16, B = 1; dense causal, documents of 512 tokens, log-normal
documents (median 4k, as bench_masks.py) and a causal window of 4k keys; with ``--masks``
also the sparse modes' kernels on tokens sorted per head (``hash8``: 8 random buckets,
``qkdrop50``: half the queries and keys dropped at random, as bench_sparse.py's "kernel"
rows); ``--variants`` picks variants by name. The backward alone
(kernels.backward with bf16 gradients, as flash_attention calls it), median of
triton.testing.do_bench. Each variant's gradients are checked against the first variant's
(``diff``: the largest relative difference of dQ, dK, dV; tile shapes change the order of the
float32 sums, nothing else). Every (variant, mask) pair is compiled first in parallel
processes, since each compiles its own kernels.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import multiprocessing as mp
import os
import sys
import time

S, H, D = 32768, 32, 128
MASKS = ("causal", "docs512", "docs_lognormal", "window4096")
SPARSE_MASKS = ("hash8", "qkdrop50")
DKDV = {"64x128w8s3": (64, 128, 8, 3), "64x128w8s2": (64, 128, 8, 2), "32x128w8s3": (32, 128, 8, 3),
        "32x128w8s2": (32, 128, 8, 2), "64x64w4s2": (64, 64, 4, 2), "64x64w4s3": (64, 64, 4, 3),
        "32x64w4s3": (32, 64, 4, 3), "128x64w8s2": (128, 64, 8, 2), "64x64w8s3": (64, 64, 8, 3)}
DQ = {"128x64w8s3": (128, 64, 8, 3), "128x64w8s2": (128, 64, 8, 2), "64x64w4s2": (64, 64, 4, 2),
      "64x64w4s3": (64, 64, 4, 3), "128x32w8s3": (128, 32, 8, 3), "64x128w4s2": (64, 128, 4, 2),
      "128x128w8s2": (128, 128, 8, 2), "64x32w4s3": (64, 32, 4, 3)}
BASE_DKDV, BASE_DQ = "64x128w8s3", "128x64w8s3"  # the plain tables' D = 128 entries


def variants():
    """(name, dK/dV config, dQ config, Hopper backward: None, or whether its P and dS go through shared memory)."""
    yield "default", None, None, None
    for n, c in DKDV.items():
        yield "dkdv_" + n, c, DQ[BASE_DQ], None
    for n, c in DQ.items():
        if n != BASE_DQ:
            yield "dq_" + n, DKDV[BASE_DKDV], c, None
    yield "hopper_bwd", None, None, False
    yield "hopper_bwd_smem_p", None, None, True


def inputs(mask: str):
    import torch

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_masks import documents

    torch.manual_seed(0)
    q, k, v, do = (torch.randn(1, S, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    pos = torch.arange(S, device="cuda")
    if mask in SPARSE_MASKS:
        return sparse_inputs(mask, q, k, v, do, pos)
    if mask == "causal":
        kw = dict(causal=True)
    elif mask == "docs_lognormal":
        cu = torch.tensor(documents(S), device="cuda")
        d = (torch.searchsorted(cu, pos, right=True) - 1).to(torch.int32)
        kw = dict(causal=True, q_doc=d, k_doc=d)
    elif mask.startswith("docs"):
        d = (pos // int(mask[4:])).to(torch.int32)
        kw = dict(causal=True, q_doc=d, k_doc=d)
    else:
        kw = dict(causal=True, window=(int(mask[6:]) - 1, 0))
    return q, k, v, do, kw


def sparse_inputs(mask: str, q, k, v, do, pos):
    """The kernels' inputs of a hashing or QK-dropping call: tokens sorted per head, with their
    per-head composite positions and documents (ringflash.sparse.run_sorted's)."""
    import torch

    from ringflash import sparse as sp

    g = torch.Generator(device="cuda").manual_seed(1)
    if mask == "hash8":
        mode = sp.HashSparse(*(torch.randint(0, 8, (1, S, H), generator=g, device="cuda") for _ in range(2)), 8)
    else:
        mode = sp.QKDrop(*(torch.rand(1, S, H, generator=g, device="cuda") >= 0.5 for _ in range(2)))
    q_cpos, q_cdoc, k_cpos, k_cdoc = sp.composite(mode, pos, pos, None, None, 1)
    q_order, _ = sp.sort_order(q_cpos)
    k_order, _ = sp.sort_order(k_cpos)
    kw = dict(causal=True, q_pos=torch.gather(q_cpos, -1, q_order), q_doc=torch.gather(q_cdoc, -1, q_order),
              k_pos=torch.gather(k_cpos, -1, k_order), k_doc=torch.gather(k_cdoc, -1, k_order))
    return (sp.gather_tokens(q, q_order), sp.gather_tokens(k, k_order), sp.gather_tokens(v, k_order),
            sp.gather_tokens(do, q_order), kw)


_DEFAULTS: dict = {}  # the kernels' tables as imported, once per process


def use(dkdv, dq, hopper) -> None:
    """Set the kernels' tables for one variant (None: leave the default's)."""
    from ringflash.kernels import attention as A

    tables = {"dkdv": A.BWD_DKDV_CONFIGS, "dq": A.BWD_DQ_CONFIGS, "masked": A.BWD_DKDV_MASKED_CONFIGS}
    if not _DEFAULTS:
        _DEFAULTS.update({name: dict(t) for name, t in tables.items()})
    for name, table in tables.items():
        table.clear()
        table.update(_DEFAULTS[name])
    for table, cfg in ((A.BWD_DKDV_CONFIGS, dkdv), (A.BWD_DQ_CONFIGS, dq)):
        if cfg is not None:
            table[128] = A.KernelConfig(*cfg)
    if not (dkdv is None and dq is None and hopper is None):
        A.BWD_DKDV_MASKED_CONFIGS.clear()  # only the default keeps its masked table
    A.HOPPER_BACKWARD = hopper is not None
    A.HOPPER_BWD_SMEM_P = bool(hopper)
    A.HOPPER_BWD_DQ = "kernel"  # the FA3-form dK/dV program with its dQ kernel, as these tiles were measured


def backward_fn(q, k, v, do, kw):
    from ringflash import kernels

    out, lse = kernels.forward(q, k, v, **kw, out_dtype=q.dtype)
    delta = kernels.backward_delta(out, do)
    return lambda: kernels.backward(do, q, k, v, lse, delta, **kw, grad_dtype=q.dtype)


def _compile(job):
    name, dkdv, dq, hopper, mask = job
    import torch

    try:
        use(dkdv, dq, hopper)
        backward_fn(*inputs(mask))()
        torch.cuda.synchronize()
        return name, mask, None
    except Exception as e:  # noqa: BLE001 - reported, and the pair is skipped
        return name, mask, f"{type(e).__name__}: {str(e)[:200]}"


def measure(out_dir: str, workers: int, masks=MASKS, names=None) -> str:
    import torch
    import triton

    chosen = [var for var in variants() if names is None or var[0] in names]
    jobs = [(*var, m) for var in chosen for m in masks]
    t0 = time.time()
    failed = set()
    with cf.ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as ex:
        for name, mask, err in ex.map(_compile, jobs):
            if err:
                print(f"compile failed: {name} {mask}: {err}", flush=True)
                failed.add((name, mask))
    print(f"compiled {len(jobs)} variants in {time.time() - t0:.0f} s", flush=True)
    gpu = torch.cuda.get_device_name()
    path = os.path.join(out_dir, "bwd_tiles.jsonl")
    with open(path, "w") as f:
        for mask in masks:
            data = inputs(mask)
            ref = None
            for name, dkdv, dq, hopper in chosen:
                if (name, mask) in failed:
                    continue
                use(dkdv, dq, hopper)
                fn = backward_fn(*data)
                grads = [g.float() for g in fn()]
                ref = ref or grads
                diff = max(((g - r).norm() / r.norm()).item() for g, r in zip(grads, ref))
                ms = triton.testing.do_bench(fn, warmup=50, rep=400)
                row = dict(gpu=gpu, S=S, H=H, D=D, mask=mask, variant=name, dkdv=dkdv, dq=dq, bwd_ms=ms, diff=diff)
                print(json.dumps(row), flush=True)
                f.write(json.dumps(row) + "\n")
    return path


def table(path: str) -> None:
    rows = [json.loads(line) for line in open(path)]
    base = {}
    for r in rows:
        base.setdefault(r["mask"], r["bwd_ms"])  # the first variant of each mask
    print(f"{'mask':>15} {'variant':>22} {'bwd ms':>9} {'speed':>6} {'diff':>8}")
    for r in rows:
        print(f'{r["mask"]:>15} {r["variant"]:>22} {r["bwd_ms"]:9.3f} {base[r["mask"]] / r["bwd_ms"]:5.2f}x {r.get("diff", r.get("diff_vs_base")):8.1e}')


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=".", help="directory for bwd_tiles.jsonl")
    ap.add_argument("--table", default=None, help="only print the table of this JSON-lines file (CPU)")
    ap.add_argument("--workers", type=int, default=12, help="processes that compile the variants")
    ap.add_argument("--masks", nargs="+", default=list(MASKS), choices=MASKS + SPARSE_MASKS)
    ap.add_argument("--variants", nargs="+", default=None, help="variant names (default: all)",
                    choices=[var[0] for var in variants()])
    a = ap.parse_args()
    table(a.table or measure(a.out, a.workers, tuple(a.masks), a.variants))


if __name__ == "__main__":
    main()
