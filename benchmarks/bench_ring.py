"""Ring attention across GPUs: per-GPU TFLOP/s and peak memory, beside PyTorch's context parallel.

    torchrun --nproc-per-node 4 benchmarks/bench_ring.py --seqlens 32k 128k \
        --out benchmarks/results/ring_h200x4.jsonl

For every (S, heads_kv, causal, mode) it times, in the same run:
  ringflash       ring_attention for each layout (contiguous, striped, zigzag)
  torch_cp_flash  torch.distributed.tensor.experimental.context_parallel over SDPA (flash)
  torch_cp_cudnn  the same over SDPA (cuDNN)
  single_gpu      the same local engine on one GPU at the per-rank size S/P (the efficiency bar)
  ringflash_local (diagnostic, not run unless asked) the ring's compute on each rank with every
                  transfer replaced by a copy of the rank's own buffers on a side stream: no
                  NCCL kernel shares the GPU, so ringflash_local / single_gpu is the cost of the
                  ring's own work and ringflash / ringflash_local the cost of its transfers

``--engines triton cudnn`` gives ringflash and single-GPU rows for each local engine;
``--transports nccl copy_engine`` times the ringflash rows over each transport
(``ringflash.comm.TRANSPORT``; the copy-engine rows also record the size of their
receive workspace, ``workspace_gib``; ``--ce-signals kernel stream`` gives one copy-engine row
per way of signalling, ``ringflash.comm.COPY_ENGINE_SIGNALS``, recorded as ``ce_signals``);
``--ulysses 1 2 4`` times the ringflash rows over each split of the ``P`` ranks into ``P / U``
ring positions of ``U`` Ulysses ranks (``ringflash.HybridGroup``; 1: the plain ring), with each
of ``--ulysses-chunks`` (``HybridGroup(chunks=)``), recorded as ``ulysses``, ``ring`` and
``chunks``; for causal fwd+bwd those rows also carry ``predicted_ms``, the cost model's
(``benchmarks/cost_model.py``, one node, ``--model-tflops`` and ``--nvlink-gbs``);
``--last-hop-parts 1 4`` times the SDPA engines' backward with its last dK/dV hop in one
message and cut in chunks (``ringflash.ring.LAST_HOP_PARTS``), side by side; likewise
``--head-start-us 0 20`` for the head start their transfers get (``ringflash.ring.HEAD_START_US``;
with several values it applies on any number of ranks, which the library's default does not).

TFLOP/s per GPU use the FlashAttention convention: fwd = 4 * B * H * S^2 * D (halved when
causal), fwd+bwd = 3.5 * fwd, divided by the number of GPUs. A time is the median over
iterations on each rank, then the slowest rank; before each timed call the GPU spins for
``--host-lead-us`` so that the host queues the call ahead (``host_lead_us`` in the rows; rows
without it were timed from an idle GPU, Python before the first launch included). torch CP
rows record their K/V exchange (``cp_rotate``, ``--cp-rotate``). Peak memory is the largest
``max_memory_allocated`` over ranks, inputs included; for torch CP, counted from inside its
context and less the full-length storage that its in-place sharding keeps (rows with
``host_lead_us``; earlier torch CP rows counted the full-length q, k, v and dout); the copy-engine workspace is outside it
(``workspace_gib``), and the printed table's GiB column adds the two. Results: one JSON object
per line.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cost_model  # noqa: E402
from ringflash import HybridGroup, flash_attention, get_layout, ring_attention  # noqa: E402
import ringflash.ring as ring_mod  # noqa: E402
from ringflash import comm  # noqa: E402
from ringflash.comm import Exchange, Ring  # noqa: E402

DEFAULT_LAST_HOP_PARTS = ring_mod.LAST_HOP_PARTS
DEFAULT_HEAD_START_US = ring_mod.HEAD_START_US
DEFAULT_CE_SIGNALS = comm.COPY_ENGINE_SIGNALS
ENGINES = ["triton", "cudnn", "sdpa_flash", "triton_head_start", "triton_zero_fill"]
# A/B variants of the Triton engine, for the ringflash rows only (their single-GPU rows are "triton").
TRITON_VARIANTS = ("triton_head_start", "triton_zero_fill")
# The engines whose transfers get the head start (``holds_sms``).
HEAD_START_ENGINES = ("cudnn", "sdpa_flash", "triton_head_start")


def ring_backend(engine: str):
    """The backend argument for ``engine``. The Triton engine's A/B variants:
    ``triton_head_start`` gets the transfers' head start that the SDPA engines get
    (``ringflash.ring.HEAD_START_US``); ``triton_zero_fill`` zero-fills its dK/dV buffer and
    adds into it at every ring step, instead of having the kernel overwrite it."""
    if engine not in TRITON_VARIANTS:
        return engine
    from ringflash.ops import get_backend

    be = get_backend("triton", torch.device("cuda"))
    if engine == "triton_head_start":
        be.holds_sms = True
    else:
        be.dkdv_store = False
    return be


def parse_size(s: str) -> int:
    s = s.lower()
    mult = {"k": 1024, "m": 1024 * 1024}.get(s[-1], 1)
    return int(float(s[:-1] if s[-1] in "km" else s) * mult)


def flops(S, H, D, causal, mode, B=1):
    f = 4 * B * H * S * S * D / (2 if causal else 1)
    return f * (3.5 if mode == "fwdbwd" else 1.0)


DEFAULT_HOST_LEAD_US = 2000.0
HOST_LEAD_US = DEFAULT_HOST_LEAD_US


def time_ms(fn, warmup: int, iters: int) -> float:
    """Median milliseconds of ``fn`` on this rank (CUDA events), then the max over ranks.

    Before each timed call the GPU spins for ``HOST_LEAD_US`` (outside the events), so the host
    queues the call's first kernels before the start event fires: the time is the GPU's, not
    the Python before the first launch, as in a training loop where the host runs ahead."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    dist.barrier()
    lead = int(HOST_LEAD_US * ring_mod._cycles_per_us(torch.device("cuda", torch.cuda.current_device())))
    times = []
    for _ in range(iters):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        if lead:
            torch.cuda._sleep(lead)
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop))
    t = torch.tensor(statistics.median(times), device="cuda")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def peak_gib(less_bytes: int = 0) -> float:
    m = torch.tensor(float(torch.cuda.max_memory_allocated() - less_bytes), device="cuda")
    dist.all_reduce(m, op=dist.ReduceOp.MAX)
    return m.item() / 2**30


def step_fn(attn, q, k, v, mode):
    """One forward (and backward) of ``attn`` on fresh autograd leaves."""
    if mode == "fwd":
        def fn():
            with torch.no_grad():
                attn(q, k, v)
        return fn
    dout = torch.randn_like(q)
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))

    def fn():
        out = attn(q, k, v)
        out.backward(dout)
        q.grad = k.grad = v.grad = None
    return fn


class _LocalWork:
    """A side-stream copy standing in for a transfer: ``wait`` makes the current stream wait."""

    def __init__(self, event):
        self.event = event

    def wait(self):
        torch.cuda.current_stream().wait_event(self.event)


@contextlib.contextmanager
def local_transfers():
    """Within: every ``Ring.exchange`` copies ``send[i]`` into ``recv[i]`` on a side stream of
    this GPU instead of sending it. The ring's kernels, buffers and stream order stay; its
    results are not those of the ring (each rank sees its own K/V at every step)."""
    side = torch.cuda.Stream()

    def exchange(self, send, recv):
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for s, r in zip(send, recv, strict=True):
                r.copy_(s)
                s.record_stream(side)
                r.record_stream(side)
        done = torch.cuda.Event()
        done.record(side)
        return Exchange([_LocalWork(done)])

    real = Ring.exchange
    Ring.exchange = exchange
    try:
        yield
    finally:
        Ring.exchange = real


def error_text(e: Exception) -> str:
    """A row's ``error``: the exception's type and first line."""
    first = str(e).splitlines()[0][:200] if str(e) else ""
    return f"{type(e).__name__}: {first}"


def add_run_args(ap) -> None:
    """The timing and output flags of the masked and sparse ring benchmarks."""
    ap.add_argument("--host-lead-us", type=float, default=DEFAULT_HOST_LEAD_US)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--out", default=None, help="append JSON lines here (rank 0)")


@contextlib.contextmanager
def result_row(row: dict, rows: list, rank: int, out: str | None):
    """Fill ``row`` within; an exception becomes its ``error`` (a failing baseline is a result
    too). Then the row is kept in ``rows`` and emitted."""
    try:
        yield row
    except Exception as e:  # noqa: BLE001
        row["error"] = error_text(e)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    rows.append(row)
    emit(row, rank, out)


def emit(row: dict, rank: int, out: str | None) -> None:
    """Rank 0 prints ``row`` as JSON and appends it to ``out``."""
    if rank != 0:
        return
    print(json.dumps(row), flush=True)
    if out:
        with open(out, "a") as f:
            f.write(json.dumps(row) + "\n")


def nccl_env() -> dict:
    """The NCCL_* and TORCH_NCCL_* variables this process runs with (the rows' provenance)."""
    return {k: v for k, v in sorted(os.environ.items()) if k.startswith(("NCCL_", "TORCH_NCCL_"))}


def local_shards(S, H, Hkv, D):
    """This rank's random bf16 q, k, v of S / P tokens (seeded by rank), after the peak-memory
    counter is reset: a row's peak counts its own inputs."""
    P, r = dist.get_world_size(), dist.get_rank()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    L = S // P
    g = torch.Generator(device="cuda").manual_seed(1234 + r)
    return [torch.randn(1, L, h, D, device="cuda", dtype=torch.bfloat16, generator=g) for h in (H, Hkv, Hkv)]


def bench_ringflash(S, H, Hkv, D, causal, mode, layout, args, engine="triton", last_hop_parts=None, head_start_us=None,
                    local=False, transport="nccl", ce_signals=None, group=None):
    ring_mod.LAST_HOP_PARTS = DEFAULT_LAST_HOP_PARTS if last_hop_parts is None else last_hop_parts
    ring_mod.HEAD_START_US = DEFAULT_HEAD_START_US if head_start_us is None else head_start_us
    comm.TRANSPORT = transport
    comm.COPY_ENGINE_SIGNALS = DEFAULT_CE_SIGNALS if ce_signals is None else ce_signals
    comm.free_workspaces()  # each row's peak counts its own workspace
    q, k, v = local_shards(S, H, Hkv, D)
    lay = get_layout(layout)
    fn = step_fn(lambda a, b, c: ring_attention(a, b, c, causal=causal, layout=lay, backend=ring_backend(engine),
                                                group=group), q, k, v, mode)
    with local_transfers() if local else contextlib.nullcontext():
        ms = time_ms(fn, args.warmup, args.iters)
    comm.TRANSPORT, comm.COPY_ENGINE_SIGNALS = "nccl", DEFAULT_CE_SIGNALS
    return ms, peak_gib()


def workspace_gib() -> float:
    """The copy-engine transport's receive workspaces (symmetric memory, kept between calls,
    outside the caching allocator's peak): reported beside the peak of its rows."""
    return comm.workspace_bytes() / 2**30


def bench_single(S, H, Hkv, D, causal, mode, args, engine="triton"):
    """The same kernel on one GPU at the per-rank size: every rank runs it alone."""
    P = dist.get_world_size()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    L = S // P
    q = torch.randn(1, L, H, D, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, L, Hkv, D, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(1, L, Hkv, D, device="cuda", dtype=torch.bfloat16)
    fn = step_fn(lambda a, b, c: flash_attention(a, b, c, causal=causal, backend=engine), q, k, v, mode)
    ms = time_ms(fn, args.warmup, args.iters)
    return ms, peak_gib()


_MESH = None


def bench_torch_cp(S, H, Hkv, D, causal, mode, backend, args):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.experimental import context_parallel
    from torch.nn.attention import SDPBackend, sdpa_kernel
    import torch.nn.functional as F

    P = dist.get_world_size()
    global _MESH
    if _MESH is None:
        _MESH = init_device_mesh("cuda", (P,))
    mesh = _MESH
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    g = torch.Generator(device="cuda").manual_seed(1234)  # the same full tensors on every rank
    q = torch.randn(1, H, S, D, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(1, Hkv, S, D, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn(1, Hkv, S, D, device="cuda", dtype=torch.bfloat16, generator=g)
    dout = torch.randn(1, H, S, D, device="cuda", dtype=torch.bfloat16, generator=g)
    kernel = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}[backend]
    gqa = {"enable_gqa": True} if Hkv != H else {}
    from torch.distributed.tensor.experimental._attention import _cp_options, set_rotate_method

    # Head-tail load balancing is torch CP's default, and only valid for causal attention.
    _cp_options.enable_load_balance = causal
    set_rotate_method(args.cp_rotate)
    buffers = [q, k, v] + ([dout] if mode == "fwdbwd" else [])
    with sdpa_kernel(kernel), context_parallel(mesh, buffers=buffers, buffer_seq_dims=[2] * len(buffers),
                                               no_restore_buffers=set(buffers)):
        # context_parallel shards the buffers in place with resize_(), which keeps each full-length
        # storage: a program that built its shards directly would not hold that excess. The peak
        # counts from here, less the excess.
        excess = sum(b.untyped_storage().nbytes() - b.numel() * b.element_size() for b in buffers)
        torch.cuda.reset_peak_memory_stats()
        if mode == "fwd":
            def fn():
                with torch.no_grad():
                    F.scaled_dot_product_attention(q, k, v, is_causal=causal, **gqa)
        else:
            for x in (q, k, v):
                x.requires_grad_()

            def fn():
                out = F.scaled_dot_product_attention(q, k, v, is_causal=causal, **gqa)
                out.backward(dout)
                q.grad = k.grad = v.grad = None
        ms = time_ms(fn, args.warmup, args.iters)
    return ms, peak_gib(excess)


def hybrid_groups(P: int, rank: int, sizes: list[int]) -> dict:
    """U -> (ring group, Ulysses group) of this rank for each Ulysses size (U = 1: none). Every
    rank creates every group, in the same order; Ulysses groups are U consecutive ranks."""
    out = {}
    for U in sizes:
        if U == 1:
            continue
        if P % U:
            raise SystemExit(f"--ulysses {U} does not divide the {P} ranks")
        R = P // U
        rings = [dist.new_group([r * U + u for r in range(R)]) for u in range(U)]
        ulysses = [dist.new_group([r * U + u for u in range(U)]) for r in range(R)]
        out[U] = (rings[rank % U], ulysses[rank // U])
    return out


def predicted_ms(S, H, Hkv, D, P, U, args, chunks: int = 1) -> float | None:
    """The cost model's causal fwd+bwd time of the split (one node of P GPUs), if it applies."""
    try:
        return round(cost_model.estimate(seqlen=S, heads=H, kv_heads=Hkv, head_dim=D, nodes=1, gpus_per_node=P,
                                         ulysses=U, tflops=args.model_tflops, nvlink_gbs=args.nvlink_gbs,
                                         net_gbs=args.nvlink_gbs, chunks=chunks).total_ms, 3)
    except ValueError:
        return None


def init_nccl() -> tuple[int, int, str]:
    """This rank's GPU and the NCCL process group under torchrun: (world size, rank, GPU name)."""
    local = int(os.environ.get("LOCAL_RANK", 0))
    torch.cuda.set_device(local)
    os.environ.setdefault("TORCH_NCCL_HIGH_PRIORITY", "1")  # as launch/train.py; README, "Performance"
    dist.init_process_group("nccl", device_id=torch.device("cuda", local))
    gpu = torch.cuda.get_device_name().replace("NVIDIA ", "").replace(" ", "_")
    return dist.get_world_size(), dist.get_rank(), gpu


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seqlens", nargs="+", default=["32k", "128k"])
    ap.add_argument("--layouts", nargs="+", default=["contiguous", "striped", "zigzag"])
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, nargs="+", default=[32, 8])
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--causal", choices=["both", "causal", "full"], default="both")
    ap.add_argument("--modes", nargs="+", default=["fwd", "fwdbwd"], choices=["fwd", "fwdbwd"])
    ap.add_argument("--impls", nargs="+", default=["ringflash", "torch_cp_flash", "torch_cp_cudnn", "single_gpu"],
                    choices=["ringflash", "ringflash_local", "torch_cp_flash", "torch_cp_cudnn", "single_gpu"])
    ap.add_argument("--engines", nargs="+", default=["triton"], choices=ENGINES,
                    help="local engines of the ringflash rows")
    ap.add_argument("--last-hop-parts", type=int, nargs="+", default=[DEFAULT_LAST_HOP_PARTS],
                    help="ringflash.ring.LAST_HOP_PARTS for the SDPA engines' rows (1: the last "
                         "dK/dV hop in one message); several values give one row each")
    ap.add_argument("--head-start-us", type=float, nargs="+", default=[DEFAULT_HEAD_START_US],
                    help="ringflash.ring.HEAD_START_US for the SDPA engines' rows (0: no head start "
                         "for the transfers); several values give one row each, and then apply on "
                         "any number of ranks (the library's default starts at HEAD_START_MIN_RANKS)")
    ap.add_argument("--transports", nargs="+", default=["nccl"], choices=list(comm.TRANSPORTS),
                    help="ringflash.comm.TRANSPORT of the ringflash rows; several values give one row each")
    ap.add_argument("--ce-signals", nargs="+", default=[DEFAULT_CE_SIGNALS], choices=["stream", "kernel"],
                    help="ringflash.comm.COPY_ENGINE_SIGNALS of the copy-engine rows; several values "
                         "give one row each")
    ap.add_argument("--cp-rotate", default="allgather", choices=["allgather", "alltoall"],
                    help="torch CP's K/V exchange (set_rotate_method; torch's default: allgather)")
    ap.add_argument("--host-lead-us", type=float, default=DEFAULT_HOST_LEAD_US,
                    help="GPU spin before each timed call so the host queues ahead (0: off)")
    ap.add_argument("--ulysses", type=int, nargs="+", default=[1],
                    help="Ulysses sizes U: the ringflash rows over P/U ring positions x U (1: the plain ring)")
    ap.add_argument("--ulysses-chunks", type=int, nargs="+", default=[1],
                    help="HybridGroup(chunks=) for each U > 1")
    ap.add_argument("--model-tflops", type=float, default=400.0,
                    help="the cost model's local fwd+bwd rate per GPU (TFLOP/s) for predicted_ms")
    ap.add_argument("--nvlink-gbs", type=float, default=260.0,
                    help="the cost model's NVLink bandwidth per GPU and direction (GB/s)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--out", default=None, help="append JSON lines here (rank 0)")
    args = ap.parse_args()
    global HOST_LEAD_US
    HOST_LEAD_US = args.host_lead_us

    P, rank, gpu = init_nccl()
    if len(args.head_start_us) > 1:  # an A/B of the head start: on this many ranks too
        ring_mod.HEAD_START_MIN_RANKS = 1
    env = nccl_env()
    causals = {"both": [True, False], "causal": [True], "full": [False]}[args.causal]
    hybrids = hybrid_groups(P, rank, args.ulysses)
    splits = [(1, 1)] * (1 in args.ulysses) + [(U, C) for U in args.ulysses if U > 1 for C in args.ulysses_chunks]

    rows = []
    for S in map(parse_size, args.seqlens):
        for Hkv in args.kv_heads:
            for causal in causals:
                for mode in args.modes:
                    runs = []
                    for impl in ("ringflash", "ringflash_local"):
                        if impl not in args.impls:
                            continue
                        for eng in args.engines:
                            # the last-hop cut only changes the SDPA engines' backward
                            sdpa = eng in ("cudnn", "sdpa_flash")
                            parts = args.last_hop_parts if sdpa and mode == "fwdbwd" else [None]
                            starts = args.head_start_us if eng in HEAD_START_ENGINES else [None]
                            transports = [(tr, sig) for tr in (args.transports if impl == "ringflash" else ["nccl"])
                                          for sig in (args.ce_signals if tr == "copy_engine" else [None])]
                            runs += [(impl, lay, eng, (n, us, tr, sig, U, C), lambda lay=lay, eng=eng, n=n, us=us, impl=impl, tr=tr, sig=sig, U=U, C=C: bench_ringflash(
                                S, args.heads, Hkv, args.head_dim, causal, mode, lay, args, eng, n, us,
                                local=impl == "ringflash_local", transport=tr, ce_signals=sig,
                                group=HybridGroup(*hybrids[U], chunks=C) if U > 1 else None))
                                for lay in args.layouts for n in parts for us in starts for tr, sig in transports
                                for U, C in splits]
                    for backend in ("flash", "cudnn"):
                        if f"torch_cp_{backend}" in args.impls:
                            runs.append((f"torch_cp_{backend}", "zigzag" if causal else "contiguous", backend, None,
                                         lambda b=backend: bench_torch_cp(S, args.heads, Hkv, args.head_dim, causal, mode, b, args)))
                    if "single_gpu" in args.impls:
                        runs += [("single_gpu", "-", eng, None, lambda eng=eng: bench_single(
                            S, args.heads, Hkv, args.head_dim, causal, mode, args, eng))
                            for eng in args.engines if eng not in TRITON_VARIANTS]
                    for impl, lay, engine, parts, run in runs:
                        row = dict(impl=impl, engine=engine,
                                   gpu=gpu, world=P, layout=lay, S=S, H=args.heads, Hkv=Hkv, D=args.head_dim,
                                   causal=causal, mode=mode)
                        if env:
                            row["nccl_env"] = env
                        row["host_lead_us"] = HOST_LEAD_US
                        if impl.startswith("torch_cp"):
                            row["cp_rotate"] = args.cp_rotate
                        n, us, tr, sig, U, C = parts if parts is not None else (None,) * 6
                        if U is not None and args.ulysses != [1]:
                            row.update(ulysses=U, ring=P // U)
                            if U > 1:
                                row["chunks"] = C
                            if causal and mode == "fwdbwd":
                                row["predicted_ms"] = predicted_ms(S, args.heads, Hkv, args.head_dim, P, U, args, C)
                        if tr is not None and args.transports != ["nccl"]:
                            row["transport"] = tr
                        if sig is not None:
                            row["ce_signals"] = sig
                        if n is not None:
                            row["last_hop_parts"] = n
                        if us is not None:  # what the ring applied
                            row["head_start_us"] = us if P >= ring_mod.HEAD_START_MIN_RANKS else 0.0
                        with result_row(row, rows, rank, args.out):
                            ms, mem = run()
                            if impl == "single_gpu":  # one GPU doing S/P tokens of full attention
                                tf = flops(S // P, args.heads, args.head_dim, causal, mode) / (ms * 1e-3) / 1e12
                                row["S_per_gpu"] = S // P
                            else:
                                tf = flops(S, args.heads, args.head_dim, causal, mode) / P / (ms * 1e-3) / 1e12
                            row.update(ms=round(ms, 3), tflops_per_gpu=round(tf, 1), peak_mem_gib=round(mem, 2))
                            if tr == "copy_engine":
                                row["workspace_gib"] = round(workspace_gib(), 2)

    if rank == 0:
        print(f"\n{'impl':16s} {'engine':7s} {'layout':11s} {'S':>7s} {'Hkv':>4s} {'causal':>6s} {'mode':>7s} {'ms':>9s} {'TFLOP/s/GPU':>11s} {'GiB':>6s}")
        for r in rows:
            if "ulysses" in r:  # layout:RxU(/chunks)
                r = dict(r, layout=f"{r['layout']}:{r['ring']}x{r['ulysses']}" + (f"/{r['chunks']}" if r.get("chunks", 1) > 1 else ""))
            if "last_hop_parts" in r:
                r = dict(r, layout=f"{r['layout']}/{r['last_hop_parts']}")  # layout/last-hop parts
            if "head_start_us" in r:
                r = dict(r, layout=f"{r['layout']}+{r['head_start_us']:g}")  # layout+head start (us)
            if r.get("transport") == "copy_engine":  # layout@ce: the copy-engine transport (/signals)
                r = dict(r, layout=f"{r['layout']}@ce" + (f"/{r['ce_signals'][0]}" if "ce_signals" in r else ""))
            if "error" in r:
                print(f"{r['impl']:16s} {r['engine']:7s} {r['layout']:11s} {r['S']:7d} {r['Hkv']:4d} {str(r['causal']):>6s} {r['mode']:>7s}  error: {r['error'][:60]}")
            else:
                print(f"{r['impl']:16s} {r['engine']:7s} {r['layout']:11s} {r['S']:7d} {r['Hkv']:4d} {str(r['causal']):>6s} {r['mode']:>7s} {r['ms']:9.2f} {r['tflops_per_gpu']:11.1f} {r['peak_mem_gib'] + r.get('workspace_gib', 0):6.2f}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
