"""Host time of a sparse call as a model makes it, on one GPU: is it bound by the host?

    PYTHONPATH=. python benchmarks/profile_sparse_host.py --seqlen 8k --head-dim 64 --out host.jsonl [--breakdown]

``flash_attention(..., sparsity=HashSparse(8 random buckets))`` and dense causal, fwd+bwd,
B = 1, H = 32, bf16. For each: one call under ``torch.cuda.set_sync_debug_mode("error")``
(a host-device synchronisation raises, and its traceback is printed), then 20 calls timed on
the host (until the last call returns: ``host_ms``) and until the GPU has finished
(``wall_ms``): ``host_ms`` close to ``wall_ms`` means the GPU waits for the host. Then
``torch.profiler`` over 3 calls (the table, by CPU time). One JSON line per mode.

``--breakdown``: instead of the profiler, the inclusive host time per call of each ringflash
function on the path and of each Triton launch (``triton.run:<kernel>``), from timers wrapped
around them (the backward runs on the calling thread for this, so that its functions are
timed too); ``breakdown_us`` in the JSON line.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import sys
import time
import traceback

import torch

from ringflash import flash_attention
from ringflash.sparse import HashSparse


def parse_len(s: str) -> int:
    return int(s[:-1]) * 1024 if s.endswith("k") else int(s)


# The functions --breakdown times: (module, names); autograd Functions: (class, methods).
_TIMED = (
    ("ringflash.ops", ("flash_attention", "check_qkv", "get_backend", "check_sparsity", "make_mask")),
    ("ringflash.sparse", ("run_sorted", "_sort_on_device")),
    ("ringflash.kernels.attention", ("forward", "backward", "backward_delta", "_launch", "_tile_ranges",
                                     "_mask_args", "check_inputs", "_config")),
    ("ringflash.kernels.tokens", ("sort_tokens", "permute_tokens")),
)
_TIMED_METHODS = (("ringflash.ops", "_FlashAttention"), ("ringflash.sparse", "_Permute"))


@contextlib.contextmanager
def timed_functions():
    """Wrap the functions of ``_TIMED`` (every module's reference to them), the autograd
    Functions' forward and backward and Triton's launches with timers; yields the totals
    (label -> [seconds, calls]). Restores everything on exit."""
    import importlib

    import triton

    totals = collections.defaultdict(lambda: [0.0, 0])

    def wrap(label, fn):
        def timed(*a, **kw):
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                totals[label][0] += time.perf_counter() - t
                totals[label][1] += 1
        return timed

    undo = []
    modules = [m for n, m in list(sys.modules.items()) if n.startswith("ringflash") and m is not None]
    for mod_name, names in _TIMED:
        mod = importlib.import_module(mod_name)
        for name in names:
            orig = getattr(mod, name)
            new = wrap(f"{mod_name.split('.')[-1]}.{name}", orig)
            for m in modules:
                for attr, val in list(vars(m).items()):
                    if val is orig:
                        setattr(m, attr, new)
                        undo.append((m, attr, orig))
    for mod_name, cls_name in _TIMED_METHODS:
        cls = getattr(importlib.import_module(mod_name), cls_name)
        for meth in ("forward", "backward"):
            orig = cls.__dict__[meth]
            setattr(cls, meth, staticmethod(wrap(f"{cls_name}.{meth}", orig.__func__)))
            undo.append((cls, meth, orig))
    jit = triton.runtime.jit.JITFunction
    run = jit.run
    jit.run = lambda self, *a, **kw: wrap("triton.run:" + self.fn.__name__, run)(self, *a, **kw)
    undo.append((jit, "run", run))
    try:
        with torch.autograd.set_multithreading_enabled(False):
            yield totals
    finally:
        for obj, attr, orig in reversed(undo):
            setattr(obj, attr, orig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seqlen", default="8k")
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--buckets", type=int, default=8)
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--out", default="")
    ap.add_argument("--breakdown", action="store_true",
                    help="inclusive host time per function and launch instead of the profiler table")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    S, H, D, dev = parse_len(a.seqlen), a.heads, a.head_dim, "cuda"
    g = torch.Generator(device=dev).manual_seed(0)
    q, k, v, do = (torch.randn(1, S, H, D, generator=g, device=dev).bfloat16() for _ in range(4))
    for t in (q, k, v):
        t.requires_grad_()
    ids = [torch.randint(0, a.buckets, (1, S, H), generator=g, device=dev, dtype=torch.int32) for _ in range(2)]
    modes = {f"hash:{a.buckets}": HashSparse(*ids, a.buckets, checked=True), "dense": None}

    def step(sparsity):
        o = flash_attention(q, k, v, causal=True, sparsity=sparsity, backend="triton")
        return torch.autograd.grad(o, (q, k, v), do)

    for name, sp in modes.items():
        for _ in range(3):
            step(sp)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        sync = None
        try:
            step(sp)
        except RuntimeError:
            sync = traceback.format_exc(limit=-8)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(a.calls):
            step(sp)
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        rec = dict(gpu=torch.cuda.get_device_name(), S=S, H=H, D=D, mode=name, sync=sync,
                   host_ms=(t1 - t0) / a.calls * 1e3, wall_ms=(t2 - t0) / a.calls * 1e3)
        print(f"{name}: host {rec['host_ms']:.3f} ms/call, to the end of the GPU work {rec['wall_ms']:.3f} ms/call; "
              f"{'synchronises: ' + sync if sync else 'no host-device synchronisation'}")
        if a.breakdown:
            with timed_functions() as totals:
                for _ in range(a.calls):
                    step(sp)
                torch.cuda.synchronize()
            rec["breakdown_us"] = {label: t[0] / a.calls * 1e6 for label, t in totals.items()}
            print("inclusive host time per fwd+bwd call (us; calls per call), backward on this thread:")
            # (names other than q, k, v: step() reads those for the next mode)
            for label, (sec, n) in sorted(totals.items(), key=lambda kv: -kv[1][0]):
                print(f"  {label:40s} {sec / a.calls * 1e6:9.1f}  ({n / a.calls:g})")
        else:
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
                for _ in range(3):
                    step(sp)
                torch.cuda.synchronize()
            print(p.key_averages().table(sort_by="cpu_time_total", row_limit=30, max_name_column_width=60))
        if a.out:
            with open(a.out, "a") as f:
                f.write(json.dumps(rec) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
