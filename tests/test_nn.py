"""MultiheadAttention and RingAttention on shards against the same module on the full sequence.

Each world size is spawned once (gloo, reference backend): every rank runs the grid below on
its shards and rank 0 sends back the gathered outputs, input gradients and the parameter
gradients summed over the ranks. The oracle is the same module, with the same weights, run
in this process without any process group over the full sequence: in float64 the sharded
result must match to rounding; in bfloat16 it must be within 2x of the error of the same
module run in bfloat16 on the full sequence (both against float64).
"""

from __future__ import annotations

import copy
import itertools
import math
import random

import pytest
import torch
import torch.distributed as dist

from common import rel, pack, unpack
from distributed import spawn
from ringflash import MultiheadAttention, RingAttention, get_layout, reference
from ringflash.nn import apply_rotary, rotary_tables

WORLD_SIZES = [2, 4]
LAYOUTS = ["contiguous", "striped", "zigzag"]
HEADS = [(4, 4), (4, 2), (4, 1)]  # (query heads, key/value heads): MHA, GQA, MQA
DTYPES = ["float64", "bfloat16"]
BATCH, DIM, LOCAL_SEQLEN = 2, 32, 4

CASES = list(itertools.product(LAYOUTS, HEADS, DTYPES))
NAMES = ["out", "dx"]  # then one entry per parameter




def _module(case_seed: int, heads: int, heads_kv: int, layout, group=None) -> MultiheadAttention:
    torch.manual_seed(case_seed)  # the same weights on every rank and in the oracle
    return MultiheadAttention(
        DIM, heads, num_kv_heads=heads_kv, layout=layout, bias=heads == heads_kv, rope_base=100.0, group=group
    )


def _data(case_seed: int, seqlen: int):
    g = torch.Generator().manual_seed(case_seed + 1)
    x = torch.randn(BATCH, seqlen, DIM, generator=g, dtype=torch.float64)
    dout = torch.randn(BATCH, seqlen, DIM, generator=g, dtype=torch.float64)
    return x, dout


def _run_full(mha: MultiheadAttention, x, dout, dtype):
    """The module over the full sequence, no process group: output, dx and parameter grads."""
    mha = mha.to(dtype)
    x = x.detach().to(dtype).requires_grad_()
    out = mha(x)
    out.backward(dout.to(dtype))
    return [out.detach(), x.grad] + [p.grad for p in mha.parameters()]


def _run_sharded(mha, x, dout, dtype, layout, rank, world_size, group=None, rotary=None):
    """This rank's shards through the module; full output and dx, parameter grads summed over ranks."""
    shard = lambda t: layout.shard(t, rank=rank, world_size=world_size)  # noqa: E731
    mha = mha.to(dtype)
    xl = shard(x).to(dtype).requires_grad_()
    out = mha(xl, rotary=rotary)
    out.backward(shard(dout).to(dtype))
    full = [layout.unshard(t.double(), group=group) for t in (out.detach(), xl.grad)]
    grads = []
    for p in mha.parameters():
        g = p.grad.double()
        dist.all_reduce(g, group=group)  # each rank holds its tokens' share of the gradient
        grads.append(g)
    return full + grads


def _grid(rank, world_size, seed):
    results = {}
    seqlen = LOCAL_SEQLEN * world_size
    for i, (layout_name, (h, hkv), dtype_name) in enumerate(CASES):
        case_seed = seed + 100 * i
        layout = get_layout(layout_name)
        x, dout = _data(case_seed, seqlen)
        got = _run_sharded(_module(case_seed, h, hkv, layout), x, dout, getattr(torch, dtype_name), layout, rank, world_size)
        results[(layout_name, h, hkv, dtype_name)] = got
        if dtype_name == "float64":
            # Negative control: the same shards with rotary angles from *local* positions.
            mha = _module(case_seed, h, hkv, layout)
            local = rotary_tables(torch.arange(LOCAL_SEQLEN), mha.head_dim, mha.rope_base, dtype=torch.float64)
            results[("local-positions", layout_name, h, hkv)] = _run_sharded(
                mha, x, dout, torch.float64, layout, rank, world_size, rotary=local
            )[0]

    # A 1-D DeviceMesh as the group.
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("cp",))
    case_seed, layout = seed + 10_000, get_layout("zigzag")
    x, dout = _data(case_seed, seqlen)
    results[("mesh",)] = _run_sharded(
        _module(case_seed, 4, 2, layout, group=mesh), x, dout, torch.float64, layout, rank, world_size,
        group=mesh.get_group(),
    )

    # Misuse: a shard this layout cannot produce over this group fails on every rank, before
    # any communication (a hang here would time the spawn out).
    errors = {}
    for name, local_len in (("zigzag", 3), ("striped", 0)):
        mha = _module(seed, 4, 2, name)
        try:
            mha(torch.randn(1, local_len, DIM))
        except ValueError as e:
            errors[name] = str(e)
    results[("errors",)] = errors
    return pack(results if rank == 0 else {("errors",): errors})


_SEED = random.randrange(1 << 30)  # fresh inputs every run; printed on failure
_RUNS: dict[int, dict] = {}


def grid(world_size: int) -> dict:
    if world_size not in _RUNS:
        outs = spawn(_grid, world_size, _SEED, timeout=240)
        _RUNS[world_size] = unpack(outs[0])
        _RUNS[world_size][("errors by rank",)] = [unpack(o)[("errors",)] for o in outs]
    return _RUNS[world_size]


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@pytest.mark.parametrize("layout,heads,dtype", CASES, ids=[f"{l}-{h}q{k}kv-{d}" for l, (h, k), d in CASES])
def test_mha_sharded_matches_full_sequence(world_size, layout, heads, dtype):
    h, hkv = heads
    i = CASES.index((layout, heads, dtype))
    case_seed = _SEED + 100 * i
    x, dout = _data(case_seed, LOCAL_SEQLEN * world_size)
    ref = _run_full(_module(case_seed, h, hkv, layout), x, dout, torch.float64)
    got = grid(world_size)[(layout, h, hkv, dtype)]
    names = NAMES + [n for n, _ in _module(case_seed, h, hkv, layout).named_parameters()]
    errs = {n: rel(g, r) for n, g, r in zip(names, got, ref)}
    assert len(got) == len(ref) == len(names)
    if dtype == "float64":
        assert all(e < 1e-10 for e in errs.values()), f"seed {_SEED}: {errs}"
    else:
        single = _run_full(_module(case_seed, h, hkv, layout), x, dout, torch.bfloat16)
        for n, s, r in zip(names, single, ref):
            bar = rel(s, r)
            # The floor covers a tensor that bf16 happens to round almost exactly.
            assert errs[n] <= 2 * bar + 1e-5, f"{n}: sharded {errs[n]:.2e} vs full bf16 {bar:.2e}; seed {_SEED}"


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_rotary_uses_global_positions(world_size, layout):
    """With local positions (0..L-1 on every rank) the sharded output would be wrong."""
    h, hkv = 4, 2
    i = CASES.index((layout, (h, hkv), "float64"))
    case_seed = _SEED + 100 * i
    x, dout = _data(case_seed, LOCAL_SEQLEN * world_size)
    ref = _run_full(_module(case_seed, h, hkv, layout), x, dout, torch.float64)
    assert rel(grid(world_size)[(layout, h, hkv, "float64")][0], ref[0]) < 1e-10
    assert rel(grid(world_size)[("local-positions", layout, h, hkv)], ref[0]) > 1e-2


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_device_mesh_group(world_size):
    case_seed = _SEED + 10_000
    x, dout = _data(case_seed, LOCAL_SEQLEN * world_size)
    ref = _run_full(_module(case_seed, 4, 2, "zigzag"), x, dout, torch.float64)
    errs = [rel(g, r) for g, r in zip(grid(world_size)[("mesh",)], ref)]
    assert all(e < 1e-10 for e in errs), (_SEED, errs)


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_shard_length_errors_on_every_rank(world_size):
    by_rank = grid(world_size)[("errors by rank",)]
    assert len(by_rank) == world_size
    for errors in by_rank:
        assert "zigzag" in errors and "multiple of 2" in errors["zigzag"], errors
        assert "striped" in errors and "holds no tokens" in errors["striped"], errors


# -- one process, no process group -----------------------------------------------------------


def _manual_mha(mha: MultiheadAttention, x: torch.Tensor) -> torch.Tensor:
    """The block written out: projections, rotary by explicit 2-D rotations, full attention."""
    H, Hkv, D = mha.num_heads, mha.num_kv_heads, mha.head_dim
    q, k, v = mha.qkv(x).split([H * D, Hkv * D, Hkv * D], dim=-1)
    q, k, v = (t.reshape(*x.shape[:2], -1, D) for t in (q, k, v))

    def rotate(t):  # pair i rotates (t[i], t[i + D/2]) by angle pos * base**(-2i/D)
        pos = torch.arange(t.shape[1], dtype=torch.float64)
        theta = pos[:, None] * mha.rope_base ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)
        c, s = theta.cos()[None, :, None, :], theta.sin()[None, :, None, :]
        a, b = t[..., : D // 2], t[..., D // 2:]
        return torch.cat([a * c - b * s, a * s + b * c], dim=-1)

    out, _ = reference.attention(rotate(q), rotate(k), v, causal=True)
    return mha.out(out.reshape(*x.shape[:2], H * D))


@pytest.mark.parametrize("heads", HEADS, ids=[f"{h}q{k}kv" for h, k in HEADS])
def test_single_process_matches_manual(heads):
    h, hkv = heads
    torch.manual_seed(0)
    mha = MultiheadAttention(DIM, h, num_kv_heads=hkv, layout="zigzag").double()
    x = torch.randn(BATCH, 10, DIM, dtype=torch.float64)
    assert rel(mha(x), _manual_mha(mha, x)) < 1e-12


def test_rotary_is_relative():
    """q . k after rotation depends only on the distance between the two positions."""
    D = 16
    g = torch.Generator().manual_seed(1)
    q, k = (torch.randn(1, 1, 1, D, generator=g, dtype=torch.float64) for _ in range(2))

    def score(pq, pk):
        cq, sq = rotary_tables(torch.tensor([pq]), D, dtype=torch.float64)
        ck, sk = rotary_tables(torch.tensor([pk]), D, dtype=torch.float64)
        return (apply_rotary(q, cq, sq) * apply_rotary(k, ck, sk)).sum().item()

    assert math.isclose(score(7, 3), score(1004, 1000), rel_tol=1e-9)
    assert not math.isclose(score(7, 3), score(7, 4), rel_tol=1e-3)


def test_rotary_cache_and_dtypes():
    mha = MultiheadAttention(DIM, 4)
    cos, sin = mha.rotary(6, "cpu", torch.bfloat16)
    assert cos.dtype == torch.float32 and cos.shape == (6, DIM // 8)
    assert mha.rotary(6, "cpu", torch.bfloat16)[0] is cos  # cached
    assert mha.rotary(6, "cpu", torch.float64)[0].dtype == torch.float64
    with torch.inference_mode():
        mha(torch.randn(1, 8, DIM))
    x = torch.randn(1, 8, DIM, requires_grad=True)
    mha(x).sum().backward()  # tables first built under inference_mode still work with autograd
    fresh = copy.deepcopy(mha)
    fresh._rotary_cache.clear()  # tables built with autograd on
    x2 = x.detach().clone().requires_grad_()
    fresh(x2).sum().backward()
    assert torch.allclose(x.grad, x2.grad, rtol=1e-6, atol=1e-7)


def test_autocast_does_not_lower_attention_precision():
    """Autocast leaves the attention alone: float32 q, k, v stay float32 end to end."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 64, 4, 16, generator=g) for _ in range(3))
    ref, _ = reference.attention(q.double(), k.double(), v.double(), causal=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = RingAttention()(q, k, v)
    assert out.dtype == torch.float32 and rel(out, ref) < 1e-5


def test_ring_attention_module_single_process():
    g = torch.Generator().manual_seed(2)
    q = torch.randn(2, 8, 4, 16, generator=g, dtype=torch.float64)
    k, v = (torch.randn(2, 8, 2, 16, generator=g, dtype=torch.float64) for _ in range(2))
    ref, _ = reference.attention(q, k, v, causal=True)
    assert rel(RingAttention()(q, k, v), ref) < 1e-12
    ref, _ = reference.attention(q, k, v, causal=False, softmax_scale=0.3)
    assert rel(RingAttention(causal=False, softmax_scale=0.3, layout="zigzag")(q, k, v), ref) < 1e-12


def test_no_rope_and_bias():
    torch.manual_seed(0)
    mha = MultiheadAttention(DIM, 4, num_kv_heads=2, rope=False, bias=True).double()
    x = torch.randn(1, 6, DIM, dtype=torch.float64)
    H, D = 4, 8
    q, k, v = mha.qkv(x).split([H * D, 2 * D, 2 * D], dim=-1)
    out, _ = reference.attention(q.reshape(1, 6, H, D), k.reshape(1, 6, 2, D), v.reshape(1, 6, 2, D), causal=True)
    assert rel(mha(x), mha.out(out.reshape(1, 6, H * D))) < 1e-12
    assert mha.qkv.bias is not None and mha.out.bias is not None


@pytest.mark.parametrize("kwargs,match", [
    (dict(dim=30, num_heads=4), "divisible by num_heads"),
    (dict(dim=32, num_heads=4, num_kv_heads=3), "divisible by num_kv_heads"),
    (dict(dim=12, num_heads=4), "even head_dim"),
    (dict(dim=32, num_heads=0), "positive"),
    (dict(dim=32, num_heads=4, layout="diagonal"), "unknown layout"),
    (dict(dim=0, num_heads=4), "dim must be positive"),
    (dict(dim=-32, num_heads=4), "dim must be positive"),
    # base**(-2i/D) of a base <= 0 made every output NaN
    (dict(dim=32, num_heads=4, rope_base=0.0), "rope_base"),
    (dict(dim=32, num_heads=4, rope_base=-10000.0), "rope_base"),
])
def test_constructor_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MultiheadAttention(**kwargs)


def test_extra_repr_shows_the_settings():
    assert "softmax_scale=0.3" in repr(RingAttention(causal=False, softmax_scale=0.3))
    assert "softmax_scale" not in repr(RingAttention())
    text = repr(MultiheadAttention(DIM, 4, num_kv_heads=2, rope_base=500.0, layout="zigzag"))
    assert "num_kv_heads=2" in text and "rope_base=500.0" in text and "Zigzag()" in text


def test_forward_errors():
    mha = MultiheadAttention(DIM, 4, layout="zigzag")
    with pytest.raises(ValueError, match="3-D"):
        mha(torch.randn(8, DIM))
    with pytest.raises(ValueError, match="3-D"):
        mha(torch.randn(1, 1, 8, DIM))
    with pytest.raises(ValueError, match="dim=32"):
        mha(torch.randn(1, 8, 16))
    assert mha(torch.randn(1, 7, DIM)).shape == (1, 7, DIM)  # one process: any length, any layout
    with pytest.raises(ValueError, match="rotary tables"):
        mha(torch.randn(1, 8, DIM), rotary=mha.rotary(6, "cpu"))
    with pytest.raises(ValueError, match="not initialised"):
        MultiheadAttention(DIM, 4, group=object())(torch.randn(1, 8, DIM))
    with pytest.raises(ValueError, match="4-D"):
        RingAttention()(torch.randn(8, 4, 16), torch.randn(8, 4, 16), torch.randn(8, 4, 16))
