"""The SDPA engines' mask decomposition, and the engine logic with plain-PyTorch piece kernels.

The fused cuDNN/flash ops need a GPU (tests/test_sdpa_gpu.py); here each piece runs through
the reference attention, rounded to the input dtype as the fused ops round, so the
decomposition, the merges and the backward bookkeeping are checked against float64 on the CPU.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from common import rel
from distributed import spawn
from ringflash import Striped, get_layout, reference, ring_attention
from ringflash.sdpa import decompose, make_engine

LAYOUTS = ["contiguous", "striped", "zigzag"]


def _mask_from_pieces(pieces, Sq, Sk):
    covered = torch.zeros(Sq, Sk, dtype=torch.int64)
    for p in pieces:
        block = torch.ones(p.q1 - p.q0, p.k1 - p.k0, dtype=torch.int64)
        if p.causal:
            assert p.q1 - p.q0 == p.k1 - p.k0, "causal pieces are square"
            block = torch.tril(block)
        covered[p.q0:p.q1, p.k0:p.k1] += block
    return covered


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 8])
def test_every_ring_step_decomposes_exactly(layout, world_size):
    lay = get_layout(layout)
    local = 2 * 6
    for r, src in itertools.product(range(world_size), repeat=2):
        q_pos = lay.local_positions(local, rank=r, world_size=world_size)
        k_pos = lay.local_positions(local, rank=src, world_size=world_size)
        pieces = decompose(q_pos, k_pos, True)
        assert len(pieces) <= 1, (layout, r, src, pieces)
        want = (q_pos[:, None] >= k_pos[None, :]).long()
        assert torch.equal(_mask_from_pieces(pieces, local, local), want), (layout, r, src, pieces)


@pytest.mark.parametrize("seed", range(20))
def test_any_increasing_positions_decompose_exactly(seed):
    g = torch.Generator().manual_seed(seed)
    Sq, Sk = torch.randint(1, 40, (2,), generator=g).tolist()
    gaps = [torch.randint(1, 4, (n,), generator=g) for n in (Sq, Sk)]
    q_pos, k_pos = (x.cumsum(0) + torch.randint(-5, 5, (1,), generator=g) for x in gaps)
    pieces = decompose(q_pos, k_pos, True, max_pieces=10_000)
    assert torch.equal(_mask_from_pieces(pieces, Sq, Sk), (q_pos[:, None] >= k_pos[None, :]).long())


def test_bottom_right_causal_and_full():
    q_pos, k_pos = reference.default_positions(5, 9)
    assert torch.equal(_mask_from_pieces(decompose(q_pos, k_pos, True), 5, 9), (q_pos[:, None] >= k_pos).long())
    q_pos, k_pos = reference.default_positions(9, 4)  # the first 5 queries see nothing
    assert torch.equal(_mask_from_pieces(decompose(q_pos, k_pos, True), 9, 4), (q_pos[:, None] >= k_pos).long())
    assert len(decompose(torch.arange(7), torch.arange(3), False)) == 1


def test_wide_stripes_are_refused_with_the_engine_that_can():
    lay = Striped(stripe=4)
    q_pos = lay.local_positions(64, rank=1, world_size=2)
    k_pos = lay.local_positions(64, rank=0, world_size=2)
    with pytest.raises(ValueError, match='backend="triton"'):
        decompose(q_pos, k_pos, True)


def _piece_fwd(q, k, v, causal, scale):
    out, lse = reference.forward(q, k, v, causal=causal, softmax_scale=scale)
    return out.to(q.dtype), lse  # the fused ops return O in the input dtype


def _piece_bwd(dout, q, k, v, out, lse, causal, scale):
    delta = reference.backward_delta(out, dout)
    return [g.to(q.dtype) for g in reference.backward(dout, q, k, v, lse, delta, causal=causal, softmax_scale=scale)]


EMULATED = make_engine("emulated", piece_fwd=_piece_fwd, piece_bwd=_piece_bwd)



def _ring_errors(rank, world_size, q, k, v, dout, layout, causal, backend):
    """Ring fwd+bwd in float32 on this rank's shards: errors of out, dq, dk, dv against float64."""
    qq, kk, vv = (x.clone().requires_grad_() for x in (q, k, v))
    ref, _ = reference.attention(qq, kk, vv, causal=causal)
    ref.backward(dout)
    lay = get_layout(layout)
    shard = lambda x: lay.shard(x, rank=rank, world_size=world_size)  # noqa: E731
    ql, kl, vl = (shard(x).float().requires_grad_() for x in (q, k, v))
    out = ring_attention(ql, kl, vl, causal=causal, layout=lay, backend=backend)
    out.backward(shard(dout).float())
    got = [lay.unshard(x) for x in (out.detach(), ql.grad, kl.grad, vl.grad)]
    return [rel(a, b) for a, b in zip(got, (ref, qq.grad, kk.grad, vv.grad))]


def _ring(rank, world_size, seed):
    results = {}
    for i, (layout, causal, (h, hkv)) in enumerate(itertools.product(LAYOUTS, [True, False], [(4, 4), (8, 2)])):
        g = torch.Generator().manual_seed(seed + i)
        S = 8 * world_size
        q = torch.randn(2, S, h, 32, generator=g, dtype=torch.float64)
        k = torch.randn(2, S, hkv, 32, generator=g, dtype=torch.float64)
        v = torch.randn(2, S, hkv, 32, generator=g, dtype=torch.float64)
        dout = torch.randn(2, S, h, 32, generator=g, dtype=torch.float64)
        results[(layout, causal, hkv)] = _ring_errors(rank, world_size, q, k, v, dout, layout, causal, EMULATED)
    return results


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_ring_with_the_engine_logic(world_size):
    for rank, res in enumerate(spawn(_ring, world_size, 4321, timeout=300)):
        for case, errs in res.items():
            assert all(e < 1e-5 for e in errs), (rank, case, errs)


def test_last_step_chunks():
    """The last step's cut: K/V heads, the last chunk a quarter of them (at least one);
    nothing to cut with one K/V head or when turned off."""
    from ringflash.ring import _last_chunks

    assert _last_chunks(32, 4) == [(0, 24), (24, 32)]
    assert _last_chunks(8, 4) == [(0, 6), (6, 8)]
    assert _last_chunks(2, 4) == [(0, 1), (1, 2)]
    assert _last_chunks(6, 3) == [(0, 4), (4, 6)]
    assert _last_chunks(1, 4) == [(0, 1)]
    assert _last_chunks(32, 1) == [(0, 32)]


def _last_step_in_chunks(rank, world_size, seed, parts):
    """Ring fwd+bwd with the emulated SDPA engine, batches of 1 and 3, GQA and MQA: errors
    against float64, and the (query heads, K/V heads) of every backward call of the engine."""
    import ringflash.ring as ring_mod

    ring_mod.LAST_HOP_PARTS = parts
    seen = []

    def blocks(dout, q, k, v, *args, **kwargs):
        seen.append((q.shape[2], k.shape[2]))
        return EMULATED.backward_blocks(dout, q, k, v, *args, **kwargs)

    engine = make_engine("emulated", piece_fwd=_piece_fwd, piece_bwd=_piece_bwd)
    engine.backward_blocks = blocks
    results = {}
    cases = itertools.product(LAYOUTS, [True, False], [1, 3], [(8, 4), (4, 1)])
    for i, (layout, causal, B, (h, hkv)) in enumerate(cases):
        g = torch.Generator().manual_seed(seed + i)
        S = 16 * world_size
        q, dout = (torch.randn(B, S, h, 16, generator=g, dtype=torch.float64) for _ in range(2))
        k, v = (torch.randn(B, S, hkv, 16, generator=g, dtype=torch.float64) for _ in range(2))
        seen.clear()
        errs = _ring_errors(rank, world_size, q, k, v, dout, layout, causal, engine)
        results[(layout, causal, B, hkv)] = (errs, list(seen))
    return results


# The uncut last step (parts 1) at two ranks only: the other ring tests run it at every size.
@pytest.mark.parametrize("world_size,parts", [(2, 1), (2, 4), (3, 4)])
def test_last_step_in_chunks(world_size, parts):
    """With the cut on, the last step runs (and its dK/dV travel) as two chunks of K/V heads
    (3 then 1 of 4; MQA is not cut), and every output and gradient still matches float64, on
    every rank, for every layout, batches of 1 and 3."""
    for rank, res in enumerate(spawn(_last_step_in_chunks, world_size, 77, parts, timeout=300)):
        for (layout, causal, B, hkv), (errs, seen) in res.items():
            assert all(e < 1e-5 for e in errs), (rank, layout, causal, B, hkv, errs)
            whole = (8, 4) if hkv == 4 else (4, 1)
            if parts == 1 or hkv == 1:
                assert all(x == whole for x in seen), (rank, layout, causal, B, hkv, seen)
                continue
            # Whole steps first (at most P - 1 of them), then the last step's two chunks
            # (neither runs when this rank sees none of those keys).
            n = len([x for x in seen if x == whole])
            assert n <= world_size - 1 and seen[:n] == [whole] * n, (rank, layout, causal, B, seen)
            assert seen[n:] in ([(6, 3), (2, 1)], []), (rank, layout, causal, B, seen)
            if not causal:
                assert seen[n:] == [(6, 3), (2, 1)], (rank, layout, B, seen)


def test_head_start_only_for_engines_that_hold_the_sms(monkeypatch):
    """The spin kernel that gives a posted transfer its head start: launched on CUDA for the
    fused SDPA engines only, for HEAD_START_US microseconds, from HEAD_START_MIN_RANKS ranks;
    never with the Triton or reference engines, on the CPU, on two ranks, or when turned off."""
    import ringflash.ring as ring_mod
    from ringflash.ops import get_backend

    calls = []
    monkeypatch.setattr(torch.cuda, "_sleep", lambda cycles: calls.append(cycles))
    monkeypatch.setattr(ring_mod, "_cycles_per_us", lambda device: 1500.0)
    monkeypatch.setattr(ring_mod, "HEAD_START_US", 20.0)
    assert ring_mod.HEAD_START_MIN_RANKS == 3
    cuda = torch.device("cuda", 0)
    for name in ("cudnn", "sdpa_flash"):
        ring_mod._head_start(make_engine(name), cuda, 4)
    ring_mod._head_start(make_engine("cudnn"), cuda, 3)
    assert calls == [30000, 30000, 30000]
    ring_mod._head_start(make_engine("cudnn"), cuda, 2)
    ring_mod._head_start(get_backend("triton", cuda), cuda, 4)
    ring_mod._head_start(get_backend("reference", cuda), cuda, 4)
    ring_mod._head_start(EMULATED, cuda, 4)  # plain-PyTorch pieces: not the fused kernels
    ring_mod._head_start(make_engine("cudnn"), torch.device("cpu"), 4)
    monkeypatch.setattr(ring_mod, "HEAD_START_US", 0.0)
    ring_mod._head_start(make_engine("cudnn"), cuda, 4)
    assert len(calls) == 3


@pytest.mark.parametrize("backend", ["cudnn", "sdpa_flash"])
def test_engines_refuse_cpu_tensors_by_name(backend):
    q = torch.randn(1, 8, 2, 32)
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        ring_attention(q, q, q, backend=backend)


def _bf16_errors(rank, world_size, seed):
    """bf16 errors vs float64: the SDPA-engine logic (pieces rounded to bf16) and the reference
    backend (rounded once at the end), on the same data for every world size."""
    g = torch.Generator().manual_seed(seed)
    S = 96
    q, k, v, dout = (torch.randn(1, S, h, 32, generator=g, dtype=torch.float64) for h in (8, 2, 2, 8))
    qq, kk, vv = (x.clone().requires_grad_() for x in (q, k, v))
    ref, _ = reference.attention(qq, kk, vv, causal=True)
    ref.backward(dout)
    refs = (ref, qq.grad, kk.grad, vv.grad)
    out = {}
    for name, backend in (("sdpa_logic", EMULATED), ("reference", "reference")):
        lay = get_layout("striped")
        shard = lambda x: lay.shard(x, rank=rank, world_size=world_size)  # noqa: E731
        ql, kl, vl = (shard(x).bfloat16().requires_grad_() for x in (q, k, v))
        o = ring_attention(ql, kl, vl, causal=True, layout=lay, backend=backend)
        o.backward(shard(dout).bfloat16())
        got = [lay.unshard(x) for x in (o.detach(), ql.grad, kl.grad, vl.grad)]
        out[name] = [rel(a, b) for a, b in zip(got, refs)]
    return out


def test_bf16_error_of_per_piece_rounding_vs_world_size():
    """The SDPA engines round each step's partial output (and dQ/dK/dV) to bf16 before the
    float32 merge; the error grows with the number of steps but stays near one rounding."""
    errors = {p: spawn(_bf16_errors, p, 99, timeout=300)[0] for p in (1, 2, 4, 8)}
    for p, e in errors.items():
        print(f"P={p}: sdpa-engine logic {['%.2e' % x for x in e['sdpa_logic']]}, "
              f"reference {['%.2e' % x for x in e['reference']]}")
        for piecewise, once in zip(e["sdpa_logic"], e["reference"]):
            assert piecewise <= 2 * once, (p, e)


@pytest.mark.parametrize("fresh", [True, False])
def test_fold_of_overlapping_fragments(fresh):
    """The ring's fold of dK/dV fragments equals the plain sum for any key ranges:
    overlapping, nested, touching, and keys no fragment covers."""
    from ringflash.ring import _fold

    g = torch.Generator().manual_seed(5)
    Sk = 40
    for ranges in ([(0, 40)], [(0, 10), (10, 25)], [(5, 30), (0, 12), (20, 40), (8, 9)], [(3, 7)], []):
        frags = [(a, b, torch.randn(2, b - a, 3, 8, generator=g, dtype=torch.float64),
                  torch.randn(2, b - a, 3, 8, generator=g, dtype=torch.float64)) for a, b in ranges]
        if fresh:
            want = torch.zeros(2, 2, Sk, 3, 8, dtype=torch.float64)
            got = torch.full_like(want, float("nan"))  # every element must be written
        else:
            want = torch.randn(2, 2, Sk, 3, 8, generator=g, dtype=torch.float64)
            got = want.clone()
        for a, b, gk, gv in frags:
            want[0][:, a:b] += gk
            want[1][:, a:b] += gv
        _fold(got, frags, fresh=fresh)
        assert torch.allclose(got, want, rtol=0, atol=1e-12), ranges
