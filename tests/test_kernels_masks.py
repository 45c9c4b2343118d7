"""The Triton kernels with sliding windows and packed documents, under Triton's CPU interpreter.

Every case runs the forward (out, LSE) and the backward (dq, dk, dv) of one block pair, as the
ring and ``flash_attention`` call them, against ``reference.forward`` / ``reference.backward`` in
float64 with the same rule; that oracle is itself checked, per case, against softmax attention
under a mask built here from the rule as the feature states it. As in tests/test_kernels.py
(which says how the interpreter is set up) the dtypes are float32 and float16: the interpreter
computes ``tl.dot`` on bfloat16 wrongly. float16 must come within 2x of PyTorch attention run in
float16 with the same mask.

Lengths are not multiples of the interpreter's tiles (32 x 16 and 16 x 32), so every case
crosses fully visible, boundary and skipped tiles and ragged ends; windows narrow enough to hide
whole tiles, 1-token documents, blocks in which some rows (or all) see no key.
"""

from __future__ import annotations

import math
import os
import random

import pytest
import torch

os.environ["TRITON_INTERPRET"] = "1"  # process-wide: Triton also reads it at launch time
from common import brute_force_rule as rule  # noqa: E402
from common import make_qkv, require_interpreter  # noqa: E402
from common import striped_positions as striped  # noqa: E402
from common import zigzag_positions as zigzag  # noqa: E402
from ringflash import flash_attention, kernels, reference  # noqa: E402
from ringflash import mask as mask_mod  # noqa: E402

require_interpreter()

# log(0) of a row that stays empty is the intended -inf; numpy warns about it.
pytestmark = pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")

DTYPES = [torch.float32, torch.float16]
FP32_TOL = 1e-5  # relative error of float32 kernels vs float64
LOWP_FACTOR = 2.0  # float16 kernels vs float64: within this factor of PyTorch in float16
ZERO_ABS = 1e-5  # where float64 gives 0 (dQ, dK under a (0, 0) window): an absolute bound
NAMES = ("out", "lse", "dq", "dk", "dv")


# -- the rule, the oracles ----------------------------------------------------------------


def softmax_attention(q, k, v, dout, vis):
    """Softmax attention under ``vis`` in q's dtype (scores, softmax, products), by autograd.
    Rows that see no key: O = 0, LSE = -inf, no gradient."""
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    G = q.shape[2] // k.shape[2]
    kr, vr = k.repeat_interleave(G, dim=2), v.repeat_interleave(G, dim=2)
    s = torch.einsum("bqhd,bkhd->bhqk", q, kr) / math.sqrt(q.shape[-1])
    has = vis.any(-1)[:, None]
    s = s.masked_fill(~vis, -math.inf)
    lse = torch.logsumexp(s.float(), dim=-1)
    p = torch.softmax(s.masked_fill(~has, 0.0), dim=-1) * has
    out = torch.einsum("bhqk,bkhd->bqhd", p, vr)
    out.backward(dout.to(q.dtype))
    return out.detach(), lse.detach(), q.grad, k.grad, v.grad


def reference64(q, k, v, dout, **mask):
    """reference.forward / backward in float64 (the ring's own per-block oracle)."""
    q, k, v, dout = (t.double() for t in (q, k, v, dout))
    out, lse = reference.forward(q, k, v, **mask)
    delta = reference.backward_delta(out, dout)
    dq, dk, dv = reference.backward(dout, q, k, v, lse, delta, **mask)
    return out, lse, dq, dk, dv


def rel_err(x, ref):
    x, ref = x.double(), ref.double()
    return ((x - ref).norm() / ref.norm()).item()


def assert_close(got, ref, lowp, name, dtype):
    assert not torch.isnan(got).any(), f"{name} has NaN"
    if ref.norm() < 1e-9:  # zero up to float64 rounding: nothing to be relative to
        err = (got.double() - ref).abs().max().item()
        assert err < ZERO_ABS, f"{name}: |x| up to {err:.2e} where float64 gives 0"
        return
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
        assert err < 1e-5, f"LSE off by {err:.2e}"






def random_docs(seqlen, seed):
    """Random document boundaries over [0, seqlen): lengths from 1 up, at least one 1-token document."""
    g = random.Random(seed)
    cuts = set(g.sample(range(1, seqlen), k=max(1, seqlen // 9)))
    c = g.randrange(1, seqlen - 1)
    cuts |= {c, c + 1}
    return [0, *sorted(cuts), seqlen]


def run_kernels(q, k, v, dout, *, q_pos, k_pos, causal, window, q_doc, k_doc):
    kw = dict(q_pos=q_pos, k_pos=k_pos, causal=causal, window=window, q_doc=q_doc, k_doc=k_doc)
    out, lse = kernels.forward(q, k, v, **kw)
    delta = kernels.backward_delta(out.to(q.dtype), dout)
    dq, dk, dv = kernels.backward(dout, q, k, v, lse, delta, **kw)
    return out, lse, dq, dk, dv


def check_case(q, k, v, dout, *, causal, window=None, cu=None, q_pos=None, k_pos=None):
    """Kernels vs float64 for one block pair; ``q_pos``/``k_pos`` None: the kernels' default
    (bottom-right) alignment. Returns (kernel results, float64 results, the mask)."""
    dtype = q.dtype
    Sq, Sk = q.shape[1], k.shape[1]
    given = q_pos is not None
    if not given:
        q_pos, k_pos = reference.default_positions(Sq, Sk)
    q_doc = k_doc = None
    if cu is not None:
        q_doc, k_doc = mask_mod.doc_ids(cu, q_pos), mask_mod.doc_ids(cu, k_pos)
    got = run_kernels(q, k, v, dout, q_pos=q_pos if given else None, k_pos=k_pos if given else None,
                      causal=causal, window=window, q_doc=q_doc, k_doc=k_doc)
    ref = reference64(q, k, v, dout, q_pos=q_pos, k_pos=k_pos, causal=causal, window=window,
                      q_doc=q_doc, k_doc=k_doc)
    vis = rule(q_pos, k_pos, causal, window, cu)
    # The oracle is the rule of the feature.
    naive = softmax_attention(*(t.double() for t in (q, k, v, dout)), vis)
    for r, n, name in zip(ref, naive, NAMES):
        if name == "lse":
            assert torch.equal(torch.isneginf(r), torch.isneginf(n))
        else:
            assert (r - n).abs().max() < 1e-10, f"reference.{name} disagrees with the rule"
    lowp = softmax_attention(q, k, v, dout, vis) if dtype != torch.float32 else [None] * 5
    for t, name in zip(got, NAMES):
        assert t.dtype == torch.float32, f"{name} must be float32, got {t.dtype}"
    assert_lse(got[1], ref[1])
    for i in (0, 2, 3, 4):
        assert_close(got[i], ref[i], lowp[i], NAMES[i], dtype)
    # Rows that see no key: O = 0 and no gradient, exactly.
    empty = ~vis.any(-1)
    assert torch.all(got[0][:, empty] == 0) and torch.all(got[2][:, empty] == 0)
    return got, ref, vis


# -- one block pair, every rule -------------------------------------------------------------

# (B, Sq, Sk, H, Hkv, D, causal, window, documents, positions). Documents: None, "random" (over
# every position the block holds, 1-token documents included) or a list. Positions: "default"
# (bottom-right, not passed to the kernels), or (q_pos, k_pos) of a ring step.
P4 = 4
CASES = [
    pytest.param(1, 77, 77, 2, 1, 16, False, (20, 0), None, "default", id="left-window"),
    pytest.param(1, 77, 77, 2, 2, 16, False, (-1, 9), None, "default", id="right-window"),
    pytest.param(1, 77, 77, 4, 2, 16, True, (9, 13), None, "default", id="causal-two-sided"),
    pytest.param(1, 61, 61, 4, 2, 32, False, (7, 19), None, "default", id="two-sided-gqa-d32"),
    pytest.param(1, 50, 50, 2, 1, 16, False, (0, 0), None, "default", id="window-0-0"),
    pytest.param(1, 50, 50, 2, 1, 16, True, (0, 0), None, "default", id="causal-window-0-0"),
    pytest.param(1, 130, 130, 2, 1, 16, False, (3, 2), None, "default", id="window-hides-tiles"),
    pytest.param(1, 100, 100, 2, 1, 16, True, (40, -1), None, "default", id="causal-wide-window"),
    pytest.param(1, 77, 77, 2, 1, 16, False, None, "random", "default", id="docs"),
    pytest.param(2, 77, 77, 2, 1, 16, True, None, "random", "default", id="causal-docs-batch2"),
    pytest.param(1, 100, 100, 2, 1, 16, True, None, [0, 1, 2, 50, 51, 100], "default", id="causal-long-docs"),
    pytest.param(1, 100, 100, 2, 1, 16, False, None, [0, 48, 49, 100], "default", id="long-docs"),
    pytest.param(1, 77, 77, 4, 1, 16, False, (6, 4), "random", "default", id="docs-window-mqa"),
    pytest.param(1, 90, 90, 2, 2, 16, True, (25, 0), "random", "default", id="causal-docs-window"),
    pytest.param(1, 40, 77, 4, 2, 16, True, (10, 3), None, "default", id="Sq<Sk-causal-window"),
    pytest.param(1, 40, 77, 2, 1, 16, False, (12, 5), "random", "default", id="Sq<Sk-docs-window"),
    # Sq > Sk: the first queries sit before key 0 and see nothing through the window.
    pytest.param(1, 77, 50, 2, 1, 16, False, (-1, 4), None, "default", id="Sq>Sk-empty-rows"),
    # Ring steps: q and k of different ranks of a layout.
    pytest.param(1, 45, 45, 4, 2, 16, True, (30, 0), "random", (striped(45, P4, 3), striped(45, P4, 1)),
                 id="striped-src<r-causal"),
    pytest.param(1, 45, 45, 4, 2, 16, False, (13, 9), "random", (striped(45, P4, 1), striped(45, P4, 3)),
                 id="striped-src>r-full"),
    pytest.param(1, 48, 48, 2, 1, 16, True, (20, 0), "random", (zigzag(48, 2, 1), zigzag(48, 2, 0)),
                 id="zigzag-r1-src0"),
    pytest.param(1, 48, 48, 2, 1, 16, False, (-1, 30), "random", (zigzag(48, 2, 0), zigzag(48, 2, 1)),
                 id="zigzag-r0-src1"),
    pytest.param(1, 40, 45, 2, 1, 16, True, (10, 0), None, (torch.arange(40) + 45, torch.arange(45)),
                 id="contiguous-previous-rank"),
    pytest.param(1, 40, 45, 2, 1, 16, False, (50, 3), [0, 44, 45, 85],
                 (torch.arange(40, dtype=torch.int32) + 45, torch.arange(45, dtype=torch.int32)),
                 id="int32-positions"),
    # Some rows see no key of this block.
    pytest.param(1, 45, 45, 2, 1, 16, False, (-1, 5), None, (torch.arange(45), torch.arange(45) + 40),
                 id="some-rows-empty-window"),
    pytest.param(1, 45, 40, 2, 1, 16, False, None, [0, 20, 35, 40, 90], (torch.arange(45), torch.arange(40) + 30),
                 id="some-rows-empty-docs"),
    # No row sees any key of this block.
    pytest.param(1, 48, 48, 2, 1, 16, False, (0, 0), None, (striped(48, P4, 0), striped(48, P4, 2)),
                 id="all-empty-window"),
    pytest.param(1, 40, 40, 2, 1, 16, True, None, [0, 40, 80], (torch.arange(40) + 40, torch.arange(40)),
                 id="all-empty-docs"),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,Sq,Sk,H,Hkv,D,causal,window,docs,pos", CASES)
def test_masked_block(B, Sq, Sk, H, Hkv, D, causal, window, docs, pos, dtype):
    q, k, v, dout = make_qkv(B, Sq, Sk, H, Hkv, D, dtype, seed=Sq * 1000 + Sk)
    q_pos, k_pos = (None, None) if pos == "default" else pos
    if docs == "random":
        top = int(max(k_pos.max(), q_pos.max())) + 1 if q_pos is not None else Sk
        docs = random_docs(top, seed=Sq + Sk)
    got, ref, vis = check_case(q, k, v, dout, causal=causal, window=window, cu=docs, q_pos=q_pos, k_pos=k_pos)
    if not vis.any():  # nothing visible at all: O = 0, LSE = -inf, no gradient anywhere
        assert torch.all(got[0] == 0) and torch.all(torch.isneginf(got[1]))
        assert all(torch.all(g == 0) for g in got[2:])


@pytest.mark.quick
def test_masked_block_quick():
    """A fast sample: documents and a two-sided window over ragged tiles, float32."""
    q, k, v, dout = make_qkv(1, 37, 37, 2, 1, 16, torch.float32, seed=5)
    check_case(q, k, v, dout, causal=True, window=(9, 3), cu=[0, 1, 13, 14, 37])


# -- fold into a running result, accumulate over key blocks ---------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_forward_fold_with_masks(dtype, causal):
    """Two calls folding into (out, lse) equal one call over all keys, with a window and
    documents; rows still empty after the first block keep O = 0, LSE = -inf until one sees a key."""
    Sq, Sk, split = 50, 70, 37
    q, k, v, dout = make_qkv(1, Sq, Sk, 2, 1, 16, dtype, seed=3)
    q_pos, k_pos = torch.arange(Sq) + 10, torch.arange(Sk)
    cu = [0, 5, 6, 30, 31, 55, 70]
    window = (12, 2)
    q_doc, k_doc = mask_mod.doc_ids(cu, q_pos), mask_mod.doc_ids(cu, k_pos)
    out = lse = None
    for sl in (slice(split, Sk), slice(0, split)):  # later keys first: some rows start empty
        out, lse = kernels.forward(q, k[:, sl], v[:, sl], q_pos=q_pos, k_pos=k_pos[sl], causal=causal,
                                   window=window, q_doc=q_doc, k_doc=k_doc[sl], out=out, lse=lse)
        if sl.start == split:
            first_empty = ~rule(q_pos, k_pos[sl], causal, window, cu).any(-1)
            assert first_empty.any() and torch.all(out[:, first_empty] == 0)
            assert torch.all(torch.isneginf(lse[:, :, first_empty]))
    ref = reference64(q, k, v, dout, q_pos=q_pos, k_pos=k_pos, causal=causal, window=window, q_doc=q_doc, k_doc=k_doc)
    one = kernels.forward(q, k, v, q_pos=q_pos, k_pos=k_pos, causal=causal, window=window, q_doc=q_doc, k_doc=k_doc)
    assert not torch.isnan(out).any()
    assert_lse(lse, ref[1])
    if dtype == torch.float32:
        assert rel_err(out, ref[0]) < FP32_TOL
    else:
        assert rel_err(out, ref[0]) <= 1.1 * rel_err(one[0], ref[0]) + 1e-6


def test_backward_accumulates_over_key_blocks_with_masks():
    """Per-block backward from the global LSE/delta adds up to the gradient over all keys, with
    a window and documents, on striped positions, into accumulators that already hold values."""
    Sq, Sk, split = 45, 60, 29
    q, k, v, dout = make_qkv(1, Sq, Sk, 4, 2, 16, torch.float32, seed=5)
    q_pos, k_pos = striped(Sq, 2, 1), striped(Sk, 2, 0)
    cu = random_docs(120, seed=9)
    kw = dict(causal=True, window=(17, 0), q_doc=mask_mod.doc_ids(cu, q_pos))
    out, lse = kernels.forward(q, k, v, q_pos=q_pos, k_pos=k_pos, k_doc=mask_mod.doc_ids(cu, k_pos), **kw)
    delta = kernels.backward_delta(out, dout)
    g = torch.Generator().manual_seed(6)
    base = [torch.randn(t.shape, generator=g) for t in (q, k, v)]
    dq, dk, dv = (t.clone() for t in base)
    for sl in (slice(0, split), slice(split, Sk)):
        kernels.backward(dout, q, k[:, sl], v[:, sl], lse, delta, q_pos=q_pos, k_pos=k_pos[sl],
                         k_doc=mask_mod.doc_ids(cu, k_pos[sl]), dq=dq, dk=dk[:, sl], dv=dv[:, sl], **kw)
    ref = reference64(q, k, v, dout, q_pos=q_pos, k_pos=k_pos, k_doc=mask_mod.doc_ids(cu, k_pos), **kw)
    for got, b, r, name in zip((dq, dk, dv), base, ref[2:], ("dq", "dk", "dv")):
        assert_close(got - b, r, None, name, torch.float32)


# -- flash_attention with the Triton backend -------------------------------------------------


@pytest.mark.parametrize(
    "Sq,Sk,causal,window,cu",
    [
        pytest.param(45, 45, True, (7, 0), [0, 1, 20, 21, 45], id="causal-window-docs"),
        pytest.param(45, 45, False, None, torch.tensor([0, 9, 10, 45], dtype=torch.int32), id="docs-tensor"),
        pytest.param(30, 61, False, (5, 8), None, id="Sq<Sk-window"),
    ],
)
def test_flash_attention_triton_with_masks(Sq, Sk, causal, window, cu):
    g = torch.Generator().manual_seed(Sq + Sk)
    q, dout = (torch.randn(1, Sq, 4, 16, generator=g, dtype=torch.float64) for _ in range(2))
    k, v = (torch.randn(1, Sk, 2, 16, generator=g, dtype=torch.float64) for _ in range(2))
    q32, k32, v32 = (t.float().requires_grad_() for t in (q, k, v))
    out, lse = flash_attention(q32, k32, v32, causal=causal, window=window, cu_seqlens=cu,
                               backend="triton", return_lse=True)
    out.backward(dout.float())
    q64, k64, v64 = (t.clone().requires_grad_() for t in (q, k, v))
    ref, ref_lse = reference.attention(q64, k64, v64, causal=causal, window=window, cu_seqlens=cu)
    ref.backward(dout)
    for name, a, b in (("out", out, ref), ("dq", q32.grad, q64.grad), ("dk", k32.grad, k64.grad),
                       ("dv", v32.grad, v64.grad)):
        assert_close(a.detach(), b.detach(), None, name, torch.float32)
    assert_lse(lse, ref_lse)



def _ordered_dq_schedule(ranges_kv, n_q, block_m, slots):
    """Replay the ordered dQ of the Hopper backward (_bwd_dkdv_hopper.py) on the CPU, one query
    tile a program per time step: the grid launches key tile n_k - 1 first, at most ``slots``
    programs run at once (the SMs), a program walks its query tiles [lo, hi) upwards and adds
    into tile m once the counter of m equals its rank there (:func:`attention._dq_order`); an
    addition counts from the next step on (it lands, then counts itself in). Returns (the key
    tiles in the order each query tile took their additions, the steps programs spent waiting);
    fails if the programs stop moving."""
    n_k = ranges_kv.shape[1]
    rank = kernels.attention._dq_order(ranges_kv, n_k, n_q, block_m, ranges_kv.device)
    walks = {n: list(range(int(ranges_kv[0, n, 0]) // block_m, int(ranges_kv[0, n, 3]) // block_m))
             for n in range(n_k)}
    counter, order = [0] * n_q, [[] for _ in range(n_q)]
    waiting, running, launch = 0, [], list(range(n_k - 1, -1, -1))
    while launch or running:
        while launch and len(running) < slots:
            running.append(launch.pop(0))
        added = []
        for n in running:
            if not walks[n]:
                continue
            m = walks[n][0]
            if counter[m] == int(rank[n, m]):
                order[m].append(n)
                added.append(m)
                walks[n].pop(0)
            else:
                waiting += 1
        for m in added:
            counter[m] += 1
        finished = [n for n in running if not walks[n]]
        assert added or finished, f"the ordered dQ stalls: counters {counter}, running {running}"
        running = [n for n in running if walks[n]]
    return order, waiting


@pytest.mark.parametrize("case", ["causal", "full", "window", "docs", "striped step"])
def test_ordered_dq_schedule(case):
    """The order of the ordered dQ's additions (a bitwise-repeatable sum needs one fixed order),
    from the tile ranges the Hopper backward walks: every query tile takes one addition from each
    key tile that sees it, from the last key tile down, and the programs never stop moving,
    whatever number of them runs at once; under a causal mask with every program running, no
    program ever waits (each reaches a query tile one step after the key tile above it did)."""
    require_interpreter()
    block_m, block_n = 64, 128
    S = 1000
    pos = torch.arange(S)
    q_pos = k_pos = pos
    causal, window, docs, cu = case != "full", None, None, None
    if case == "window":
        window = (300, 0)
    if case == "docs":
        cu = random_docs(S, 3)
        docs = mask_mod.doc_ids(torch.tensor(cu), pos).to(torch.int32)
    if case == "striped step":  # a ring step of the striped layout, keys one token later
        q_pos, k_pos = striped(S, 4, 1), striped(S, 4, 2)
    m = kernels.attention._mask_args(q_pos, k_pos, causal, window, docs, docs, S, S, torch.device("cpu"))
    n_q, n_k = math.ceil(S / block_m), math.ceil(S / block_n)
    if case == "full":
        ranges = torch.tensor([[[0, 0, S // block_m * block_m, n_q * block_m]] * n_k], dtype=torch.int32)
    else:
        ranges = kernels.attention._tile_ranges(m, causal, S, S, block_m, block_n, by_keys=True,
                                                device=torch.device("cpu"))
    vis = rule(q_pos, k_pos, causal, window, cu)
    for slots in (1, 3, n_k):
        order, waiting = _ordered_dq_schedule(ranges, n_q, block_m, slots)
        for t in range(n_q):
            seen = vis[t * block_m:(t + 1) * block_m]
            needed = {n for n in range(n_k) if seen[:, n * block_n:(n + 1) * block_n].any()}
            assert needed <= set(order[t]), f"tile {t}: key tiles {needed - set(order[t])} never add"
            assert order[t] == sorted(order[t], reverse=True), f"tile {t}: additions in order {order[t]}"
        if case == "causal" and slots == n_k:
            assert waiting == 0, f"{waiting} steps spent waiting with every program running"


def test_tile_ranges_made_once_for_the_same_attributes(monkeypatch):
    """The tile ranges of a mask are made once while the same position and document tensors
    come back (as the ring's plan hands every layer the same ones), again after those tensors
    change in place, and the results stay those of a fresh computation."""
    require_interpreter()
    A = kernels.attention
    launches = []
    real = A._make_ranges
    monkeypatch.setattr(A, "_make_ranges", lambda *a: launches.append(1) or real(*a))
    S = 200
    q_pos, k_pos = striped(S, 2, 1), striped(S, 2, 0)
    docs = mask_mod.doc_ids(torch.tensor([0, 37, 38, 2 * S]), torch.arange(2 * S))
    q_doc, k_doc = docs[q_pos].to(torch.int32), docs[k_pos].to(torch.int32)
    m = A._mask_args(q_pos, k_pos, True, (50, 0), q_doc, k_doc, S, S, torch.device("cpu"))
    kw = dict(by_keys=True, device=torch.device("cpu"))
    first = A._tile_ranges(m, True, S, S, 64, 128, **kw)
    assert torch.equal(A._tile_ranges(m, True, S, S, 64, 128, **kw), first) and len(launches) == 1
    A._tile_ranges(m, True, S, S, 64, 64, **kw)  # another tiling: made anew
    assert len(launches) == 2
    q_doc[:40] = 5  # changed in place: made anew, as from scratch
    again = A._tile_ranges(m, True, S, S, 64, 128, **kw)
    assert len(launches) == 3
    fresh = A._make_ranges(m, True, S, S, 64, 128, True, torch.device("cpu"), (1, 1, 1))
    assert torch.equal(again, fresh) and not torch.equal(again, first)


def test_per_head_tables_kept_with_their_attributes(monkeypatch):
    """Per-head attributes (the sparse modes': new tensors every call) keep what was made from
    them with the tensors themselves: the backward of a call reuses its forward's row bounds and,
    where the tiling is the same, its tile ranges; nothing outlives the attributes, a change in
    place or other tensors make them anew, and the gradients are those of tables made afresh."""
    require_interpreter()
    import gc
    import weakref

    A = kernels.attention
    made = []
    real_ranges, real_bounds = A._make_ranges, A._row_bounds_kernel
    monkeypatch.setattr(A, "_make_ranges", lambda *a: made.append("ranges") or real_ranges(*a))

    class Counting:
        def __getitem__(self, grid):
            made.append("bounds")
            return real_bounds[grid]

    monkeypatch.setattr(A, "_row_bounds_kernel", Counting())
    B, S, H, Hkv, D = 1, 96, 2, 1, 32
    torch.manual_seed(3)
    q, k, v = (torch.randn(B, S, n, D) for n in (H, Hkv, Hkv))
    dout = torch.randn(B, S, H, D)
    pos = torch.arange(S)
    q_pos, k_pos = pos.expand(B, H, S).contiguous(), pos.expand(B, Hkv, S).contiguous()
    q_doc = (torch.arange(S).expand(B, H, S) // 40).to(torch.int32).contiguous()
    k_doc = (torch.arange(S).expand(B, Hkv, S) // 40).to(torch.int32).contiguous()
    kw = dict(q_pos=q_pos, k_pos=k_pos, q_doc=q_doc, k_doc=k_doc, causal=True)
    out, lse = kernels.forward(q, k, v, **kw)
    delta = kernels.backward_delta(out, dout)
    n_fwd = len(made)
    assert made.count("bounds") == 1
    grads = kernels.backward(dout, q, k, v, lse, delta, **kw)
    assert made[n_fwd:].count("bounds") == 0, "the backward made the row bounds again"
    # the same attributes as other tensors: made anew, with the same gradients
    kw2 = {name: t.clone() for name, t in kw.items() if name != "causal"}
    n = len(made)
    again = kernels.backward(dout, q, k, v, lse, delta, causal=True, **kw2)
    assert made[n:].count("bounds") == 1
    for a, b in zip(grads, again):
        assert torch.equal(a, b)
    q_doc[:, :, :10] = 7  # changed in place: made anew
    n = len(made)
    kernels.forward(q, k, v, **kw)
    assert made[n:].count("bounds") == 1
    probe = weakref.ref(kw2["q_pos"])
    del kw2, again
    gc.collect()
    assert probe() is None, "what was made from the attributes keeps them alive"


def _runs_of(vis: torch.Tensor) -> torch.Tensor:
    """(..., Sq, 2): each row's [first, end) of its visible keys, (0, 0) for a row with none; and
    asserts that every row's visible keys are one run (what the row bounds rely on)."""
    idx = torch.arange(vis.shape[-1])
    n = vis.sum(-1)
    first = torch.where(n > 0, torch.where(vis, idx, vis.shape[-1]).amin(-1), 0)
    end = torch.where(n > 0, torch.where(vis, idx, -1).amax(-1) + 1, 0)
    assert torch.equal(end - first, n), "a row's visible keys are not one run"
    return torch.stack([first, end], -1)


def _bounds_as_runs(bounds: torch.Tensor) -> torch.Tensor:
    """The kernel's bounds with every empty run written (0, 0), as _runs_of writes it."""
    empty = bounds[..., 1] <= bounds[..., 0]
    return torch.where(empty[..., None], 0, bounds.long())


ROW_BOUND_MASKS = [(causal, window, docs) for causal, window in [(True, None), (True, (5, -1)), (False, (7, 3)),
                                                                  (False, (-1, 4)), (True, (0, 0)), (False, None)]
                   for docs in (False, True) if causal or window or docs]  # full attention has no ranges


@pytest.mark.parametrize("layout", ["contiguous", "striped", "zigzag"])
@pytest.mark.parametrize("causal,window,docs", ROW_BOUND_MASKS)
def test_row_bounds_are_each_rows_visible_keys(layout, causal, window, docs):
    """The Hopper forward's row bounds (``_row_bounds``, HOPPER_FWD_ROW_BOUNDS): for one ring step's
    query and key blocks of every layout, each row's [first, end) equals its visible keys under
    the rule stated by brute force (1-token documents, rows that see nothing included)."""
    from ringflash.kernels import attention as A

    L, P, rng = 32, 3, random.Random(7)
    S = L * P
    positions = {"contiguous": lambda r: torch.arange(r * L, (r + 1) * L),
                 "striped": lambda r: striped(L, P, r), "zigzag": lambda r: zigzag(L, P, r)}[layout]
    q_pos, k_pos = positions(2), positions(1)
    cu = sorted({0, S, 40, 41, *rng.sample(range(1, S), 4)}) if docs else None
    q_doc = mask_mod.doc_ids(cu, q_pos) if docs else None
    k_doc = mask_mod.doc_ids(cu, k_pos) if docs else None
    m = A._mask_args(q_pos, k_pos, causal, window, q_doc, k_doc, len(q_pos), len(k_pos), torch.device("cpu"))
    got = A._row_bounds(m, causal, len(q_pos), len(k_pos), device=torch.device("cpu"))
    want = _runs_of(rule(q_pos, k_pos, causal, window, cu))
    assert torch.equal(_bounds_as_runs(got[0]), want)


@pytest.mark.parametrize("window", [None, (6, -1)])
def test_row_bounds_per_head(window):
    """Per-head attributes (hash buckets, sorted per head as the sparse modes pass them, GQA):
    the bounds of every (batch, head) row are its visible keys."""
    from ringflash import sparse as sp
    from ringflash.kernels import attention as A

    B, H, Hkv, S, nb = 2, 4, 2, 50, 3
    g = torch.Generator().manual_seed(3)
    qb = torch.randint(0, nb, (B, S, H), generator=g, dtype=torch.int32)
    kb = torch.randint(0, nb, (B, S, Hkv), generator=g, dtype=torch.int32)
    pos = torch.arange(S)
    qc, qcd, kc, kcd = sp.composite(sp.HashSparse(qb, kb, nb), pos, pos, None, None, 1)
    qo, ko = sp.sort_order(qc)[0], sp.sort_order(kc)[0]
    qc, qcd = torch.gather(qc, -1, qo), torch.gather(qcd, -1, qo)
    kc, kcd = torch.gather(kc, -1, ko), torch.gather(kcd, -1, ko)
    m = A._mask_args(qc, kc, True, window, qcd, kcd, S, S, torch.device("cpu"), shape=(B, H, Hkv))
    got = A._row_bounds(m, True, S, S, device=torch.device("cpu"), heads=(B, H, H // Hkv))
    qp, kp = (qc & 0x7FFFFFFF)[..., :, None], (kc & 0x7FFFFFFF).repeat_interleave(H // Hkv, 1)[..., None, :]
    vis = (qcd[..., :, None] == kcd.repeat_interleave(H // Hkv, 1)[..., None, :]) & (kp <= qp)
    if window is not None:
        vis &= kp >= qp - window[0]
    assert torch.equal(_bounds_as_runs(got.view(B, H, S, 2)), _runs_of(vis))


def _hash_case(B, H, Hkv, S, nb, seed):
    """Per-head hash-bucket attributes sorted per head, as the sparse modes pass them, and the
    tokens gathered into that order."""
    from ringflash import sparse as sp

    g = torch.Generator().manual_seed(seed)
    qb = torch.randint(0, nb, (B, S, H), generator=g, dtype=torch.int32)
    kb = torch.randint(0, nb, (B, S, Hkv), generator=g, dtype=torch.int32)
    pos = torch.arange(S)
    qc, qcd, kc, kcd = sp.composite(sp.HashSparse(qb, kb, nb), pos, pos, None, None, 1)
    qo, ko = sp.sort_order(qc)[0], sp.sort_order(kc)[0]
    attrs = dict(q_pos=torch.gather(qc, -1, qo), q_doc=torch.gather(qcd, -1, qo),
                 k_pos=torch.gather(kc, -1, ko), k_doc=torch.gather(kcd, -1, ko))
    return qo, ko, attrs


@pytest.mark.parametrize("case", ["docs_striped", "window_two_sided", "docs_window_fold", "hash_gqa"])
def test_triton_row_bounds_bitwise(case, monkeypatch):
    """The Triton forward and backward with boundary tiles masked by each row's run of visible
    keys (``ROW_BOUNDS``, the default) give bitwise the results of the per-tile rule: O, LSE,
    dQ, dK, dV, float32, under the interpreter, within 1e-5 of float64 attention (the fold case:
    bitwise only); and the bounds are really what the launches took."""
    from ringflash import sparse as sp
    from ringflash.kernels import attention as A

    torch.manual_seed(5)
    B, H, Hkv, L, P = 1, 2, 1, 70, 3
    causal, fold = True, False
    if case == "hash_gqa":
        B, H, Hkv = 2, 4, 2
    q, k, v = (torch.randn(B, L, n, 16) for n in (H, Hkv, Hkv))
    do = torch.randn(B, L, H, 16)
    kw = {}
    if case == "docs_striped":
        q_pos, k_pos = striped(L, P, 2), striped(L, P, 0)
        cu = [0, 1, 90, 91, 150, L * P]
        kw = dict(q_pos=q_pos, k_pos=k_pos, q_doc=mask_mod.doc_ids(cu, q_pos), k_doc=mask_mod.doc_ids(cu, k_pos))
    elif case == "window_two_sided":
        causal, kw = False, dict(window=(9, 5))
    elif case == "docs_window_fold":
        d = mask_mod.doc_ids([0, 33, 34, L], torch.arange(L))
        fold, kw = True, dict(q_doc=d, k_doc=d, window=(20, 0))
    else:
        qo, ko, kw = _hash_case(B, H, Hkv, L, 3, 11)
        q, k, v, do = sp.gather_tokens(q, qo), sp.gather_tokens(k, ko), sp.gather_tokens(v, ko), sp.gather_tokens(do, qo)
    made = []
    make = A._row_bounds
    monkeypatch.setattr(A, "_row_bounds", lambda *a, **k_: made.append(1) or make(*a, **k_))
    results = []
    for on in (False, True):
        monkeypatch.setattr(A, "ROW_BOUNDS", on)
        if fold:
            out, lse = kernels.forward(q, k, v, causal=causal, **kw)  # a first block, then this one folded in
            kernels.forward(q, k, v, causal=causal, out=out, lse=lse, **kw)
        else:
            out, lse = kernels.forward(q, k, v, causal=causal, **kw)
        grads = kernels.backward(do, q, k, v, lse, kernels.backward_delta(out, do), causal=causal, **kw)
        results.append((out, lse, *grads))
    assert made, "the launches did not take row bounds"
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), *results):
        assert torch.equal(a, b), f"{name} differs with row bounds"
        assert not a.isnan().any(), name
    if not fold:  # and both against float64 attention under the same rule
        ref, ref_lse = reference.forward(q.double(), k.double(), v.double(), causal=causal, **kw)
        want = reference.backward(do.double(), q.double(), k.double(), v.double(), ref_lse,
                                  reference.backward_delta(ref, do.double()), causal=causal, **kw)
        for name, got, r in zip(("out", "dq", "dk", "dv"), (results[1][0], *results[1][2:]), (ref, *want)):
            assert rel_err(got, r) < FP32_TOL, f"{name}: {rel_err(got, r):.2e}"
