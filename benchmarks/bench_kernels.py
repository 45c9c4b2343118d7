"""Throughput of the ringflash kernels next to PyTorch SDPA (flash and cuDNN backends) and
FlexAttention (``torch.compile``d ``flex_attention``: a causal block mask, none for full attention).

    PYTHONPATH=. python benchmarks/bench_kernels.py                      # full grid, bf16, B=1, H=32
    PYTHONPATH=. python benchmarks/bench_kernels.py --seqlens 8k 16k --head-dims 128 --modes fwd bwd
    PYTHONPATH=. python benchmarks/bench_kernels.py --sweep 8k --plot   # tune launch configs first
    PYTHONPATH=. python benchmarks/bench_kernels.py --prev /tmp/x/ringflash/kernels --impls ringflash_default ringflash_prev

TFLOP/s by the FlashAttention convention: fwd = 4*B*H*S^2*D, halved when causal;
bwd = 2.5 x fwd; fwdbwd = 3.5 x fwd. Times are medians of ``triton.testing.do_bench`` over
at least about 6 calls. Rows written before the casts were timed (the README's kernel table)
left them out, which favoured ringflash (estimated across runs: 2-5% at 8k-16k, under 1% at
64k).

What is timed:
* ``fwd``: ringflash ``forward`` (float32 O and LSE) and the cast of O to the input dtype;
  SDPA forward on inputs that require grad, so it also writes its LSE.
* ``bwd``: ringflash ``backward_delta`` + ``backward`` from saved O/LSE (float32 dQ/dK/dV,
  stored, not zero-filled) and their casts to the input dtype; SDPA ``autograd.grad`` of a
  saved output with ``retain_graph`` (its delta preprocess and dQ conversion included).
* ``fwdbwd``: both, back to back.
* ``flex``: as SDPA (forward on inputs that require grad, ``autograd.grad``).

Tensors are ``(B, S, H, D)`` for every implementation (SDPA gets transposed views), so all
read the same memory layout. Results go to ``benchmarks/results/kernels_<gpu>.jsonl`` (one
JSON object per line) and, with ``--plot``, a PNG next to it.

``--prev DIR``: a copy of another tree's ``ringflash/kernels`` package (``git archive <rev>
ringflash/kernels | tar -x -C /tmp/x``, then ``--prev /tmp/x/ringflash/kernels``), timed as
``impl = "ringflash_prev"``, called as ``ringflash_default`` calls this tree's: an A/B of two
trees' kernels in one process, their rows interleaved.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from ringflash import kernels  # noqa: E402

# ringflash: the Triton kernels alone (the Hopper kernels switched off); ringflash_default: the
# kernels forward() and backward() choose by default on this GPU (on sm_90 at D = 128: the Hopper
# forward and the Hopper backward adding dQ in a fixed order).
# The others set kernels.attention's switches (sm_90 only, bf16/fp16 at D = 64 and 128), the
# Hopper forward always on: ringflash_hopper: one consumer partition in the forward, the Hopper
# backward (HOPPER_BACKWARD); ringflash_hopper_split: a consumer partition per warpgroup in the
# forward (HOPPER_FWD_SPLIT = 2); ringflash_hopper_pingpong: those partitions taking turns to
# issue their matrix products (HOPPER_FWD_PINGPONG); ringflash_hopper_smem_p: the backward's dK/dV
# program with FA3's operand routes and the dQ kernel (HOPPER_BWD_SMEM_P, HOPPER_BWD_DQ "kernel");
# ringflash_hopper_persistent: the split forward as persistent programs drawing work from a
# counter (HOPPER_FWD_PERSISTENT); ringflash_hopper_atomic_dq / _ordered_dq: the backward in one
# kernel, the dK/dV programs adding dQ by bulk TMA reductions in any order / in a fixed order
# (HOPPER_BWD_DQ "atomic" / "ordered") with one dQ writer, with "_2w" two (HOPPER_BWD_DQ_WRITERS;
# the others take the module's default, two);
# ringflash_triton_bwd: the split Hopper forward with the
# Triton backward (the default on sm_90 before the Hopper backward was).
# Values: (backward, split, ping-pong, smem_p, persistent, dQ, dQ writers or None: the default).
HOPPER_IMPLS = {"ringflash_hopper": (True, 1, False, False, False, "ordered", None),
                "ringflash_hopper_split": (True, 2, False, False, False, "ordered", None),
                "ringflash_hopper_pingpong": (True, 2, True, False, False, "ordered", None),
                "ringflash_hopper_smem_p": (True, 2, False, True, False, "kernel", None),
                "ringflash_hopper_persistent": (True, 2, False, False, True, "ordered", None),
                "ringflash_hopper_atomic_dq": (True, 2, False, True, False, "atomic", "1"),
                "ringflash_hopper_ordered_dq": (True, 2, False, True, False, "ordered", "1"),
                "ringflash_hopper_ordered_dq_2w": (True, 2, False, True, False, "ordered", "2"),
                "ringflash_hopper_atomic_dq_2w": (True, 2, False, True, False, "atomic", "2"),
                "ringflash_triton_bwd": (False, 2, False, False, False, "ordered", None)}
# The defaults with settings of the Hopper backward changed, for A/B runs in one process:
# {attention module attribute: value}. ringflash_stats_global: LSE and delta loaded by the
# consumers, as before benchmarks/results/kernels_h100_stats_smem/.
SETTING_IMPLS = {"ringflash_stats_global": {"HOPPER_BWD_STATS_SMEM": False}}
IMPLS = ("ringflash", "ringflash_default", "ringflash_prev", *HOPPER_IMPLS, *SETTING_IMPLS, "sdpa_flash", "sdpa_cudnn",
         "flex")
MODES = ("fwd", "bwd", "fwdbwd")
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def load_prev(path: str):
    """The kernels package at ``path`` (a directory with __init__.py: another tree's
    ``ringflash/kernels``), under its own name, so that both trees' kernels run in one process."""
    spec = importlib.util.spec_from_file_location("kernels_prev", os.path.join(path, "__init__.py"),
                                                  submodule_search_locations=[path])
    mod = importlib.util.module_from_spec(spec)
    sys.modules["kernels_prev"] = mod
    spec.loader.exec_module(mod)
    return mod


PREV = None  # main() sets it from --prev: the kernels package ringflash_prev calls


def with_attention_settings(fn, settings: dict):
    """``fn`` with ``ringflash.kernels.attention``'s module settings ``{name: value}`` in force
    during each call, restored after it."""
    from ringflash.kernels import attention

    def run():
        saved = {name: getattr(attention, name) for name in settings}
        for name, value in settings.items():
            setattr(attention, name, value)
        try:
            return fn()
        finally:
            for name, value in saved.items():
                setattr(attention, name, value)
    return run


def parse_len(s: str) -> int:
    s = s.lower()
    return int(float(s[:-1]) * 1024) if s.endswith("k") else int(s)


def gpu_slug() -> str:
    name = torch.cuda.get_device_name().lower()
    for tag in ("h200", "h100", "a100", "b200", "l40s", "l4", "a10g"):
        if tag in name:
            return tag
    return name.replace("nvidia", "").strip().replace(" ", "_")


def flops(mode: str, B: int, H: int, S: int, D: int, causal: bool) -> float:
    f = 4.0 * B * H * S * S * D / (2 if causal else 1)
    return f * {"fwd": 1.0, "bwd": 2.5, "fwdbwd": 3.5}[mode]


def bench(fn) -> float:
    """Median milliseconds (triton.testing.do_bench), over at least about 6 calls: do_bench's
    repeat count is its time budget over one call's time, so a 100 ms budget would time a call
    of 50 ms or more once."""
    import time

    import triton.testing

    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    est_ms = (time.perf_counter() - t0) * 1e3
    return triton.testing.do_bench(fn, warmup=25, rep=max(100.0, 6 * est_ms), return_mode="median")


def sdpa_backend(impl: str):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.FLASH_ATTENTION if impl == "sdpa_flash" else SDPBackend.CUDNN_ATTENTION)


def make_fns(impl: str, q, k, v, dout, causal: bool):
    """(fwd, bwd, fwdbwd) callables for one implementation on one set of inputs."""
    if impl in HOPPER_IMPLS:
        from ringflash.kernels import attention

        def hopper(fn):
            def run():
                names = ("HOPPER_FORWARD", "HOPPER_BACKWARD", "HOPPER_FWD_SPLIT", "HOPPER_FWD_PINGPONG",
                         "HOPPER_BWD_SMEM_P", "HOPPER_FWD_PERSISTENT", "HOPPER_BWD_DQ", "HOPPER_BWD_HEAD_DIMS",
                         "HOPPER_BWD_DQ_WRITERS")
                saved = [getattr(attention, n) for n in names]
                *switches, writers = HOPPER_IMPLS[impl]
                for n, value in zip(names, (True, *switches, (64, 128), writers or saved[-1])):
                    setattr(attention, n, value)
                try:
                    return fn()
                finally:
                    for n, value in zip(names, saved):
                        setattr(attention, n, value)
            return run

        return tuple(hopper(fn) for fn in make_fns("ringflash_default", q, k, v, dout, causal))
    if impl in SETTING_IMPLS:
        return tuple(with_attention_settings(fn, SETTING_IMPLS[impl])
                     for fn in make_fns("ringflash_default", q, k, v, dout, causal))
    if impl == "ringflash":
        from ringflash.kernels import attention as attn_mod

        def triton_only(fn):
            def run():
                saved = attn_mod.HOPPER_FORWARD, attn_mod.HOPPER_BACKWARD
                attn_mod.HOPPER_FORWARD = attn_mod.HOPPER_BACKWARD = False
                try:
                    return fn()
                finally:
                    attn_mod.HOPPER_FORWARD, attn_mod.HOPPER_BACKWARD = saved
            return run

        return tuple(triton_only(fn) for fn in make_fns("ringflash_default", q, k, v, dout, causal))
    if impl in ("ringflash_default", "ringflash_prev"):
        # As flash_attention calls the kernels: O, dQ, dK and dV stored in the inputs' dtype, as
        # SDPA returns them (the ring asks for float32, which it accumulates in).
        if impl == "ringflash_prev" and PREV is None:
            raise ValueError("ringflash_prev needs --prev DIR (another tree's ringflash/kernels)")
        kmod = PREV if impl == "ringflash_prev" else kernels
        out, lse = kmod.forward(q, k, v, causal=causal, out_dtype=q.dtype)

        def fwd():
            return kmod.forward(q, k, v, causal=causal, out_dtype=q.dtype)

        def bwd():
            delta = kmod.backward_delta(out, dout)
            return kmod.backward(dout, q, k, v, lse, delta, causal=causal, grad_dtype=q.dtype)

        def fwdbwd():
            o, l = kmod.forward(q, k, v, causal=causal, out_dtype=q.dtype)
            delta = kmod.backward_delta(o, dout)
            return kmod.backward(dout, q, k, v, l, delta, causal=causal, grad_dtype=q.dtype)

        return fwd, bwd, fwdbwd

    qg, kg, vg = (t.detach().clone().requires_grad_() for t in (q, k, v))
    if impl == "flex":
        return flex_fns(qg, kg, vg, dout, causal)

    def run_fwd():
        with sdpa_backend(impl):
            return F.scaled_dot_product_attention(
                qg.transpose(1, 2), kg.transpose(1, 2), vg.transpose(1, 2), is_causal=causal,
                enable_gqa=kg.shape[2] != qg.shape[2],
            )

    saved = run_fwd()
    dout_t = dout.transpose(1, 2)

    def bwd():
        with sdpa_backend(impl):
            return torch.autograd.grad(saved, (qg, kg, vg), dout_t, retain_graph=True)

    def fwdbwd():
        o = run_fwd()
        with sdpa_backend(impl):
            return torch.autograd.grad(o, (qg, kg, vg), dout_t)

    return run_fwd, bwd, fwdbwd


def flex_fns(qg, kg, vg, dout, causal: bool):
    """FlexAttention (``torch.compile``d ``flex_attention``): a causal block mask, or none for full
    attention; grouped queries through ``enable_gqa``."""
    import torch._functorch.config
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    S = qg.shape[1]
    # ``bwd`` runs the backward of one saved forward again and again (retain_graph), which a
    # compiled backward that donates its saved buffers refuses (it did at S = 16k, causal).
    torch._functorch.config.donated_buffer = False
    compiled = torch.compile(flex_attention, dynamic=False)
    block_mask = (create_block_mask(lambda b, h, qi, ki: qi >= ki, None, None, S, S, device=qg.device, _compile=True)
                  if causal else None)
    qt, kt, vt = (t.detach().transpose(1, 2).contiguous().requires_grad_() for t in (qg, kg, vg))
    dt = dout.transpose(1, 2).contiguous()
    gqa = kt.shape[1] != qt.shape[1]

    def fwd():
        return compiled(qt, kt, vt, block_mask=block_mask, enable_gqa=gqa)

    saved = fwd()

    def bwd():
        return torch.autograd.grad(saved, (qt, kt, vt), dt, retain_graph=True)

    def fwdbwd():
        return torch.autograd.grad(fwd(), (qt, kt, vt), dt)

    return fwd, bwd, fwdbwd


def inputs(B, S, H, D, dtype, seed=0, Hkv=None):
    """q, k, v, dout; k and v with ``Hkv`` heads (GQA) when given."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    return [torch.randn(B, S, h, D, generator=g, device="cuda", dtype=dtype) for h in (H, Hkv or H, Hkv or H, H)]


# -- launch-config sweep ------------------------------------------------------------------

C = kernels.KernelConfig
SWEEP_FWD = {
    128: [C(128, 64, 8, 3), C(128, 128, 8, 3), C(64, 64, 4, 3), C(128, 64, 8, 4)],
    64: [C(128, 64, 4, 3), C(128, 64, 8, 3)],
}
SWEEP_DKDV = {
    128: [C(64, 128, 8, 3), C(64, 128, 8, 4), C(128, 128, 8, 2)],
    64: [C(64, 128, 4, 3), C(64, 128, 8, 3), C(64, 128, 4, 4)],
}
SWEEP_DQ = {
    128: [C(128, 64, 8, 3), C(128, 64, 8, 4), C(128, 128, 8, 2)],
    64: [C(128, 64, 4, 3), C(128, 64, 8, 3), C(128, 128, 8, 3)],
}


def sweep(S: int, head_dims, B: int, H: int, dtype, log) -> None:
    """Pick the fastest launch config per head dim at length S and install it in the tables."""
    for D in head_dims:
        q, k, v, dout = inputs(B, S, H, D, dtype)
        # The forward table is keyed by (head dim, causal): masked loops favour other tiles.
        for causal in (True, False):
            best = None
            for cfg in SWEEP_FWD.get(D, []):
                kernels.FWD_CONFIGS[(D, causal)] = cfg
                try:
                    ms = bench(lambda: kernels.forward(q, k, v, causal=causal))
                except Exception as e:  # a config the compiler cannot fit (shared memory)
                    log({"sweep": "fwd", "D": D, "causal": causal, "config": list(cfg), "error": repr(e)[:200]})
                    continue
                tf = flops("fwd", B, H, S, D, causal) / ms * 1e-9
                log({"sweep": "fwd", "D": D, "S": S, "causal": causal, "config": list(cfg), "tflops": round(tf, 1)})
                if best is None or tf > best[0]:
                    best = (tf, cfg)
            if best:
                kernels.FWD_CONFIGS[(D, causal)] = best[1]
        out, lse = kernels.forward(q, k, v, causal=True)
        delta = kernels.backward_delta(out.to(dtype), dout)
        bwd_module = sys.modules[kernels.backward.__module__]
        bwd_module.BWD_FUSED = False  # candidates may differ in warps/stages from the default
        for table, cands, name in (
            (kernels.BWD_DKDV_CONFIGS, SWEEP_DKDV, "dkdv"),
            (kernels.BWD_DQ_CONFIGS, SWEEP_DQ, "dq"),
        ):
            for causal in (True, False):
                best = None
                for cfg in cands.get(D, []):
                    table[(D, causal)] = cfg
                    try:
                        ms = bench(lambda: kernels.backward(dout, q, k, v, lse, delta, causal=causal))
                    except Exception as e:
                        log({"sweep": name, "D": D, "causal": causal, "config": list(cfg), "error": repr(e)[:200]})
                        continue
                    tf = flops("bwd", B, H, S, D, causal) / ms * 1e-9
                    log({"sweep": name, "D": D, "S": S, "causal": causal, "config": list(cfg), "tflops": round(tf, 1)})
                    if best is None or tf > best[0]:
                        best = (tf, cfg)
                if best:
                    table[(D, causal)] = best[1]
        # One grid for dK/dV and dQ programs, or two launches.
        for causal in (True, False):
            for fused in (False, True):
                bwd_module.BWD_FUSED = fused
                ms = bench(lambda: kernels.backward(dout, q, k, v, lse, delta, causal=causal))
                tf = flops("bwd", B, H, S, D, causal) / ms * 1e-9
                log({"sweep": "bwd_fused", "D": D, "S": S, "causal": causal, "fused": fused, "tflops": round(tf, 1)})
        bwd_module.BWD_FUSED = True
        del q, k, v, dout, out, lse, delta
        torch.cuda.empty_cache()


def ab_fused(S: int, head_dims, B: int, H: int, dtype, log, rounds: int = 3) -> None:
    """Backward as one fused grid vs two launches, interleaved; keep the faster."""
    mod = sys.modules[kernels.backward.__module__]
    total = {False: 0.0, True: 0.0}
    for D in head_dims:
        q, k, v, dout = inputs(B, S, H, D, dtype)
        for causal in (True, False):
            out, lse = kernels.forward(q, k, v, causal=causal)
            delta = kernels.backward_delta(out.to(dtype), dout)
            times = {False: [], True: []}
            for _ in range(rounds):
                for fused in (False, True):
                    mod.BWD_FUSED = fused
                    times[fused].append(bench(lambda: kernels.backward(dout, q, k, v, lse, delta, causal=causal)))
            for fused in (False, True):
                ms = sorted(times[fused])[rounds // 2]
                total[fused] += ms
                tf = flops("bwd", B, H, S, D, causal) / ms * 1e-9
                log({"sweep": "bwd_fused", "D": D, "S": S, "causal": causal, "fused": fused, "tflops": round(tf, 1)})
            del out, lse, delta
        del q, k, v, dout
        torch.cuda.empty_cache()
    mod.BWD_FUSED = total[True] < total[False]
    log({"sweep": "bwd_fused", "choice": mod.BWD_FUSED, "ms_total": {str(k): round(v, 3) for k, v in total.items()}})


# -- main ---------------------------------------------------------------------------------

def plot(path_jsonl: str, path_png: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(l) for l in open(path_jsonl) if l.strip()]
    rows = [r for r in rows if "tflops" in r and "impl" in r]
    hkv = lambda r: r.get("Hkv", r.get("H"))  # noqa: E731  (older rows: no GQA)
    combos = sorted({(r["D"], hkv(r), r["causal"]) for r in rows})
    modes = [m for m in MODES if any(r["mode"] == m for r in rows)]
    fig, axes = plt.subplots(len(modes), len(combos), figsize=(4 * len(combos), 3.2 * len(modes)), squeeze=False)
    for i, mode in enumerate(modes):
        for j, (D, Hkv, causal) in enumerate(combos):
            ax = axes[i][j]
            for impl in IMPLS:
                pts = sorted((r["S"], r["tflops"]) for r in rows
                             if r["impl"] == impl and r["mode"] == mode and r["D"] == D and hkv(r) == Hkv
                             and r["causal"] == causal)
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=impl)
            ax.set_xscale("log", base=2)
            ax.set_title(f"{mode}, D={D}, Hkv={Hkv}, {'causal' if causal else 'full'}", fontsize=9)
            ax.set_xlabel("sequence length")
            ax.set_ylabel("TFLOP/s")
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    gpu = rows[0]["gpu"] if rows else ""
    fig.suptitle(f"attention kernels, bf16, B=1, H=32 ({gpu})")
    fig.tight_layout()
    fig.savefig(path_png, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seqlens", nargs="+", default=["1k", "2k", "4k", "8k", "16k", "32k", "64k"])
    p.add_argument("--head-dims", nargs="+", type=int, default=[64, 128])
    p.add_argument("--causal", choices=["both", "true", "false"], default="both")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--impls", nargs="+", choices=IMPLS, default=None,
                   help="default: all (the ringflash_hopper ones on sm_90 GPUs only)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, nargs="+", default=None,
                   help="key/value heads to run (GQA when fewer than --heads; default: --heads)")
    p.add_argument("--dkdv-programs-per-sm", type=int, default=None,
                   help="set kernels.attention.DKDV_PROGRAMS_PER_SM (0: never split a GQA group over programs)")
    p.add_argument("--prev", default="", help="another tree's ringflash/kernels directory, timed as ringflash_prev")
    p.add_argument("--sweep", default=None, help="tune launch configs at this length first (e.g. 8k)")
    p.add_argument("--ab-fused", default=None, help="pick fused/two-launch backward at this length first")
    p.add_argument("--out", default=None, help="JSON-lines file (default results/kernels_<gpu>.jsonl)")
    p.add_argument("--plot", action="store_true", help="also write a PNG plot next to the JSON lines")
    p.add_argument("--plot-only", action="store_true", help="only redraw the plot from --out")
    p.add_argument("--time-budget", type=float, default=None, help="stop starting new lengths after this many seconds")
    args = p.parse_args()

    gpu = gpu_slug() if torch.cuda.is_available() else "cpu"
    out_path = args.out or os.path.join(RESULTS, f"kernels_{gpu}.jsonl")
    png_path = os.path.splitext(out_path)[0] + ".png"
    if args.plot_only:
        plot(out_path, png_path)
        return
    if not torch.cuda.is_available():
        sys.exit("bench_kernels.py needs a CUDA GPU")
    global PREV
    if args.prev:
        PREV = load_prev(args.prev)
    elif args.impls is not None and "ringflash_prev" in args.impls:
        sys.exit("--impls ringflash_prev needs --prev DIR")
    if args.impls is None:
        hopper = torch.cuda.get_device_capability() == (9, 0)
        args.impls = [i for i in IMPLS if (hopper or i not in (*HOPPER_IMPLS, *SETTING_IMPLS, "ringflash_default"))
                      and (i != "ringflash_prev" or PREV is not None)]
    os.makedirs(os.path.dirname(out_path) or ".", exist_ok=True)
    t0 = time.time()
    attn = sys.modules[kernels.backward.__module__]
    if args.dkdv_programs_per_sm is not None:
        attn.DKDV_PROGRAMS_PER_SM = args.dkdv_programs_per_sm
    dtype = torch.bfloat16
    B, H = args.batch, args.heads
    causals = {"both": [False, True], "true": [True], "false": [False]}[args.causal]
    meta = {"gpu": gpu, "device": torch.cuda.get_device_name(), "torch": torch.__version__,
            "triton": __import__("triton").__version__, "dtype": "bf16", "B": B, "H": H,
            "dkdv_programs_per_sm": attn.DKDV_PROGRAMS_PER_SM}

    def log_sweep(rec):
        print("sweep", json.dumps(rec), flush=True)
        with open(os.path.splitext(out_path)[0] + "_sweep.jsonl", "a") as f:
            f.write(json.dumps({**meta, **rec}) + "\n")

    # The sweeps tune the Triton kernels' tables: the Hopper kernels stay out of them.
    hopper_saved = attn.HOPPER_FORWARD, attn.HOPPER_BACKWARD
    attn.HOPPER_FORWARD = attn.HOPPER_BACKWARD = False
    if args.sweep:
        sweep(parse_len(args.sweep), args.head_dims, B, H, dtype, log_sweep)

    if args.ab_fused:
        ab_fused(parse_len(args.ab_fused), args.head_dims, B, H, dtype, log_sweep)
    attn.HOPPER_FORWARD, attn.HOPPER_BACKWARD = hopper_saved

    print(f"{'S':>6} {'D':>4} {'Hkv':>4} {'mask':>6} {'mode':>7} " + " ".join(f"{i:>11}" for i in args.impls) + "   rf/flash rf/cudnn")
    with open(out_path, "a") as fout:
        for S in map(parse_len, args.seqlens):
            if args.time_budget and time.time() - t0 > args.time_budget:
                print(f"time budget reached; skipping S >= {S}")
                break
            for D in args.head_dims:
                for causal, Hkv in itertools.product(causals, args.kv_heads or [H]):
                    q, k, v, dout = inputs(B, S, H, D, dtype, Hkv=Hkv)
                    res = {m: {} for m in args.modes}
                    for impl in args.impls:
                        try:
                            fns = dict(zip(MODES, make_fns(impl, q, k, v, dout, causal)))
                        except Exception as e:
                            print(f"{impl} S={S} D={D} Hkv={Hkv}: {e!r}"[:300])
                            continue
                        for mode in args.modes:
                            try:
                                ms = bench(fns[mode])
                            except Exception as e:
                                print(f"{impl} {mode} S={S} D={D}: {e!r}"[:300])
                                continue
                            tf = flops(mode, B, H, S, D, causal) / ms * 1e-9
                            res[mode][impl] = tf
                            rec = {**meta, "impl": impl, "S": S, "D": D, "Hkv": Hkv, "causal": causal, "mode": mode,
                                   "ms": round(ms, 4), "tflops": round(tf, 1)}
                            fout.write(json.dumps(rec) + "\n")
                            fout.flush()
                        del fns
                        torch.cuda.empty_cache()
                    for mode in args.modes:
                        r = res[mode]
                        cells = " ".join(f"{r[i]:11.1f}" if i in r else f"{'-':>11}" for i in args.impls)
                        ratio = lambda other, mine="ringflash": (  # noqa: E731
                            f"{r[mine] / r[other]:8.2f}" if r.get(mine) and r.get(other) else f"{'-':>8}")
                        hop = "".join(f"  {name}/{base} {ratio(other, impl)}"
                                      for name, impl in (("default", "ringflash_default"), ("hopper", "ringflash_hopper"))
                                      for base, other in (("cudnn", "sdpa_cudnn"), ("flex", "flex"))
                                      if impl in r and other in r)
                        print(f"{S:>6} {D:>4} {Hkv:>4} {'causal' if causal else 'full':>6} {mode:>7} {cells}  "
                              f"{ratio('sdpa_flash')} {ratio('sdpa_cudnn')}{hop}", flush=True)
                    del q, k, v, dout
                    torch.cuda.empty_cache()
    print("configs:", {"fwd": kernels.FWD_CONFIGS, "hopper_fwd": attn.HOPPER_FWD_CONFIGS,
                       "hopper_dkdv": attn.HOPPER_BWD_DKDV_CONFIGS, "hopper_dq": attn.HOPPER_BWD_DQ_CONFIGS, "dkdv": kernels.BWD_DKDV_CONFIGS, "dkdv_grouped": attn.BWD_DKDV_GROUPED_CONFIGS,
                       "dq": kernels.BWD_DQ_CONFIGS,
                       "bwd_fused": attn.BWD_FUSED})
    if args.plot:
        plot(out_path, png_path)
        print("wrote", out_path, png_path)


if __name__ == "__main__":
    main()
