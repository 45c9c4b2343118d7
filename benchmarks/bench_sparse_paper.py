"""QK-dropping and hash-sparse attention: ringflash beside the Triton kernels of the paper's code.

The paper's public code (Pagliardini et al., 2023, github.com/epfml/dynamic-sparse-flash-attention,
MIT) is not part of ringflash: point ``--paper-dir`` at a folder holding its
``openwebtext2-experiments/src/models/hsparse_attn.py`` and ``qksparse_attn.py`` (copied there by
hand). Both sides are timed as a model calls them, on the same inputs: the paper's
``attention_fn`` hashes (random projections, ``nb_hash`` buckets) or draws keep flags (drop
fraction) and compacts or sorts the tokens itself; ringflash gets the same kind of bucket ids
(:func:`ringflash.sparse.hash_buckets`, timed too) or keep flags and runs
``flash_attention(..., sparsity=...)``. Dense causal ringflash and SDPA flash are the baselines of
the same run. The paper's kernels take head dim 64 only. bf16, causal, B = 1.

    PYTHONPATH=. python benchmarks/bench_sparse_paper.py --paper-dir /path/to/models --out results.jsonl
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys

import torch
import torch.nn.functional as F
import triton

from ringflash import flash_attention
from ringflash import sparse as sp


def _load(path: str, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def _size(s: str) -> int:
    return int(s[:-1]) * 1024 if s.endswith("k") else int(s)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--paper-dir", required=True, help="folder with the paper's hsparse_attn.py and qksparse_attn.py")
    ap.add_argument("--seqlens", nargs="+", default=["8k", "16k", "32k"])
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--buckets", nargs="+", type=int, default=[8])
    ap.add_argument("--drop", nargs="+", type=float, default=[0.5])
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    hs = _load(os.path.join(args.paper_dir, "hsparse_attn.py"), "paper_hsparse")
    qs = _load(os.path.join(args.paper_dir, "qksparse_attn.py"), "paper_qksparse")
    gpu = torch.cuda.get_device_name()
    H, D, dev = args.heads, 64, "cuda"
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    out = open(args.out, "a")

    def record(**rec):
        rec.update(gpu=gpu, H=H, D=D, torch=torch.__version__, triton=triton.__version__)
        print(json.dumps(rec), flush=True)
        out.write(json.dumps(rec) + "\n")

    def time(fn, grads_of, dout):
        def fwdbwd():
            o = fn()
            return torch.autograd.grad(o, grads_of, dout)
        res = {}
        for mode, f in (("fwd", fn), ("fwd+bwd", fwdbwd)):
            try:
                res[mode] = triton.testing.do_bench(f, warmup=50, rep=200, return_mode="median")
            except Exception as e:  # noqa: BLE001 - a failing implementation is a result, not a crash
                res[mode] = f"{type(e).__name__}: {str(e)[:200]}"
        return res

    for S in map(_size, args.seqlens):
        g = torch.Generator(device=dev).manual_seed(0)
        q, k, v, dout = (torch.randn(1, S, H, D, generator=g, device=dev, dtype=torch.bfloat16).requires_grad_()
                         for _ in range(4))
        dout = dout.detach()
        for impl, fn in (("ringflash", lambda: flash_attention(q, k, v, causal=True)),
                         ("sdpa_flash", lambda: F.scaled_dot_product_attention(
                             q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True).transpose(1, 2))):
            for mode, ms in time(fn, (q, k, v), dout).items():
                record(impl=impl, S=S, mask="causal", sparsity="", mode=mode, ms=ms)
        for nb in args.buckets:
            proj = sp.hash_projection(H, D, nb, seed=0).to(dev)

            def ours(nb=nb, proj=proj):
                ids_q = sp.hash_buckets(q, proj, nb)
                ids_k = sp.hash_buckets(k, proj, nb)
                return flash_attention(q, k, v, causal=True, sparsity=sp.HashSparse(ids_q, ids_k, nb, checked=True))

            def paper(nb=nb):
                qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
                return hs.attention_fn(qt, kt, vt, nb_hash=nb, hashes_per_head=True).transpose(1, 2)

            for impl, fn in (("ringflash", ours), ("paper", paper)):
                for mode, ms in time(fn, (q, k, v), dout).items():
                    record(impl=impl, S=S, mask="hash", sparsity=f"hash:{nb}", mode=mode, ms=ms)
        for frac in args.drop:
            def ours_drop(frac=frac):
                keep_q = torch.rand(1, S, H, device=dev) > frac
                keep_k = torch.rand(1, S, H, device=dev) > frac
                return flash_attention(q, k, v, causal=True, sparsity=sp.QKDrop(keep_q, keep_k))

            def paper_drop(frac=frac):
                return qs.attention_fn(q, k, v, sparsity=frac)

            for impl, fn in (("ringflash", ours_drop), ("paper", paper_drop)):
                for mode, ms in time(fn, (q, k, v), dout).items():
                    record(impl=impl, S=S, mask="qkdrop", sparsity=f"qkdrop:{frac:g}", mode=mode, ms=ms)
    out.close()


if __name__ == "__main__":
    main()
