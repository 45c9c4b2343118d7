"""The Triton kernels under Triton's CPU interpreter, against the float64 reference.

``TRITON_INTERPRET=1`` must be set before the kernels are defined (``triton.jit`` decides at
definition time) and stay set while they run (Triton reads it again at launch), so it is set
here, before ``ringflash.kernels`` is imported, for the rest of the process. That is harmless
to the other CPU tests: the reference backend never touches Triton. The interpreter computes ``tl.dot`` on bfloat16 wrongly,
so these tests use float32 and float16; tests/test_kernels_gpu.py covers bfloat16.

Shapes are tiny and the interpreter uses small tiles (16-32 rows), so every test still
crosses several tile boundaries: fully visible, boundary and skipped tiles, and ragged ends.
"""

from __future__ import annotations

import math
import os
import sys

import pytest
import torch

os.environ["TRITON_INTERPRET"] = "1"  # process-wide: Triton also reads it at launch time
from common import make_qkv, require_interpreter, striped_positions, zigzag_positions  # noqa: E402
from ringflash import kernels, reference, sparse  # noqa: E402

require_interpreter()

# log(0) of a row that stays empty is the intended -inf; numpy warns about it.
pytestmark = pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")

DTYPES = [torch.float32, torch.float16]
FP32_TOL = 1e-4  # relative error of float32 kernels vs float64
LOWP_FACTOR = 2.0  # float16 kernels vs float64: within this factor of PyTorch in float16


# -- oracles -----------------------------------------------------------------------------

def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.double(), ref.double()
    den = ref.norm().item()
    return (x - ref).norm().item() / max(den, 1e-30)


def oracle(q, k, v, dout, *, causal, q_pos=None, k_pos=None, dtype=torch.float64):
    """Out, LSE and gradients by autograd through plain attention in ``dtype``.

    float64: the reference. float16: PyTorch attention in the kernels' dtype (scores,
    softmax and products in float16), the yardstick for the float16 tolerance.
    """
    q, k, v = (t.detach().to(dtype).requires_grad_() for t in (q, k, v))
    if dtype == torch.float64:
        out, lse = reference.attention(q, k, v, causal=causal, q_pos=q_pos, k_pos=k_pos)
    else:
        G = q.shape[2] // k.shape[2]
        kr, vr = k.repeat_interleave(G, dim=2), v.repeat_interleave(G, dim=2)
        s = torch.einsum("bqhd,bkhd->bhqk", q, kr) / math.sqrt(q.shape[-1])
        if causal:
            if q_pos is None:
                q_pos, k_pos = reference.default_positions(q.shape[1], k.shape[1])
            s = s.masked_fill(q_pos[:, None] < k_pos[None, :], -math.inf)
        lse = torch.logsumexp(s.float(), dim=-1)
        p = torch.softmax(s, dim=-1).nan_to_num(0.0)
        out = torch.einsum("bhqk,bkhd->bqhd", p, vr)
    out.backward(dout.to(dtype))
    return out.detach(), lse.detach(), q.grad, k.grad, v.grad


def run_kernels(q, k, v, dout, *, causal, q_pos=None, k_pos=None):
    out, lse = kernels.forward(q, k, v, causal=causal, q_pos=q_pos, k_pos=k_pos)
    delta = kernels.backward_delta(out.to(q.dtype), dout)
    dq, dk, dv = kernels.backward(dout, q, k, v, lse, delta, causal=causal, q_pos=q_pos, k_pos=k_pos)
    return out, lse, dq, dk, dv


def assert_close(got, ref, lowp, name, dtype):
    err = rel_err(got, ref)
    if dtype == torch.float32:
        assert err < FP32_TOL, f"{name}: relative error {err:.2e} >= {FP32_TOL:.0e}"
    else:
        base = rel_err(lowp, ref)
        assert err <= LOWP_FACTOR * base + 1e-6, (
            f"{name}: relative error {err:.2e} > {LOWP_FACTOR} x PyTorch float16's {base:.2e}"
        )


def assert_lse(got, ref):
    assert not torch.isnan(got).any(), "LSE has NaN"
    empty = torch.isneginf(ref)
    assert torch.equal(torch.isneginf(got), empty), "LSE = -inf exactly on rows that see no key"
    if (~empty).any():
        err = (got[~empty].double() - ref[~empty]).abs().max().item()
        assert err < 1e-5, f"LSE off by {err:.2e}"  # float32 sums over at most a few hundred keys


def check_all(q, k, v, dout, *, causal, q_pos=None, k_pos=None):
    dtype = q.dtype
    got = run_kernels(q, k, v, dout, causal=causal, q_pos=q_pos, k_pos=k_pos)
    ref = oracle(q, k, v, dout, causal=causal, q_pos=q_pos, k_pos=k_pos)
    lowp = oracle(q, k, v, dout, causal=causal, q_pos=q_pos, k_pos=k_pos, dtype=dtype) if dtype != torch.float32 else [None] * 5
    for t, name in zip(got, ("out", "lse", "dq", "dk", "dv")):
        assert t.dtype == torch.float32, f"{name} must be float32, got {t.dtype}"
        assert not torch.isnan(t).any(), f"{name} has NaN"
    assert_lse(got[1], ref[1])
    for i, name in ((0, "out"), (2, "dq"), (3, "dk"), (4, "dv")):
        assert_close(got[i], ref[i], lowp[i], name, dtype)
    return got, ref








# -- plain attention: lengths, GQA, head dims ---------------------------------------------

SHAPES = [
    # (B, Sq, Sk, H, Hkv, D)
    pytest.param(1, 77, 77, 4, 4, 32, id="S77-mha-d32"),
    pytest.param(2, 40, 77, 8, 2, 32, id="Sq40-Sk77-gqa4-d32"),
    pytest.param(1, 77, 50, 2, 1, 80, id="Sq77-Sk50-mqa-d80"),
    pytest.param(1, 64, 64, 8, 2, 80, id="S64-gqa4-d80"),
]


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,Sq,Sk,H,Hkv,D", SHAPES)
def test_attention(B, Sq, Sk, H, Hkv, D, dtype, causal):
    # With causal and Sq > Sk, bottom-right alignment leaves the first Sq - Sk rows empty.
    q, k, v, dout = make_qkv(B, Sq, Sk, H, Hkv, D, dtype)
    check_all(q, k, v, dout, causal=causal)


# -- ring steps: masks from positions -----------------------------------------------------

STEPS = [
    # (name, q_pos, k_pos): one step of each layout, as the ring calls the kernels
    pytest.param(striped_positions(48, 4, 1), striped_positions(48, 4, 0), id="striped-src<r"),
    pytest.param(striped_positions(48, 4, 1), striped_positions(48, 4, 1), id="striped-src=r"),
    pytest.param(striped_positions(48, 4, 1), striped_positions(48, 4, 3), id="striped-src>r"),
    pytest.param(zigzag_positions(48, 2, 0), zigzag_positions(48, 2, 1), id="zigzag-r0-src1"),
    pytest.param(zigzag_positions(48, 2, 1), zigzag_positions(48, 2, 0), id="zigzag-r1-src0"),
    pytest.param(torch.arange(40) + 45, torch.arange(45), id="contiguous-earlier-src"),
    pytest.param(torch.arange(45) + 7, torch.arange(40) + 20, id="offset-diagonal"),
    pytest.param(torch.arange(40), torch.arange(40, 80).int(), id="contiguous-later-src-int32"),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("q_pos,k_pos", STEPS)
def test_ring_step_positions(q_pos, k_pos, dtype):
    q, k, v, dout = make_qkv(1, len(q_pos), len(k_pos), 4, 2, 32, dtype, seed=1)
    got, ref = check_all(q, k, v, dout, causal=True, q_pos=q_pos, k_pos=k_pos)
    if q_pos[-1] < k_pos[0]:  # every key is in the future: nothing visible at all
        assert torch.all(got[0] == 0) and torch.all(torch.isneginf(got[1]))
        assert all(torch.all(g == 0) for g in got[2:])


def test_default_positions_are_bottom_right():
    q, k, v, _ = make_qkv(1, 30, 70, 2, 2, 32, torch.float32, seed=2)
    qp, kp = reference.default_positions(30, 70)
    a = kernels.forward(q, k, v, causal=True)
    b = kernels.forward(q, k, v, causal=True, q_pos=qp, k_pos=kp)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


# -- fold mode and accumulate-into --------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_forward_fold_equals_one_call(dtype, causal):
    """Two calls folding into (out, lse) equal one call over all keys; empty rows stay empty."""
    Sq, Sk, split = 50, 70, 37
    q, k, v, dout = make_qkv(2, Sq, Sk, 4, 2, 32, dtype, seed=3)
    # Queries at positions 10..59: rows 0..9 see keys only in the second half of this order.
    q_pos = torch.arange(Sq) + 10
    k_pos = torch.arange(Sk)
    order = [(slice(split, Sk)), (slice(0, split))]  # later keys first: some rows start empty
    out = lse = None
    for sl in order:
        out, lse = kernels.forward(q, k[:, sl], v[:, sl], causal=causal, q_pos=q_pos, k_pos=k_pos[sl], out=out, lse=lse)
    ref = oracle(q, k, v, dout, causal=causal, q_pos=q_pos, k_pos=k_pos)
    one = kernels.forward(q, k, v, causal=causal, q_pos=q_pos, k_pos=k_pos)
    assert not torch.isnan(out).any()
    assert_lse(lse, ref[1])
    if dtype == torch.float32:
        assert rel_err(out, ref[0]) < FP32_TOL
    else:
        assert rel_err(out, ref[0]) <= 1.1 * rel_err(one[0], ref[0]) + 1e-6


def test_fold_keeps_empty_rows_empty():
    """Folding a block that nobody sees into a state that is empty keeps O = 0, LSE = -inf."""
    q, k, v, _ = make_qkv(1, 20, 20, 2, 1, 32, torch.float32, seed=4)
    out = torch.zeros(1, 20, 2, 32)
    lse = torch.full((1, 2, 20), -math.inf)
    kernels.forward(q, k, v, causal=True, q_pos=torch.arange(20), k_pos=torch.arange(20) + 100, out=out, lse=lse)
    assert torch.all(out == 0) and torch.all(torch.isneginf(lse))
    # And a visible block folded into an empty state is just that block.
    kernels.forward(q, k, v, causal=True, q_pos=torch.arange(20) + 19, k_pos=torch.arange(20), out=out, lse=lse)
    one = kernels.forward(q, k, v, causal=True, q_pos=torch.arange(20) + 19, k_pos=torch.arange(20))
    assert rel_err(out, one[0]) < 1e-6 and rel_err(lse, one[1]) < 1e-6


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_backward_accumulates_over_key_blocks(dtype):
    """Per-block backward from the global LSE/delta adds up to the gradient over all keys."""
    Sq, Sk, split = 45, 60, 29
    q, k, v, dout = make_qkv(1, Sq, Sk, 4, 2, 32, dtype, seed=5)
    q_pos = striped_positions(Sq, 2, 1)
    k_pos = striped_positions(Sk, 2, 0)
    out, lse = kernels.forward(q, k, v, causal=True, q_pos=q_pos, k_pos=k_pos)
    delta = kernels.backward_delta(out, dout)
    g = torch.Generator().manual_seed(6)
    dq0 = torch.randn(q.shape, generator=g)
    dk0, dv0 = torch.randn(k.shape, generator=g), torch.randn(v.shape, generator=g)
    dq, dk, dv = dq0.clone(), dk0.clone(), dv0.clone()
    for sl in (slice(0, split), slice(split, Sk)):
        r = kernels.backward(dout, q, k[:, sl], v[:, sl], lse, delta, causal=True, q_pos=q_pos,
                             k_pos=k_pos[sl], dq=dq, dk=dk[:, sl], dv=dv[:, sl])
        assert r[0] is dq
    ref = oracle(q, k, v, dout, causal=True, q_pos=q_pos, k_pos=k_pos)
    lowp = oracle(q, k, v, dout, causal=True, q_pos=q_pos, k_pos=k_pos, dtype=dtype) if dtype != torch.float32 else [None] * 5
    for got, base, i, name in ((dq, dq0, 2, "dq"), (dk, dk0, 3, "dk"), (dv, dv0, 4, "dv")):
        assert_close(got - base, ref[i], lowp[i], name, dtype)


@pytest.mark.parametrize("group_split", [False, True], ids=["whole-group", "split-group"])
def test_backward_in_one_grid(monkeypatch, group_split):
    """dK/dV and dQ programs launched as one fused grid give the two launches' result, bit for bit,
    with the query-head group whole or split over programs."""
    attn = sys.modules[kernels.backward.__module__]
    if group_split:
        monkeypatch.setattr(attn, "_min_programs", lambda device: 10**9)
    q, k, v, dout = make_qkv(1, 45, 61, 4, 2, 32, torch.float32, seed=8)
    launches = []
    real_bwd = attn._attn_bwd

    class Recorder:  # counts the grids launched, then launches them
        def __getitem__(self, grid):
            launches.append(grid)
            return real_bwd[grid]

    monkeypatch.setattr(attn, "_attn_bwd", Recorder())
    monkeypatch.setattr(attn, "BWD_FUSED", False)
    two = run_kernels(q, k, v, dout, causal=True)
    monkeypatch.setattr(attn, "BWD_FUSED", True)
    one = run_kernels(q, k, v, dout, causal=True)
    assert len(launches) == 3  # two launches, then one
    for a, b in zip(two, one):
        assert torch.equal(a, b)
    ref = oracle(q, k, v, dout, causal=True)
    for i, name in ((2, "dq"), (3, "dk"), (4, "dv")):
        assert_close(one[i], ref[i], None, name, torch.float32)


def test_grouped_dkdv_launch_config(monkeypatch):
    """GQA dK/dV at head dims to 64 takes its own table (64 x 128 tiles ran its head loop 4x
    slower on H200 at D = 64; at D = 16 and 32 it runs 128 query rows over 64 keys)."""
    attn = sys.modules[kernels.backward.__module__]
    monkeypatch.setattr(attn, "INTERPRETED", False)  # the GPU tables, not the interpreter's tiles
    bf16 = torch.bfloat16
    for D in (32, 64):
        grouped = attn._config(attn.BWD_DKDV_CONFIGS, None, D, bf16, True, grouped=attn.BWD_DKDV_GROUPED_CONFIGS)
        assert grouped == attn.BWD_DKDV_GROUPED_CONFIGS[D]
        assert attn._config(attn.BWD_DKDV_CONFIGS, None, D, bf16, True) == attn.BWD_DKDV_CONFIGS[D]
    # Head dims the grouped table does not cover keep the MHA tiles.
    assert attn._config(attn.BWD_DKDV_CONFIGS, None, 128, bf16, True,
                        grouped=attn.BWD_DKDV_GROUPED_CONFIGS) == attn.BWD_DKDV_CONFIGS[128]
    # The backward picks the grouped table exactly when K/V have fewer heads than Q.
    seen = []
    real = attn._config
    monkeypatch.setattr(attn, "_config", lambda *a, **kw: seen.append(kw.get("grouped")) or real(*a, **kw))
    monkeypatch.setattr(attn, "INTERPRETED", True)
    for Hkv in (4, 2):
        q, k, v, dout = make_qkv(1, 16, 16, 4, Hkv, 16, torch.float32, seed=9)
        run_kernels(q, k, v, dout, causal=True)
    assert attn.BWD_DKDV_GROUPED_CONFIGS in seen and seen.count(attn.BWD_DKDV_GROUPED_CONFIGS) == 1


def test_masked_dkdv_launch_config(monkeypatch):
    """dK/dV under windows and documents takes the masked table where it has the head dim (two
    programs per SM for short key ranges); dense calls and block patterns keep the plain one."""
    attn = sys.modules[kernels.backward.__module__]
    monkeypatch.setattr(attn, "INTERPRETED", False)
    bf16 = torch.bfloat16
    masked = attn.BWD_DKDV_MASKED_CONFIGS
    assert attn._config(attn.BWD_DKDV_CONFIGS, None, 128, bf16, True, masked=masked) == masked[128]
    assert attn._config(attn.BWD_DKDV_CONFIGS, None, 64, bf16, True, masked=masked) == attn.BWD_DKDV_CONFIGS[64]
    seen = []
    real = attn._config
    monkeypatch.setattr(attn, "_config", lambda *a, **kw: (a[0] is attn.BWD_DKDV_CONFIGS and seen.append(kw.get("masked")))
                        or real(*a, **kw))
    monkeypatch.setattr(attn, "INTERPRETED", True)
    q, k, v, dout = make_qkv(1, 16, 16, 2, 2, 16, torch.float32, seed=9)
    out, lse = kernels.forward(q, k, v, causal=True)
    delta = kernels.backward_delta(out, dout)
    doc = torch.tensor([0] * 7 + [1] * 9, dtype=torch.int32)
    for kw in (dict(), dict(window=(4, 0)), dict(q_doc=doc, k_doc=doc)):
        kernels.backward(dout, q, k, v, lse, delta, causal=True, **kw)
    kernels.backward(dout, q, k, v, lse, delta, causal=True, blocks=sparse.block_pattern(16, 8, local=1))
    assert seen == [None, masked, masked, None]


@pytest.mark.parametrize("layout", ["contiguous", "striped", "zigzag"])
@pytest.mark.parametrize("H,Hkv", [(4, 4), (4, 2)])
def test_backward_query_tiles_taller_than_key_tiles(monkeypatch, H, Hkv, layout):
    """dK/dV programs whose query tiles are taller than their key tiles (the grouped table's
    128 x 64 at D <= 32): causal boundary tiles, partial tiles and ring-step positions."""
    attn = sys.modules[kernels.backward.__module__]
    monkeypatch.setattr(attn, "_INTERPRET_DKDV", attn.KernelConfig(32, 16, 1, 1))
    q, k, v, dout = make_qkv(1, 74, 82, H, Hkv, 16, torch.float32, seed=14)
    if layout == "contiguous":
        q_pos = k_pos = None
    else:
        pos = striped_positions if layout == "striped" else zigzag_positions
        q_pos, k_pos = pos(74, 3, 2), pos(82, 3, 0)
    check_all(q, k, v, dout, causal=True, q_pos=q_pos, k_pos=k_pos)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("H,Hkv", [(8, 2), (6, 1)])
def test_backward_split_group(monkeypatch, H, Hkv, causal):
    """A dK/dV grid too small for the GPU splits each query-head group over several programs:
    the same gradients (to float32 rounding of the slab sum), stored or accumulated."""
    attn = sys.modules[kernels.backward.__module__]
    q, k, v, dout = make_qkv(2, 50, 61, H, Hkv, 32, torch.float32, seed=10)
    q_pos, k_pos = striped_positions(50, 2, 1), striped_positions(61, 2, 0)
    out, lse = kernels.forward(q, k, v, causal=causal, q_pos=q_pos, k_pos=k_pos)
    delta = kernels.backward_delta(out, dout)
    ref = oracle(q, k, v, dout, causal=causal, q_pos=q_pos, k_pos=k_pos)
    g = torch.Generator().manual_seed(11)
    base = [torch.randn(t.shape, generator=g) for t in (q, k, v)]
    splits = []
    real_split = attn._group_split
    monkeypatch.setattr(attn, "_group_split", lambda *a: splits.append(real_split(*a)) or splits[-1])
    monkeypatch.setattr(attn, "_min_programs", lambda device: 10**9)  # split as far as the group allows
    launched = []  # (grid, SPLIT) of every dK/dV launch
    real_bwd = attn._attn_bwd

    class Recorder:
        def __getitem__(self, grid):
            def launch(*args, **meta):
                if meta["DO_DKDV"]:
                    launched.append((grid, args[-5]))  # args end with (..., SPLIT, Sq, Sk, SWIZZLE_KV, SWIZZLE_Q)
                return real_bwd[grid](*args, **meta)
            return launch

    monkeypatch.setattr(attn, "_attn_bwd", Recorder())
    stored = kernels.backward(dout, q, k, v, lse, delta, causal=causal, q_pos=q_pos, k_pos=k_pos)
    acc = [t.clone() for t in base]
    kernels.backward(dout, q, k, v, lse, delta, causal=causal, q_pos=q_pos, k_pos=k_pos,
                     dq=acc[0], dk=acc[1], dv=acc[2])
    assert splits == [H // Hkv] * 2
    assert [split for _, split in launched] == [H // Hkv] * 2  # the split reached the kernel
    for i, name in enumerate(("dq", "dk", "dv")):
        assert_close(stored[i], ref[2 + i], None, name, torch.float32)
        assert_close(acc[i] - base[i], ref[2 + i], None, name + " (accumulated)", torch.float32)


@pytest.mark.parametrize("group_split", [False, True], ids=["whole-group", "split-group"])
def test_backward_store_dkdv(monkeypatch, group_split):
    """``store_dkdv``: the given dK/dV buffers (holding garbage here) are overwritten with the
    block's gradients, while dQ still adds into its accumulator."""
    attn = sys.modules[kernels.backward.__module__]
    if group_split:
        monkeypatch.setattr(attn, "_min_programs", lambda device: 10**9)
    q, k, v, dout = make_qkv(1, 45, 61, 4, 2, 32, torch.float32, seed=12)
    q_pos, k_pos = striped_positions(45, 2, 1), striped_positions(61, 2, 0)
    out, lse = kernels.forward(q, k, v, causal=True, q_pos=q_pos, k_pos=k_pos)
    delta = kernels.backward_delta(out, dout)
    g = torch.Generator().manual_seed(13)
    dq0 = torch.randn(q.shape, generator=g)
    dq, dk, dv = dq0.clone(), torch.randn(k.shape, generator=g), torch.randn(v.shape, generator=g)
    got = kernels.backward(dout, q, k, v, lse, delta, causal=True, q_pos=q_pos, k_pos=k_pos,
                           dq=dq, dk=dk, dv=dv, store_dkdv=True)
    assert got[1] is dk and got[2] is dv
    ref = oracle(q, k, v, dout, causal=True, q_pos=q_pos, k_pos=k_pos)
    assert_close(dq - dq0, ref[2], None, "dq", torch.float32)
    assert_close(dk, ref[3], None, "dk", torch.float32)
    assert_close(dv, ref[4], None, "dv", torch.float32)


@pytest.mark.parametrize("group_split", [False, True], ids=["whole-group", "split-group"])
@pytest.mark.parametrize("masks", ["causal", "window-docs"])
def test_results_stored_in_the_inputs_dtype(monkeypatch, group_split, masks):
    """``out_dtype`` / ``grad_dtype``: O and the gradients stored by the kernels in float16 are
    the float32 results rounded once (bitwise what a cast afterwards gives); the default stays
    float32, and a fold or another dtype is refused."""
    attn = sys.modules[kernels.backward.__module__]
    if group_split:
        monkeypatch.setattr(attn, "_min_programs", lambda device: 10**9)
    q, k, v, dout = make_qkv(1, 70, 70, 4, 2, 32, torch.float16, seed=14)
    kw = dict(causal=True)
    if masks == "window-docs":
        doc = torch.tensor([0] * 23 + [1] * 1 + [2] * 46, dtype=torch.int32)
        kw.update(window=(17, 3), causal=False, q_doc=doc, k_doc=doc)
    out32, lse32 = kernels.forward(q, k, v, **kw)
    out16, lse16 = kernels.forward(q, k, v, out_dtype=torch.float16, **kw)
    assert out32.dtype == torch.float32 and out16.dtype == torch.float16
    assert torch.equal(out16, out32.to(torch.float16)) and torch.equal(lse16, lse32)
    delta = kernels.backward_delta(out16, dout)
    g32 = kernels.backward(dout, q, k, v, lse32, delta, **kw)
    g16 = kernels.backward(dout, q, k, v, lse32, delta, grad_dtype=torch.float16, **kw)
    for name, a, b in zip(("dq", "dk", "dv"), g32, g16):
        assert a.dtype == torch.float32 and b.dtype == torch.float16, name
        assert torch.equal(b, a.to(torch.float16)), name
    # against float64 attention with the same mask
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    if masks == "causal":
        ref, _ = reference.attention(qd, kd, vd, causal=True)
    else:
        ref, _ = reference.attention(qd, kd, vd, window=(17, 3), cu_seqlens=[0, 23, 24, 70])
    ref.backward(dout.double())
    for name, got, want in zip(("out", "dq", "dk", "dv"), (out16, *g16), (ref, qd.grad, kd.grad, vd.grad)):
        assert rel_err(got, want) < 5e-3, (name, rel_err(got, want))
    with pytest.raises(ValueError, match="out_dtype"):
        kernels.forward(q, k, v, out_dtype=torch.bfloat16, **kw)
    with pytest.raises(ValueError, match="fold"):
        kernels.forward(q, k, v, out=out32.clone(), lse=lse32.clone(), out_dtype=torch.float32, **kw)
    with pytest.raises(ValueError, match="grad_dtype"):
        kernels.backward(dout, q, k, v, lse32, delta, grad_dtype=torch.float64, **kw)


@pytest.mark.parametrize("masks", ["causal", "window"])
def test_single_step_calls_store_in_the_inputs_dtype(monkeypatch, masks):
    """flash_attention and a ring of one step (one rank here) ask the kernels for O and the
    gradients in the inputs' dtype (no float32 round trip); the results match float64 attention
    and each other bitwise."""
    import ringflash.kernels as kernels_pkg
    from ringflash import flash_attention, ring_attention

    asked = []
    real_fwd, real_bwd = kernels_pkg.forward, kernels_pkg.backward
    monkeypatch.setattr(kernels_pkg, "forward", lambda *a, **kw: asked.append(("fwd", kw.get("out_dtype"))) or real_fwd(*a, **kw))
    monkeypatch.setattr(kernels_pkg, "backward", lambda *a, **kw: asked.append(("bwd", kw.get("grad_dtype"))) or real_bwd(*a, **kw))
    q, k, v, dout = make_qkv(1, 45, 45, 4, 2, 32, torch.float16, seed=15)
    kw = dict(causal=True) if masks == "causal" else dict(causal=True, window=(9, 0))
    results = []
    for fn in (flash_attention, ring_attention):
        asked.clear()
        qq, kk, vv = (t.detach().clone().requires_grad_() for t in (q, k, v))
        out = fn(qq, kk, vv, backend="triton", **kw)
        out.backward(dout)
        assert asked == [("fwd", torch.float16), ("bwd", torch.float16)], (fn.__name__, asked)
        results.append([out.detach(), qq.grad, kk.grad, vv.grad])
    for a, b in zip(*results):
        assert a.dtype == torch.float16 and torch.equal(a, b)
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref, _ = reference.attention(qd, kd, vd, **kw)
    ref.backward(dout.double())
    for got, want in zip(results[0], (ref, qd.grad, kd.grad, vd.grad)):
        assert rel_err(got, want) < 5e-3


@pytest.mark.parametrize("B,H,Hkv,budget", [(1, 3, 3, 2), (2, 3, 1, 1), (1, 6, 2, 4)])
def test_causal_order_in_sections(monkeypatch, B, H, Hkv, budget):
    """Causal grids run their tiles longest first across sections of heads sized to L2
    (_lpt_item): with an L2 budget of ``budget`` heads' operands the sections hold one to
    several heads, the last one short; every tile of every head is still computed once, in the
    forward, dK/dV and dQ programs, and with the group split."""
    attn = sys.modules[kernels.backward.__module__]
    Sq, Sk, D = 70, 75, 16
    monkeypatch.setattr(attn, "LPT_L2_BYTES", budget * 2 * max(Sq, Sk) * D * 4)
    swizzles = []
    real = attn._lpt_swizzle
    monkeypatch.setattr(attn, "_lpt_swizzle", lambda *a: swizzles.append(real(*a)) or swizzles[-1])
    monkeypatch.setattr(attn, "_min_programs", lambda device: 10**9)  # split the groups too
    q, k, v, dout = make_qkv(B, Sq, Sk, H, Hkv, D, torch.float32, seed=21)
    check_all(q, k, v, dout, causal=True)
    G = H // Hkv
    fits = budget * max(Sq, Sk) // Sk  # K/V heads of this many keys in the budget
    assert swizzles[0] == (1 << (fits.bit_length() - 1)) * G  # the forward's sections
    assert min(swizzles) < B * H  # at least one grid ran in several sections


def test_lpt_swizzle():
    attn = sys.modules[kernels.backward.__module__]
    mb = 1 << 20
    assert attn.LPT_L2_BYTES == 16 * mb
    assert attn._lpt_swizzle(4 * mb) == 4  # K/V of 8k keys at D = 128 in bf16
    assert attn._lpt_swizzle(4 * mb, 4) == 16  # four query heads on each K/V head
    assert attn._lpt_swizzle(3 * mb) == 4  # a power of two
    assert attn._lpt_swizzle(64 * mb) == 1  # one head's K/V already fills the budget
    assert attn._lpt_swizzle(0) > 0


def test_group_split_choice(monkeypatch):
    attn = sys.modules[kernels.backward.__module__]
    monkeypatch.setattr(attn, "_min_programs", lambda device: 264)
    cpu = torch.device("cpu")
    assert attn._group_split(1024, 4, cpu) == 1  # the grid fills the GPU already
    assert attn._group_split(256, 4, cpu) == 2
    assert attn._group_split(64, 32, cpu) == 8  # MQA at 8k keys: 64 programs -> 512
    assert attn._group_split(10, 6, cpu) == 6  # never more than the group
    assert attn._group_split(10, 1, cpu) == 1
    monkeypatch.setattr(attn, "_min_programs", lambda device: 0)
    assert attn._group_split(1, 8, cpu) == 1


def test_backward_of_empty_rows_is_zero():
    q, k, v, dout = make_qkv(1, 33, 33, 2, 2, 32, torch.float32, seed=7)
    q_pos, k_pos = torch.arange(33), torch.arange(33) + 16  # rows 0..15 see nothing
    out, lse = kernels.forward(q, k, v, causal=True, q_pos=q_pos, k_pos=k_pos)
    assert torch.all(out[:, :16] == 0) and torch.all(torch.isneginf(lse[:, :, :16]))
    delta = kernels.backward_delta(out, dout)
    dq, dk, dv = kernels.backward(dout, q, k, v, lse, delta, causal=True, q_pos=q_pos, k_pos=k_pos)
    assert not any(torch.isnan(t).any() for t in (dq, dk, dv))
    assert torch.all(dq[:, :16] == 0)


def test_backward_delta():
    out = torch.randn(2, 37, 3, 80)
    dout = torch.randn(2, 37, 3, 80)
    ref = reference.backward_delta(out.double(), dout.double())
    assert rel_err(kernels.backward_delta(out, dout), ref) < 1e-6


@pytest.mark.parametrize("mode", ["in_place", "cast", "accumulate"])
def test_finish_dq(mode):
    """What follows the Hopper backward's ordered additions into a dQ that was not zeroed
    (attention._finish_dq): the rows of query tiles whose counter is 0 (no key tile added into
    them) become 0, in place in the float32 sum or in the cast into dQ's dtype (added into dQ with
    ``accumulate``); every other row is the sum, cast. On memory full of NaN, so a row the kernel
    leaves alone shows."""
    from ringflash.kernels import attention

    B, S, H, D, tile = 2, 45, 3, 48, 8  # a ragged last tile, a head dim that is not a power of two
    n_tiles = -(-S // tile)
    g = torch.Generator().manual_seed(5)
    counters = torch.randint(0, 3, (B * H, n_tiles), generator=g, dtype=torch.int32)
    counters[0, 0] = counters[-1, -1] = 0  # the first and the ragged last tile unwalked somewhere
    added = counters.view(B, H, n_tiles).repeat_interleave(tile, dim=2)[:, :, :S].transpose(1, 2) > 0  # (B, S, H)
    dq_sum = torch.randn(B, S, H, D, generator=g)
    dq_sum[~added] = float("nan")  # what the kernel left there: anything
    want = torch.where(added[..., None], dq_sum, torch.zeros(()))
    if mode == "in_place":
        attention._finish_dq(dq_sum, dq_sum, counters, tile, False)
        assert torch.equal(dq_sum, want)
        return
    dq = torch.randn(B, S, H, D, generator=g).to(torch.float16)
    prior = dq.clone()
    attention._finish_dq(dq_sum, dq, counters, tile, mode == "accumulate")
    expect = (want + prior.float()).to(torch.float16) if mode == "accumulate" else want.to(torch.float16)
    assert torch.equal(dq, expect)


def test_strided_inputs():
    """Any layout whose head_dim is contiguous: here q, k, v are views of one packed qkv."""
    qkv = torch.randn(1, 50, 3, 4, 32)
    q, k, v = qkv.unbind(2)
    dout = torch.randn(1, 50, 4, 32)
    check_all(q, k, v, dout, causal=True)


# -- input checks -------------------------------------------------------------------------

@pytest.mark.parametrize(
    "make,exc,words",
    [
        (lambda: (torch.randn(1, 8, 2, 32, dtype=torch.float64),) * 3, TypeError, "float16"),
        (lambda: (torch.randn(1, 8, 2, 64)[..., ::2],) * 3, ValueError, "contiguous"),
        (lambda: (torch.randn(1, 8, 2, 20),) * 3, ValueError, "head_dim"),
        (lambda: (torch.randn(1, 8, 2, 512),) * 3, ValueError, "head_dim"),
        (lambda: (torch.randn(1, 8, 3, 32), torch.randn(1, 8, 2, 32), torch.randn(1, 8, 2, 32)), ValueError, "multiple"),
        (lambda: (torch.randn(8, 2, 32),) * 3, ValueError, "4-D"),
    ],
    ids=["float64", "strided-head-dim", "head-dim-20", "head-dim-512", "heads", "rank"],
)
def test_check_inputs_rejects(make, exc, words):
    with pytest.raises(exc, match=words):
        kernels.check_inputs(*make())


def test_positions_must_match_lengths():
    q, k, v, _ = make_qkv(1, 10, 12, 2, 2, 32, torch.float32)
    with pytest.raises(ValueError, match="k_pos"):
        kernels.forward(q, k, v, causal=True, q_pos=torch.arange(10), k_pos=torch.arange(10))


# -- the fused merge of the SDPA engines ------------------------------------------------------


@pytest.mark.parametrize("block_dtype", DTYPES)
@pytest.mark.parametrize("D", [32, 80])
def test_merge_matches_reference(block_dtype, D):
    from ringflash.kernels.merge import merge_

    torch.manual_seed(7)
    B, S, H = 2, 45, 3
    out = torch.randn(B, S, H, D)
    lse = torch.randn(B, H, S) * 3
    # The block's output in (B, H, S, D) memory, seen as (B, S, H, D): the fused SDPA ops'
    # layout. Some rows are empty on one side or on both.
    block_out = torch.randn(B, H, S, D).to(block_dtype).transpose(1, 2)
    block_lse = torch.randn(B, H, S) * 3
    lse[:, :, :5] = -math.inf
    out[:, :5] = 0.0
    block_lse[:, :, 3:9] = -math.inf
    block_out[:, 3:9] = 0.0
    want_out, want_lse = out.double(), lse.double()
    reference.merge_(want_out, want_lse, block_out.double(), block_lse.double())

    got_out, got_lse = out.clone(), lse.clone()
    # A range of rows, as the engines merge one piece at a time.
    merge_(got_out[:, 2:], got_lse[:, :, 2:], block_out[:, 2:], block_lse[:, :, 2:])
    merge_(got_out[:, :2], got_lse[:, :, :2], block_out[:, :2], block_lse[:, :, :2])
    assert torch.equal(torch.isinf(got_lse), torch.isinf(want_lse))
    assert torch.equal(got_out[:, 3:5], torch.zeros_like(got_out[:, 3:5]))  # empty on both sides
    finite = torch.isfinite(want_lse)
    assert (got_lse.double()[finite] - want_lse[finite]).abs().max() < 1e-5
    assert rel_err(got_out, want_out) < 1e-6


@pytest.mark.parametrize("src_dtype", DTYPES)
@pytest.mark.parametrize("fresh", [False, True])
def test_accumulate_into_float32(src_dtype, fresh):
    """The SDPA engines' gradient accumulation: dst (+)= src for views in any strides (a range
    of rows of the accumulator; a block in (B, H, S, D) memory seen as (B, S, H, D))."""
    from ringflash.kernels.merge import accumulate_

    torch.manual_seed(11)
    B, S, H, D = 2, 45, 3, 80
    dst = torch.randn(B, S + 7, H, D)
    src = torch.randn(B, H, S, D).to(src_dtype).transpose(1, 2)
    want = dst.double().clone()
    want[:, 7:] = src.double() if fresh else want[:, 7:] + src.double()
    got = dst.clone()
    accumulate_(got[:, 7:], src, fresh=fresh)
    assert torch.equal(got[:, :7], dst[:, :7])  # outside the view: untouched
    assert rel_err(got, want) < 1e-7
    if fresh:  # a fresh copy casts to any dtype (the last hop's bf16 messages)
        half = torch.empty(B, S, H, D, dtype=torch.float16)
        accumulate_(half, src, fresh=True)
        assert torch.equal(half, src.to(torch.float16))
    with pytest.raises(ValueError, match="shapes do not match"):
        accumulate_(got, src)
    with pytest.raises(ValueError, match="float32"):
        accumulate_(got[:, 7:].double(), src)


def test_merge_rejects_mismatched_shapes():
    from ringflash.kernels.merge import merge_

    out, lse = torch.zeros(1, 8, 2, 16), torch.zeros(1, 2, 8)
    with pytest.raises(ValueError, match="shapes do not match"):
        merge_(out, lse, torch.zeros(1, 7, 2, 16), torch.zeros(1, 2, 7))
    with pytest.raises(ValueError, match="float32"):
        merge_(out.half(), lse, out.half(), lse)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_wide_offsets_give_the_same_results(monkeypatch, causal):
    """The 64-bit tile offsets (``WIDE``, chosen for tensors past 2**31 elements) compute what
    the 32-bit ones do: forced on for small strided tensors here; the GPU test runs a real
    > 2**31-element call (tests/test_kernels_gpu.py::test_offsets_past_int32)."""
    from ringflash.kernels import attention as attn_mod

    g = torch.Generator().manual_seed(9)
    q, dout = torch.randn(1, 50, 6, 32, generator=g), torch.randn(1, 50, 6, 32, generator=g)
    kv = torch.randn(1, 50, 4, 32, generator=g)
    k, v = kv[:, :, :2], kv[:, :, 2:]  # strided views
    q_pos, k_pos = striped_positions(50, 2, 1), striped_positions(50, 2, 0)
    kw = dict(causal=causal, q_pos=q_pos if causal else None, k_pos=k_pos if causal else None)

    def run():
        out, lse = kernels.forward(q, k, v, **kw)
        delta = kernels.backward_delta(out, dout)
        return (out, lse, *kernels.backward(dout, q, k, v, lse, delta, **kw))

    launched = []  # the WIDE flag of every launch

    class Recorder:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            def launch(*args, **meta):
                launched.append(meta["WIDE"])
                return self.kernel[grid](*args, **meta)
            return launch

    for name in ("_attn_fwd", "_bwd_delta", "_attn_bwd"):
        monkeypatch.setattr(attn_mod, name, Recorder(getattr(attn_mod, name)))
    assert not attn_mod._wide(q, k, v, dout)
    narrow = run()
    assert launched and not any(launched)
    launched.clear()
    monkeypatch.setattr(attn_mod, "_INT32_SPAN", 1)
    assert attn_mod._wide(q)
    wide = run()
    assert len(launched) >= 3 and all(launched)  # forward, delta and backward all took the 64-bit path
    for a, b in zip(narrow, wide):
        assert torch.equal(a, b)


def test_interpreter_refuses_bfloat16_and_half_positions():
    """bf16 tl.dot is wrong in Triton's interpreter: refused rather than computed; one position
    tensor without the other is refused rather than replaced by the default alignment."""
    q = torch.randn(1, 16, 2, 32)
    with pytest.raises(TypeError, match="interpreter"):
        kernels.forward(q.bfloat16(), q.bfloat16(), q.bfloat16())
    with pytest.raises(ValueError, match="both q_pos and k_pos"):
        kernels.forward(q, q, q, causal=True, q_pos=torch.arange(16) + 3)
    with pytest.raises(ValueError, match="head_dim"):
        kernels.check_inputs(q[..., :0], q[..., :0], q[..., :0])


def _hopper_that_does_not_compile(monkeypatch, name: str):
    """kernels.attention with the Hopper kernels serving every call on a fresh device record, and
    its ``name`` (_forward_hopper / _backward_hopper) failing to compile: (module, tries)."""
    from triton.compiler.errors import CompilationError

    attn = sys.modules[kernels.forward.__module__]
    tries = []

    def broken(*args, **kwargs):
        tries.append(1)
        raise CompilationError("kernel source", None, "a Gluon name this Triton lacks")

    monkeypatch.setattr(attn, "_HOPPER_DEVICES", {})
    monkeypatch.setattr(attn, "_HOPPER_BWD_FAILED", set())
    monkeypatch.setattr(attn, "_hopper_serves", lambda q, m, enabled, *a, **kw: attn._HOPPER_DEVICES.get(-1, True))
    monkeypatch.setattr(attn, name, broken)
    return attn, tries


def test_hopper_forward_that_does_not_compile_falls_back(monkeypatch):
    """The Hopper forward is on by default on sm_90: if it fails to compile (another Triton's
    Gluon, say), forward() warns once, serves the call on the Triton kernel, and does not try the
    Hopper kernel again on that device."""
    attn, tries = _hopper_that_does_not_compile(monkeypatch, "_forward_hopper")
    q, k, v, _ = make_qkv(1, 40, 40, 2, 2, 16, torch.float32, seed=3)
    with pytest.warns(RuntimeWarning, match="Hopper forward kernel did not compile"):
        out, lse = kernels.forward(q, k, v, causal=True)
    ref, ref_lse = reference.forward(q.double(), k.double(), v.double(), causal=True)
    assert ((out.double() - ref).norm() / ref.norm()).item() < 1e-5
    assert attn._HOPPER_DEVICES == {-1: False}
    kernels.forward(q, k, v, causal=True)
    assert tries == [1]


def test_hopper_backward_that_does_not_compile_falls_back(monkeypatch):
    """The Hopper backward is on by default on sm_90 at D = 128 too: if it fails to compile,
    backward() warns once, serves the call (accumulators and the after_dkdv hook included) on the
    Triton kernels, does not try the Hopper backward again on that device, and leaves the Hopper
    forward on."""
    attn, tries = _hopper_that_does_not_compile(monkeypatch, "_backward_hopper")
    q, k, v, _ = make_qkv(1, 40, 40, 2, 2, 16, torch.float32, seed=4)
    dout = make_qkv(1, 40, 40, 2, 2, 16, torch.float32, seed=5)[0]
    ref, ref_lse = reference.forward(q.double(), k.double(), v.double(), causal=True)
    delta = reference.backward_delta(ref, dout.double())
    want = reference.backward(dout.double(), q.double(), k.double(), v.double(), ref_lse, delta, causal=True)
    acc = [torch.full_like(t, 0.5) for t in (q, k, v)]
    hooked = []
    with pytest.warns(RuntimeWarning, match="Hopper backward kernel did not compile"):
        kernels.backward(dout, q, k, v, ref_lse.float(), delta.float(), causal=True, dq=acc[0], dk=acc[1],
                         dv=acc[2], after_dkdv=lambda: hooked.append(1))
    for got, w in zip(acc, want):
        assert ((got.double() - 0.5 - w).norm() / w.norm()).item() < 1e-5
    assert hooked == [1]
    assert attn._HOPPER_BWD_FAILED == {-1} and attn._HOPPER_DEVICES == {}
    kernels.backward(dout, q, k, v, ref_lse.float(), delta.float(), causal=True)
    assert tries == [1]


def test_launch_drops_stages_that_do_not_fit():
    """attention._launch: a launch the compiler finds too big for shared memory is retried with one
    stage fewer until it fits, the count that fit is remembered for those constexprs, and a
    kernel that fits at no stage count raises."""
    from triton.runtime.errors import OutOfResources

    attn = sys.modules[kernels.forward.__module__]
    launched = []

    class Kernel:
        def __init__(self, fits):
            self.fits = fits

        def __getitem__(self, grid):
            def run(*args, num_warps, num_stages, **constexprs):
                if num_stages > self.fits:
                    raise OutOfResources(1000 * num_stages, 232448, "shared memory")
                launched.append((grid, args, num_warps, num_stages, constexprs))
            return run

    kernel = Kernel(fits=2)
    attn._launch(kernel, (3, 1), "a", num_warps=8, num_stages=4, WINDOW=1, DOCS=True)
    assert launched == [((3, 1), ("a",), 8, 2, {"WINDOW": 1, "DOCS": True, **attn.FP_FUSION})]  # fused FMAs asked for
    assert attn._STAGES_FIT[(kernel, 8, 4, (("DOCS", True), ("WINDOW", 1)))] == 2
    kernel.fits = 4  # remembered: the next launch starts at 2 and does not try 4 again
    attn._launch(kernel, (3, 1), "b", num_warps=8, num_stages=4, WINDOW=1, DOCS=True)
    assert launched[-1][3] == 2
    with pytest.raises(OutOfResources):
        attn._launch(Kernel(fits=0), (1,), num_warps=4, num_stages=3)
