"""torch.compile through ring attention: the custom op, no graph breaks, the same numbers as eager.

Ring attention is registered as ``torch.ops.ringflash.ring_attention`` (and its backward op), so
dynamo keeps it in the graph. Checked here: the op's registration (``torch.library.opcheck``:
schema, fake tensors, autograd, AOT dispatch), ``fullgraph=True`` on two gloo ranks with the
reference backend (forward and backward equal eager to float64 rounding), inductor in one
process, and the eager fallback for a layout the op cannot carry.
"""

from __future__ import annotations

import pytest
import torch

from common import pack, rel, unpack
from distributed import spawn
from ringflash import MultiheadAttention, get_layout, ring_attention
from ringflash.layout import Striped


@pytest.mark.parametrize("layout,stripe", [("striped", 1), ("striped", 2), ("zigzag", 1), ("contiguous", 1)])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_op_registration(layout, stripe, causal, dtype):
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 16, 4, 32, generator=g, dtype=dtype, requires_grad=True)
    k = torch.randn(2, 16, 2, 32, generator=g, dtype=dtype, requires_grad=True)
    v = torch.randn(2, 16, 2, 32, generator=g, dtype=dtype, requires_grad=True)
    args = (causal, 0.25, layout, stripe, "", "reference")
    torch.library.opcheck(torch.ops.ringflash.ring_attention.default, (q, k, v, *args))
    out, lse = torch.ops.ringflash.ring_attention(q, k, v, *args)
    dout = torch.randn(out.shape, generator=g, dtype=dtype)
    detached = [t.detach() for t in (q, k, v, out, lse)]
    torch.library.opcheck(torch.ops.ringflash.ring_attention_backward.default, (dout, *detached, *args))


def _ranks(rank, world_size, seed):
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(seed)
    results = {}
    for layout in ("striped", "zigzag"):
        lay = get_layout(layout)
        S = 8 * world_size
        full = [torch.randn(2, S, h, 16, generator=g, dtype=torch.float64) for h in (4, 2, 2, 4)]
        q, k, v, dout = (lay.shard(x, rank=rank, world_size=world_size) for x in full)

        def attn(q, k, v):
            return ring_attention(q, k, v, causal=True, layout=layout, backend="reference")

        def run(fn):
            leaves = [x.clone().requires_grad_() for x in (q, k, v)]
            out = fn(*leaves)
            out.backward(dout)
            return [out.detach()] + [x.grad for x in leaves]

        eager = run(attn)
        compiled = run(torch.compile(attn, backend="aot_eager", fullgraph=True))
        breaks = torch._dynamo.explain(attn)(q, k, v).graph_break_count
        results[layout] = ([rel(c, e) for c, e in zip(compiled, eager)], breaks)

    # A multi-head layer (projections, rotary from global positions, the ring) as one graph.
    torch.manual_seed(seed)
    mha = MultiheadAttention(32, 4, num_kv_heads=2, layout="striped").double()
    x = torch.randn(2, 8, 32, generator=g, dtype=torch.float64)
    rotary = mha.rotary(8, x.device, x.dtype)  # host-side tables: looked up outside the graph
    eager = mha(x, rotary=rotary)
    compiled = torch.compile(mha, backend="aot_eager", fullgraph=True)(x, rotary=rotary)
    results["mha"] = ([rel(compiled, eager)], 0)

    # A layout the op cannot carry runs eagerly, across a graph break, and is still right.
    class Wide(Striped):
        pass

    lay = Wide(stripe=2)
    full = [torch.randn(1, 4 * world_size, 2, 16, generator=g, dtype=torch.float64) for _ in range(3)]
    q, k, v = (lay.shard(x, rank=rank, world_size=world_size) for x in full)
    fn = lambda q, k, v: ring_attention(q, k, v, causal=True, layout=lay, backend="reference")  # noqa: E731
    results["subclass"] = ([rel(torch.compile(fn, backend="aot_eager")(q, k, v), fn(q, k, v))], None)
    return pack(results)


def test_compiled_ring_matches_eager_without_graph_breaks():
    for rank, data in enumerate(spawn(_ranks, 2, 11, timeout=600)):
        results = unpack(data)
        for name in ("striped", "zigzag", "mha"):
            errors, breaks = results[name]
            assert breaks == 0, (rank, name, breaks)
            assert all(e < 1e-12 for e in errors), (rank, name, errors)
        errors, _ = results["subclass"]
        assert errors[0] < 1e-12, (rank, errors)


def test_inductor_single_process():
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(5)
    mha = MultiheadAttention(32, 4, num_kv_heads=1, layout="zigzag")
    x = torch.randn(1, 16, 32, generator=g, requires_grad=True)
    rotary = mha.rotary(16, x.device, x.dtype)
    eager = mha(x, rotary=rotary)
    eager.sum().backward()
    dx, x.grad = x.grad, None
    compiled = torch.compile(mha, fullgraph=True)(x, rotary=rotary)
    compiled.sum().backward()
    assert rel(compiled, eager) < 1e-5 and rel(x.grad, dx) < 1e-5
