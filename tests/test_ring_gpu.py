"""Ring attention on several GPUs (NCCL, Triton kernels) against float64 attention.

Run under torchrun, one process per GPU:

    torchrun --nproc-per-node 4 -m pytest tests/test_ring_gpu.py -m multigpu -q

Every rank runs the same tests in the same order. The bar in bfloat16: the ring's error
against float64 is within 2x of the single-GPU kernel's error on the whole sequence.
Set RINGFLASH_REPORT=path to append one JSON line per case with the errors.
"""

from __future__ import annotations

import json
import os
import zlib

import pytest
import torch
import torch.distributed as dist

from ringflash import HybridGroup, flash_attention, get_layout, reference, ring_attention

pytestmark = pytest.mark.multigpu

if "WORLD_SIZE" not in os.environ or not torch.cuda.is_available():
    pytest.skip("run under torchrun on CUDA GPUs", allow_module_level=True)


@pytest.fixture(scope="module", autouse=True)
def nccl():
    # One process group for the whole session (tests/conftest.py destroys it at the end):
    # re-creating it between modules races with ranks still finishing the previous module.
    local = int(os.environ["LOCAL_RANK"])
    torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group("nccl", device_id=torch.device("cuda", local))
    yield
    dist.barrier()


def rel(x, ref):
    return ((x.double() - ref.double()).norm() / ref.double().norm()).item()


def _case(seqlen, heads, heads_kv, head_dim, causal, layout, group=None, seed=0, engine="triton", batch=1):
    if isinstance(group, HybridGroup):
        P, r = group.size, group.rank
    else:
        P, r = dist.get_world_size(group), dist.get_rank(group)
    g = torch.Generator(device="cuda").manual_seed(seed)
    mk = lambda h: torch.randn(batch, seqlen, h, head_dim, device="cuda", dtype=torch.float64, generator=g)  # noqa: E731
    q, k, v, dout = mk(heads), mk(heads_kv), mk(heads_kv), mk(heads)

    def grads(fn, dtype):
        qq, kk, vv = (x.detach().to(dtype).requires_grad_() for x in (q, k, v))
        out = fn(qq, kk, vv)
        out.backward(dout.to(dtype))
        return [out.detach(), qq.grad, kk.grad, vv.grad]

    ref = grads(lambda a, b, c: reference.attention(a, b, c, causal=causal)[0], torch.float64)
    # The bar: the same engine on one GPU over the whole sequence.
    single = grads(lambda a, b, c: flash_attention(a, b, c, causal=causal, backend=engine), torch.bfloat16)

    lay = get_layout(layout)
    shard = lambda x: lay.shard(x, rank=r, world_size=P)  # noqa: E731
    ql, kl, vl = (shard(x).to(torch.bfloat16).requires_grad_() for x in (q, k, v))
    out = ring_attention(ql, kl, vl, causal=causal, layout=lay, group=group, backend=engine)
    out.backward(shard(dout).to(torch.bfloat16))
    ring = [lay.unshard(x, group=group) for x in (out.detach(), ql.grad, kl.grad, vl.grad)]

    errs = {n: (rel(a, b), rel(s, b)) for n, a, s, b in zip(("out", "dq", "dk", "dv"), ring, single, ref)}
    report = os.environ.get("RINGFLASH_REPORT")
    if report and dist.get_rank() == 0:
        with open(report, "a") as f:
            f.write(json.dumps(dict(engine=engine, world=P, batch=batch, seqlen=seqlen, heads=heads, heads_kv=heads_kv, head_dim=head_dim,
                                    causal=causal, layout=layout, errors={n: {"ring": e[0], "single": e[1]} for n, e in errs.items()})) + "\n")
    for n, (e_ring, e_single) in errs.items():
        assert e_ring <= 2 * e_single, f"{n}: ring {e_ring:.3e} vs single-GPU {e_single:.3e}"


_HYBRIDS: dict = {}


def _hybrid_groups(U: int):
    """(ring group, Ulysses group) of this rank for U consecutive ranks per Ulysses group, made
    once per U (every rank creates every group, in the same order)."""
    if U not in _HYBRIDS:
        P, rank = dist.get_world_size(), dist.get_rank()
        rings = [dist.new_group([r * U + u for r in range(P // U)]) for u in range(U)]
        ulysses = [dist.new_group([r * U + u for u in range(U)]) for r in range(P // U)]
        _HYBRIDS[U] = (rings[rank % U], ulysses[rank // U])
    return _HYBRIDS[U]


@pytest.mark.parametrize("chunks", [1, 2])
@pytest.mark.parametrize("layout,causal", [("striped", True), ("zigzag", True), ("contiguous", False)])
def test_ulysses_by_ring_bf16_matches_float64(layout, causal, chunks):
    """Every split of the GPUs into ring x Ulysses (U > 1 dividing them) over NCCL, the heads in
    one chunk or pipelined in two (16 query / 8 K/V heads: 2 chunks up to U = 4)."""
    P = dist.get_world_size()
    for U in [u for u in range(2, P + 1) if P % u == 0]:
        hybrid = HybridGroup(*_hybrid_groups(U), chunks=chunks)
        _case(1024 * P, 16, 8, 128, causal, layout, group=hybrid, seed=100 + U)


@pytest.mark.parametrize("layout", ["contiguous", "striped", "zigzag"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("heads,heads_kv", [(8, 8), (8, 2)])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_ring_bf16_matches_float64(layout, causal, heads, heads_kv, head_dim):
    # The seed must be the same on every rank (Python's str hash differs between processes).
    _case(2048, heads, heads_kv, head_dim, causal, layout, seed=zlib.crc32(repr((layout, causal, heads_kv, head_dim)).encode()))


@pytest.mark.parametrize("layout", ["striped", "zigzag"])
def test_odd_local_lengths(layout):
    # 1000 tokens per rank (1000 / 2 per zigzag chunk): no block multiple anywhere.
    _case(1000 * dist.get_world_size(), 4, 2, 128, True, layout, seed=7)


def test_subgroups():
    """The world as context-parallel groups of 2 (data parallel x context parallel)."""
    world = dist.get_world_size()
    if world % 2:
        pytest.skip("needs an even number of GPUs")
    groups = [dist.new_group([i, i + 1]) for i in range(0, world, 2)]
    group = groups[dist.get_rank() // 2]
    _case(2048, 8, 2, 128, True, "striped", group=group, seed=dist.get_rank() // 2)


@pytest.mark.parametrize("engine", ["cudnn", "sdpa_flash"])
@pytest.mark.parametrize("layout", ["contiguous", "striped", "zigzag"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("heads,heads_kv", [(8, 8), (8, 2)])
def test_sdpa_engines_bf16_match_float64(engine, layout, causal, heads, heads_kv):
    seed = zlib.crc32(repr((engine, layout, causal, heads_kv)).encode())
    _case(2048, heads, heads_kv, 128, causal, layout, seed=seed, engine=engine)


@pytest.mark.parametrize("engine", ["cudnn", "triton"])
@pytest.mark.parametrize("layout", ["striped", "zigzag"])
def test_batch_of_three(engine, layout):
    """B > 1: the SDPA engines send the last step's dK/dV in two messages cut along the batch
    (a batch of one is cut along the keys, as in every test above)."""
    seed = zlib.crc32(repr(("batch", engine, layout)).encode())
    _case(1024, 8, 2, 128, True, layout, seed=seed, engine=engine, batch=3)


def _ring_grads(seqlen, heads, heads_kv, causal, layout, group=None, engine="triton", seed=0, head_dim=128):
    P, r = dist.get_world_size(group), dist.get_rank(group)
    g = torch.Generator(device="cuda").manual_seed(seed)
    lay = get_layout(layout)
    mk = lambda h: lay.shard(torch.randn(1, seqlen, h, head_dim, device="cuda", generator=g), rank=r, world_size=P)  # noqa: E731
    q, k, v, dout = (x.to(torch.bfloat16) for x in (mk(heads), mk(heads_kv), mk(heads_kv), mk(heads)))
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    out = ring_attention(q, k, v, causal=causal, layout=lay, group=group, backend=engine)
    out.backward(dout)
    return [out.detach(), q.grad, k.grad, v.grad]


@pytest.fixture
def transport():
    from ringflash import comm

    saved = comm.TRANSPORT, comm.COPY_ENGINE_SIGNALS
    yield comm
    comm.TRANSPORT, comm.COPY_ENGINE_SIGNALS = saved


@pytest.mark.parametrize("signals", ["kernel", "stream"])
@pytest.mark.parametrize("engine", ["triton", "cudnn"])
@pytest.mark.parametrize("layout", ["contiguous", "striped", "zigzag"])
@pytest.mark.parametrize("causal", [False, True])
def test_copy_engine_transport_matches_nccl(transport, engine, layout, causal, signals):
    """The copy-engine transport moves the same bytes: outputs and gradients are bitwise those
    of the NCCL transport with the (deterministic) Triton engine, and within the cuDNN
    backward's own run-to-run noise with the cuDNN engine; over calls of different sizes (the
    workspace grows, then is reused); with either way of signalling."""
    transport.COPY_ENGINE_SIGNALS = signals
    seed = zlib.crc32(repr(("ce", engine, layout, causal, signals)).encode())
    for seqlen, heads_kv in ((1024 * dist.get_world_size(), 2), (2048 * dist.get_world_size(), 8), (1024 * dist.get_world_size(), 8)):
        transport.TRANSPORT = "nccl"
        want = _ring_grads(seqlen, 8, heads_kv, causal, layout, engine=engine, seed=seed)
        transport.TRANSPORT = "copy_engine"
        got = _ring_grads(seqlen, 8, heads_kv, causal, layout, engine=engine, seed=seed)
        for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
            if engine == "triton":
                assert torch.equal(a, b), f"{name} differs between transports (S={seqlen}, Hkv={heads_kv})"
            else:  # wrong or stale bytes would be O(1) off
                assert rel(a, b) < 1e-2, f"{name}: {rel(a, b):.2e} between transports (S={seqlen}, Hkv={heads_kv})"
    # and against float64, as every NCCL case above
    _case(2048 * dist.get_world_size(), 8, 2, 128, causal, layout, seed=seed, engine=engine)
    dist.barrier()


@pytest.mark.parametrize("signals", ["kernel", "stream"])
def test_copy_engine_transport_subgroups_and_float64_bar(transport, signals):
    """Context-parallel groups of 2 over the copy-engine transport, against float64."""
    world = dist.get_world_size()
    if world % 2:
        pytest.skip("needs an even number of GPUs")
    transport.TRANSPORT, transport.COPY_ENGINE_SIGNALS = "copy_engine", signals
    groups = [dist.new_group([i, i + 1]) for i in range(0, world, 2)]
    group = groups[dist.get_rank() // 2]
    _case(2048, 8, 2, 128, True, "striped", group=group, seed=dist.get_rank() // 2)
    _case(1000 * 2, 4, 2, 128, True, "zigzag", group=group, seed=5)
    dist.barrier()
