"""torch.compile through ring attention: the custom op, no graph breaks, the same numbers as eager.

Ring attention is registered as ``torch.ops.ringflash.ring_attention`` (and its backward op), so
dynamo keeps it in the graph. Checked here: the op's registration (``torch.library.opcheck``:
schema, fake tensors, autograd, AOT dispatch), ``fullgraph=True`` on two gloo ranks with the
reference backend (forward and backward equal float64 attention over the whole sequence),
inductor in one process against the float64 layer, and the eager fallback for a layout the
op cannot carry.
"""

from __future__ import annotations

import copy

import pytest
import torch

from common import pack, rel, unpack
from distributed import spawn
from ringflash import MultiheadAttention, get_layout, reference, ring_attention
from ringflash.layout import Striped


@pytest.mark.parametrize("layout,stripe", [("striped", 1), ("striped", 2), ("zigzag", 1), ("contiguous", 1)])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_op_registration(layout, stripe, causal, dtype):
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 16, 4, 32, generator=g, dtype=dtype, requires_grad=True)
    k = torch.randn(2, 16, 2, 32, generator=g, dtype=dtype, requires_grad=True)
    v = torch.randn(2, 16, 2, 32, generator=g, dtype=dtype, requires_grad=True)
    args = (causal, -1, -1, None, 0.25, layout, stripe, "", "reference")
    torch.library.opcheck(torch.ops.ringflash.ring_attention.default, (q, k, v, *args))
    out, lse = torch.ops.ringflash.ring_attention(q, k, v, *args)
    dout = torch.randn(out.shape, generator=g, dtype=dtype)
    detached = [t.detach() for t in (q, k, v, out, lse)]
    torch.library.opcheck(torch.ops.ringflash.ring_attention_backward.default, (dout, *detached, *args))


def test_op_registration_masks():
    """The op with a window and document boundaries (a host tensor) passes the same checks."""
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 16, h, 32, generator=g, dtype=torch.float64, requires_grad=True) for h in (4, 2, 2))
    args = (True, 5, -1, torch.tensor([0, 3, 4, 16]), 0.25, "striped", 1, "", "reference")
    torch.library.opcheck(torch.ops.ringflash.ring_attention.default, (q, k, v, *args))
    out, lse = torch.ops.ringflash.ring_attention(q, k, v, *args)
    ref, _ = reference.attention(q, k, v, causal=True, softmax_scale=0.25, window=(5, -1), cu_seqlens=[0, 3, 4, 16])
    assert torch.allclose(out, ref, atol=1e-12)
    dout = torch.randn(out.shape, generator=g, dtype=torch.float64)
    detached = [t.detach() for t in (q, k, v, out, lse)]
    torch.library.opcheck(torch.ops.ringflash.ring_attention_backward.default, (dout, *detached, *args))


def _oracle(full, layout, rank, world_size, causal=True, **mask):
    """Float64 attention over the whole sequence: this rank's shard of O, dQ, dK, dV."""
    q, k, v, dout = (x.clone().requires_grad_(i < 3) for i, x in enumerate(full))
    out, _ = reference.attention(q, k, v, causal=causal, **mask)
    out.backward(dout)
    return [layout.shard(t, rank=rank, world_size=world_size) for t in (out.detach(), q.grad, k.grad, v.grad)]


def _mha(seed):
    torch.manual_seed(seed)
    return MultiheadAttention(32, 4, num_kv_heads=2, layout="striped").double()


def _mha_input(seed, world_size):
    return torch.randn(2, 8 * world_size, 32, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)


def _ranks(rank, world_size, seed):
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(seed)
    results = {}
    for layout in ("striped", "zigzag"):
        lay = get_layout(layout)
        S = 8 * world_size
        full = [torch.randn(2, S, h, 16, generator=g, dtype=torch.float64) for h in (4, 2, 2, 4)]
        q, k, v, dout = (lay.shard(x, rank=rank, world_size=world_size) for x in full)
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        attn = torch.compile(lambda q, k, v: ring_attention(q, k, v, causal=True, layout=layout, backend="reference"),
                             backend="aot_eager", fullgraph=True)  # fullgraph: a graph break raises
        out = attn(*leaves)
        out.backward(dout)
        got = [out.detach()] + [x.grad for x in leaves]
        results[layout] = [rel(a, b) for a, b in zip(got, _oracle(full, lay, rank, world_size))]

    # A window and packed documents (boundaries as a host tensor: a graph input, not a constant).
    lay = get_layout("striped")
    S = 8 * world_size
    cu = torch.tensor([0, 1, 5, S - 3, S])
    full = [torch.randn(1, S, h, 16, generator=g, dtype=torch.float64) for h in (4, 2, 2, 4)]
    q, k, v, dout = (lay.shard(x, rank=rank, world_size=world_size) for x in full)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    attn = torch.compile(lambda q, k, v, cu: ring_attention(q, k, v, causal=True, window=(6, -1), cu_seqlens=cu,
                                                            layout=lay, backend="reference"),
                         backend="aot_eager", fullgraph=True)
    out = attn(*leaves, cu)
    out.backward(dout)
    got = [out.detach()] + [x.grad for x in leaves]
    want = _oracle(full, lay, rank, world_size, window=(6, -1), cu_seqlens=cu.tolist())
    results["masked"] = [rel(a, b) for a, b in zip(got, want)]

    # A multi-head layer (projections, rotary from global positions, the ring) as one graph; the
    # parent runs the same layer on the whole sequence in one process.
    mha = _mha(seed)
    x = get_layout("striped").shard(_mha_input(seed, world_size), rank=rank, world_size=world_size)
    rotary = mha.rotary(8, x.device, x.dtype)  # host-side tables: looked up outside the graph
    results["mha"] = torch.compile(mha, backend="aot_eager", fullgraph=True)(x, rotary=rotary).detach()

    # A layout the op cannot carry runs eagerly, across a graph break, and is still right.
    class Wide(Striped):
        pass

    lay = Wide(stripe=2)
    full = [torch.randn(1, 4 * world_size, 2, 16, generator=g, dtype=torch.float64) for _ in range(4)]
    q, k, v, dout = (lay.shard(x, rank=rank, world_size=world_size) for x in full)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out = torch.compile(lambda q, k, v: ring_attention(q, k, v, causal=True, layout=lay, backend="reference"),
                        backend="aot_eager")(*leaves)
    out.backward(dout)
    got = [out.detach()] + [x.grad for x in leaves]
    results["subclass"] = [rel(a, b) for a, b in zip(got, _oracle(full, lay, rank, world_size))]
    return pack(results)


def test_compiled_ring_matches_float64_without_graph_breaks():
    world_size, seed = 2, 11
    with torch.no_grad():
        mha_ref = _mha(seed)(_mha_input(seed, world_size))  # one process, the whole sequence
    for rank, data in enumerate(spawn(_ranks, world_size, seed, timeout=600)):
        results = unpack(data)
        for name in ("striped", "zigzag", "subclass", "masked"):
            assert all(e < 1e-12 for e in results[name]), (rank, name, results[name])
        want = get_layout("striped").shard(mha_ref, rank=rank, world_size=world_size)
        assert rel(results["mha"], want) < 1e-12, rank


def test_inductor_single_process():
    """Inductor, float32, against the same layer run eagerly in float64."""
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(5)
    mha = MultiheadAttention(32, 4, num_kv_heads=1, layout="zigzag")
    x = torch.randn(1, 16, 32, generator=g)
    mha64 = copy.deepcopy(mha).double()
    x64 = x.double().requires_grad_()
    ref = mha64(x64, rotary=mha64.rotary(16, x.device, torch.float64))
    ref.sum().backward()
    x.requires_grad_()
    compiled = torch.compile(mha, fullgraph=True)(x, rotary=mha.rotary(16, x.device, x.dtype))
    compiled.sum().backward()
    assert rel(compiled, ref) < 1e-5 and rel(x.grad, x64.grad) < 1e-5
