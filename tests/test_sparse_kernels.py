"""The Triton kernels with the sparse masks of :mod:`ringflash.sparse`, under Triton's CPU interpreter.

Block patterns: the forward (out, LSE) and the backward (dq, dk, dv) of one block pair, as the ring
and ``flash_attention`` call them, with the positions of ring steps of every layout (contiguous,
striped, zigzag; ``blocks=`` and 1-D positions), causal or full, with packed documents and
windows, against ``reference.forward`` / ``reference.backward`` in float64 with the same pattern.
That oracle is checked, per case, against softmax attention under a mask built here from the
rule (``pattern[q // bs, k // bs]`` with the other rules). Blocks smaller than the interpreter's
tiles (32 x 16 and 16 x 32) and larger than them, aligned and not, rows that see nothing, a
pattern that hides everything.

QK-dropping and hashing: tokens sorted per head (``sparse.composite`` and ``sparse.sort_order``,
as ``sparse.run_sorted`` does), the kernels given per-head positions and document ids (B, H, S);
against ``reference.forward`` / ``reference.backward`` with the same attributes, and, back in the
caller's order, against ``reference.attention(sparsity=)`` and the hand-built mask.

``flash_attention(backend="triton", sparsity=...)``: each mode end to end, gradients included.
The ring over these kernels (P = 2, each mode) runs in the spawn of tests/test_sparse.py
(``test_ring_sparse_with_triton_kernels_interpreted``).

Bars: float32 within 1e-5 (relative) of float64; float16 within 2x of PyTorch attention run in
float16 under the same mask. As in tests/test_kernels_masks.py, no bfloat16: the interpreter
computes ``tl.dot`` on it wrongly.
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
from ringflash import sparse as sp  # noqa: E402
from ringflash.sparse import BlockSparse, HashSparse, QKDrop  # noqa: E402

require_interpreter()

# log(0) of a row that stays empty is the intended -inf; numpy warns about it.
pytestmark = pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")

FP32_TOL = 1e-5
LOWP_FACTOR = 2.0
NAMES = ("out", "lse", "dq", "dk", "dv")


# -- the rule, the oracles ------------------------------------------------------------------


def pattern_rule(pattern: BlockSparse, q_pos, k_pos):
    """(Sq, Sk): the pattern's block pair of every (query, key) pair."""
    return pattern.pattern[q_pos.long() // pattern.block_size][:, k_pos.long() // pattern.block_size]


def token_rule(sparsity, heads_kv):
    """(B, H, Sq, Sk): both kept (QK-dropping), or equal bucket ids (query head h, K/V head h // G)."""
    q, k = (sparsity.q_keep, sparsity.k_keep) if isinstance(sparsity, QKDrop) else (
        sparsity.q_buckets, sparsity.k_buckets)
    k = k.repeat_interleave(q.shape[2] // heads_kv, dim=2)
    q, k = q.permute(0, 2, 1)[..., :, None], k.permute(0, 2, 1)[..., None, :]
    return (q & k) if q.dtype == torch.bool else (q == k)


def softmax_attention(q, k, v, dout, vis):
    """Softmax attention under ``vis`` (broadcasting to (B, H, Sq, Sk)) in q's dtype, by autograd:
    out, lse, dq, dk, dv. Rows that see no key: O = 0, LSE = -inf, no gradient."""
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    G = q.shape[2] // k.shape[2]
    kr, vr = k.repeat_interleave(G, dim=2), v.repeat_interleave(G, dim=2)
    s = torch.einsum("bqhd,bkhd->bhqk", q, kr) / math.sqrt(q.shape[-1])
    vis = vis.expand(s.shape)
    has = vis.any(-1, keepdim=True)
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


def run_kernels(q, k, v, dout, **mask):
    out, lse = kernels.forward(q, k, v, **mask)
    delta = kernels.backward_delta(out.to(q.dtype), dout)
    dq, dk, dv = kernels.backward(dout, q, k, v, lse, delta, **mask)
    return out, lse, dq, dk, dv


def rel_err(x, ref):
    x, ref = x.double(), ref.double()
    return ((x - ref).norm() / ref.norm()).item()


def assert_close(got, ref, lowp, name, dtype):
    assert not torch.isnan(got).any(), f"{name} has NaN"
    if ref.norm() < 1e-9:  # zero up to float64 rounding: nothing to be relative to
        err = (got.double() - ref).abs().max().item()
        assert err < 1e-5, f"{name}: |x| up to {err:.2e} where float64 gives 0"
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


def check(got, ref, naive, lowp, dtype):
    """Kernels against float64, and the float64 oracle against the hand-built mask."""
    for r, n, name in zip(ref, naive, NAMES):
        if name == "lse":
            assert torch.equal(torch.isneginf(r), torch.isneginf(n)), "reference LSE: other empty rows"
        else:
            assert (r - n).abs().max() < 1e-10, f"reference.{name} disagrees with the rule"
    for t, name in zip(got, NAMES):
        assert t.dtype == torch.float32, f"{name} must be float32, got {t.dtype}"
    assert_lse(got[1], ref[1])
    for i in (0, 2, 3, 4):
        assert_close(got[i], ref[i], None if lowp is None else lowp[i], NAMES[i], dtype)
    # Rows that see no key: O = 0 and no gradient, exactly.
    empty = torch.isneginf(ref[1]).transpose(1, 2)  # (B, Sq, H)
    assert torch.all(got[0][empty] == 0) and torch.all(got[2][empty] == 0)


def random_docs(seqlen, seed):
    """Random document boundaries over [0, seqlen), with a 1-token document."""
    g = random.Random(seed)
    cuts = set(g.sample(range(1, seqlen), k=max(1, seqlen // 9)))
    c = g.randrange(1, seqlen - 1)
    return [0, *sorted(cuts | {c, c + 1}), seqlen]


# -- block patterns, one block pair -----------------------------------------------------------


def random_pattern(seqlen, block_size, density, seed, *, empty_rows=0):
    g = torch.Generator().manual_seed(seed)
    assert seqlen % block_size == 0
    nb = seqlen // block_size
    p = torch.rand(nb, nb, generator=g) < density
    p[torch.randperm(nb, generator=g)[:empty_rows]] = False
    return BlockSparse(p, block_size)


# (S = global length, positions, block size, pattern, causal, window, documents). Positions: None
# (one device, 0..S-1 for queries and keys, not passed to the kernels), ("default", Sq) (fewer
# queries, bottom-right aligned, not passed), or (q_pos, k_pos) of a ring step at P = 2 or 4 (rank
# r's queries, rank src's keys). Pattern: a density of random blocks, "helper" (a local window of
# 2 blocks, 1 global, 1 random) or "empty-rows" (a third of the rows keep nothing).
P4 = 4
BLOCK_CASES = [
    # One device: query and key tiles on the diagonal; blocks of 8 (smaller than a tile).
    pytest.param(48, None, 8, 0.4, True, None, None, id="diag-bs8-causal"),
    pytest.param(48, None, 8, "helper", False, None, None, id="diag-bs8-helper-full"),
    # Blocks of 24: tiles inside one block (fully visible tiles), others straddling two.
    pytest.param(72, None, 24, 0.5, False, None, "random", id="diag-bs24-docs"),
    pytest.param(48, None, 4, 0.5, False, (9, 3), None, id="diag-bs4-window"),
    # Contiguous ring steps; blocks of 16 straddle the shards, blocks of 10 do not.
    pytest.param(80, (torch.arange(40, 80), torch.arange(40)), 16, 0.5, True, None, None, id="contiguous-prev-rank"),
    pytest.param(80, (torch.arange(40), torch.arange(40, 80)), 10, 0.5, False, (-1, 30), "random",
                 id="contiguous-next-rank-window-docs"),
    # Striped ring steps: every tile touches many blocks.
    pytest.param(160, (striped(40, P4, 3), striped(40, P4, 1)), 10, 0.3, True, None, "random",
                 id="striped-causal-docs"),
    pytest.param(160, (striped(40, P4, 1), striped(40, P4, 2)), 16, "helper", False, None, None, id="striped-helper"),
    # A zigzag ring step.
    pytest.param(96, (zigzag(48, 2, 1), zigzag(48, 2, 0)), 6, 0.4, True, (20, 0), None, id="zigzag-causal-window"),
    # Fewer queries than keys.
    pytest.param(48, ("default", 30), 8, 0.5, True, None, None, id="Sq<Sk-default-positions"),
    # Rows that see nothing; then nothing at all.
    pytest.param(64, None, 8, "empty-rows", False, None, None, id="empty-rows"),
    pytest.param(64, None, 16, 0.0, True, None, None, id="nothing-visible"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("S,positions,bs,density,causal,window,docs", BLOCK_CASES)
def test_block_sparse_block_pair(S, positions, bs, density, causal, window, docs, dtype):
    seed = S * 31 + bs
    if density == "helper":
        pattern = sp.block_pattern(S, bs, local=2, global_=1, random=1, seed=seed, causal=causal)
    elif density == "empty-rows":
        pattern = random_pattern(S, bs, 0.6, seed, empty_rows=(S // bs) // 3)
    else:
        pattern = random_pattern(S, bs, density, seed)
    given = positions is not None and not isinstance(positions[0], str)
    if positions is None:
        q_pos = k_pos = torch.arange(S)
    elif not given:
        q_pos, k_pos = reference.default_positions(positions[1], S)
    else:
        q_pos, k_pos = positions
    q, k, v, dout = make_qkv(1 if given else 2, len(q_pos), len(k_pos), 4, 2, 16, dtype, seed=seed)
    cu = random_docs(S, seed) if docs == "random" else None
    kw = dict(causal=causal, window=window, blocks=pattern)
    if cu is not None:
        kw.update(q_doc=mask_mod.doc_ids(cu, q_pos), k_doc=mask_mod.doc_ids(cu, k_pos))
    got = run_kernels(q, k, v, dout, **(dict(kw, q_pos=q_pos, k_pos=k_pos) if given else kw))
    ref = reference64(q, k, v, dout, q_pos=q_pos, k_pos=k_pos, **kw)
    vis = rule(q_pos, k_pos, causal, window, cu) & pattern_rule(pattern, q_pos, k_pos)
    naive = softmax_attention(*(t.double() for t in (q, k, v, dout)), vis)
    lowp = softmax_attention(q, k, v, dout, vis) if dtype != torch.float32 else None
    check(got, ref, naive, lowp, dtype)
    if density == 0.0:
        assert not vis.any() and torch.all(got[0] == 0) and all(torch.all(g == 0) for g in got[2:])
    else:
        assert vis.any() and (rule(q_pos, k_pos, causal, window, cu) & ~vis).any()  # the pattern hides pairs


def test_block_sparse_fold_and_accumulate():
    """Two key blocks of a striped ring folded into one (out, LSE), and their backward added into
    accumulators that already hold values, equal one call over all keys (float32)."""
    S, L = 96, 48
    q_pos, k0, k1 = striped(L, 2, 1), striped(L, 2, 1), striped(L, 2, 0)
    pattern = random_pattern(S, 6, 0.4, seed=3)
    q, k, v, dout = make_qkv(1, L, 2 * L, 2, 1, 16, torch.float32, seed=4)
    k_pos = torch.cat([k0, k1])
    kw = dict(causal=True, blocks=pattern)
    out = lse = None
    for sl, kp in ((slice(L, 2 * L), k1), (slice(0, L), k0)):
        out, lse = kernels.forward(q, k[:, sl], v[:, sl], q_pos=q_pos, k_pos=kp, out=out, lse=lse, **kw)
    ref = reference64(q, k, v, dout, q_pos=q_pos, k_pos=k_pos, **kw)
    assert_lse(lse, ref[1])
    assert_close(out, ref[0], None, "out", torch.float32)
    delta = kernels.backward_delta(out, dout)
    g = torch.Generator().manual_seed(6)
    base = [torch.randn(t.shape, generator=g) for t in (q, k, v)]
    dq, dk, dv = (t.clone() for t in base)
    for sl, kp in ((slice(0, L), k0), (slice(L, 2 * L), k1)):
        kernels.backward(dout, q, k[:, sl], v[:, sl], lse, delta, q_pos=q_pos, k_pos=kp, dq=dq, dk=dk[:, sl],
                         dv=dv[:, sl], **kw)
    for got, b, r, name in zip((dq, dk, dv), base, ref[2:], ("dq", "dk", "dv")):
        assert_close(got - b, r, None, name, torch.float32)


def test_block_pattern_with_per_head_positions_is_refused():
    q, k, v, _ = make_qkv(1, 16, 16, 2, 1, 16, torch.float32)
    pos = torch.arange(16).expand(1, 2, 16).contiguous()
    with pytest.raises(ValueError, match="per-head"):
        kernels.forward(q, k, v, q_pos=pos, k_pos=pos[:, :1], q_doc=pos.int(), k_doc=pos[:, :1].int(),
                        blocks=sp.local_blocks(16, 4, 1))


# -- QK-dropping and hashing: per-head attributes of sorted tokens -----------------------------


def token_sparsity(mode, B, Sq, Sk, H, Hkv, seed):
    g = torch.Generator().manual_seed(seed)
    if mode == "qkdrop":
        return QKDrop(torch.rand(B, Sq, H, generator=g) > 0.4, torch.rand(B, Sk, Hkv, generator=g) > 0.4)
    return HashSparse(torch.randint(0, 3, (B, Sq, H), generator=g, dtype=torch.int32),
                      torch.randint(0, 3, (B, Sk, Hkv), generator=g, dtype=torch.int32), 3)


# (mode, q_pos, k_pos (None: one device, 0..S-1), causal, window, documents over the global S)
TOKEN_CASES = [
    pytest.param("qkdrop", None, None, True, None, False, id="qkdrop-causal"),
    pytest.param("qkdrop", None, None, False, None, True, id="qkdrop-full-docs"),
    pytest.param("hash", None, None, True, (12, 0), True, id="hash-causal-window-docs"),
    pytest.param("hash", None, None, False, None, False, id="hash-full"),
    # Ring steps: rank r's queries against rank src's keys.
    pytest.param("qkdrop", striped(40, 2, 1), striped(40, 2, 0), True, None, True, id="qkdrop-striped-step-docs"),
    pytest.param("hash", zigzag(40, 2, 0), zigzag(40, 2, 1), True, None, False, id="hash-zigzag-step"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("mode,q_pos,k_pos,causal,window,docs", TOKEN_CASES)
def test_token_sparsity_per_head_attributes(mode, q_pos, k_pos, causal, window, docs, dtype):
    B, H, Hkv = 2, 4, 2
    if q_pos is None:
        q_pos = k_pos = torch.arange(56)
    S = int(max(q_pos.max(), k_pos.max())) + 1
    seed = len(q_pos) * 7 + int(causal) + (3 if docs else 0)
    q, k, v, dout = make_qkv(B, len(q_pos), len(k_pos), H, Hkv, 16, dtype, seed=seed)
    sparsity = token_sparsity(mode, B, len(q_pos), len(k_pos), H, Hkv, seed)
    cu = random_docs(S, seed) if docs else None
    q_doc = k_doc = None
    if cu is not None:
        q_doc, k_doc = mask_mod.doc_ids(cu, q_pos), mask_mod.doc_ids(cu, k_pos)
    n_docs = 1 if cu is None else len(cu) - 1
    # As run_sorted: composite attributes, every head's tokens sorted by them.
    q_c, q_d, k_c, k_d = sp.composite(sparsity, q_pos, k_pos, q_doc, k_doc, n_docs)
    q_order, q_inverse = sp.sort_order(q_c)
    k_order, _ = sp.sort_order(k_c)
    attrs = dict(q_pos=torch.gather(q_c, -1, q_order), q_doc=torch.gather(q_d, -1, q_order),
                 k_pos=torch.gather(k_c, -1, k_order), k_doc=torch.gather(k_d, -1, k_order))
    qs, ks, vs = sp.gather_tokens(q, q_order), sp.gather_tokens(k, k_order), sp.gather_tokens(v, k_order)
    dos = sp.gather_tokens(dout, q_order)
    got = run_kernels(qs, ks, vs, dos, causal=causal, window=window, **attrs)
    ref = reference64(qs, ks, vs, dos, causal=causal, window=window, **attrs)
    # The hand-built mask, in the caller's order, then sorted like the tokens.
    vis = rule(q_pos, k_pos, causal, window, cu) & token_rule(sparsity, Hkv)  # (B, H, Sq, Sk)
    G = H // Hkv
    k_order_q = k_order.repeat_interleave(G, dim=1)  # each query head's K/V head's order
    vis_sorted = torch.gather(torch.gather(vis, 2, q_order[..., None].expand_as(vis)), 3,
                              k_order_q[:, :, None, :].expand_as(vis))
    naive = softmax_attention(*(t.double() for t in (qs, ks, vs, dos)), vis_sorted)
    lowp = softmax_attention(qs, ks, vs, dos, vis_sorted) if dtype != torch.float32 else None
    check(got, ref, naive, lowp, dtype)
    assert (rule(q_pos, k_pos, causal, window, cu) & ~vis).any()  # the mode hides pairs
    if mode == "qkdrop":  # dropped queries see nothing
        dropped = ~sparsity.q_keep.transpose(1, 2)  # (B, H, Sq), caller's order
        assert torch.all(torch.isneginf(torch.gather(got[1], -1, q_inverse)[dropped]))
    # Back in the caller's order: the oracle of the whole call.
    out = sp.gather_tokens(got[0], q_inverse)
    oracle, lse = reference.attention(*(t.double() for t in (q, k, v)), causal=causal, window=window, q_pos=q_pos,
                                      k_pos=k_pos, cu_seqlens=cu, sparsity=sparsity)
    if dtype == torch.float32:
        assert rel_err(out, oracle) < FP32_TOL
    assert torch.equal(torch.isneginf(torch.gather(got[1], -1, q_inverse)), torch.isneginf(lse))


# -- flash_attention with the Triton backend --------------------------------------------------


@pytest.mark.quick
@pytest.mark.parametrize(
    "mode,causal,docs",
    [
        pytest.param("block", True, True, id="block-causal-docs"),
        pytest.param("qkdrop", True, False, id="qkdrop-causal"),
        pytest.param("hash", False, True, id="hash-full-docs"),
    ],
)
def test_flash_attention_triton_sparse(mode, causal, docs):
    """Each mode through flash_attention(backend="triton"): out, LSE and gradients in the
    caller's order against float64 ``reference.attention`` with the same mode (float32)."""
    S, B, H, Hkv = 44, 1, 4, 2
    g = torch.Generator().manual_seed(S + len(mode))
    q, dout = (torch.randn(B, S, H, 16, generator=g, dtype=torch.float64) for _ in range(2))
    k, v = (torch.randn(B, S, Hkv, 16, generator=g, dtype=torch.float64) for _ in range(2))
    if mode == "block":
        sparsity = sp.block_pattern(S, 4, local=2, global_=1, random=1, seed=2, causal=causal)
    else:
        sparsity = token_sparsity(mode, B, S, S, H, Hkv, seed=S)
    cu = random_docs(S, 5) if docs else None
    q32, k32, v32 = (t.float().requires_grad_() for t in (q, k, v))
    out, lse = flash_attention(q32, k32, v32, causal=causal, cu_seqlens=cu, sparsity=sparsity, backend="triton",
                               return_lse=True)
    out.backward(dout.float())
    q64, k64, v64 = (t.clone().requires_grad_() for t in (q, k, v))
    ref, ref_lse = reference.attention(q64, k64, v64, causal=causal, cu_seqlens=cu, sparsity=sparsity)
    ref.backward(dout)
    for name, a, b in (("out", out, ref), ("dq", q32.grad, q64.grad), ("dk", k32.grad, k64.grad),
                       ("dv", v32.grad, v64.grad)):
        assert_close(a.detach(), b.detach(), None, name, torch.float32)
    assert_lse(lse, ref_lse)


@pytest.mark.parametrize("mode", ["hash", "hash_docs", "qkdrop", "qkdrop_docs"])
def test_composite_attributes_are_rows(mode):
    """Composite positions come out as one contiguous row per head (B, heads, S) with the values
    ``composite document << 31 | position``: the kernels would copy strided attributes at every
    call (twice per ring step)."""
    B, S, H, Hkv = 2, 50, 4, 2
    g = torch.Generator().manual_seed(3)
    pos = torch.arange(S) + 7
    doc = (torch.arange(S) >= 20).to(torch.int32) + (torch.arange(S) >= 31).to(torch.int32)
    docs = doc if mode.endswith("docs") else None
    if mode.startswith("hash"):
        m = sp.HashSparse(torch.randint(0, 5, (B, S, H), generator=g, dtype=torch.int32),
                          torch.randint(0, 5, (B, S, Hkv), generator=g, dtype=torch.int32), 5)
        want_q = m.q_buckets.long() * 3 + (0 if docs is None else docs.long()[None, :, None])
    else:
        m = sp.QKDrop(torch.rand(B, S, H, generator=g) > 0.5, torch.rand(B, S, Hkv, generator=g) > 0.5)
        want_q = torch.where(m.q_keep, 0 if docs is None else docs.long()[None, :, None], 2**30)
    q_cpos, k_cpos = sp.composite_positions(m, pos, pos, docs, docs, 3)
    assert q_cpos.shape == (B, H, S) and k_cpos.shape == (B, Hkv, S)
    assert q_cpos.is_contiguous() and k_cpos.is_contiguous()
    assert torch.equal(q_cpos, (want_q.transpose(1, 2) << 31) | pos)


@pytest.mark.parametrize("mode", ["hash", "hash_docs", "qkdrop", "qkdrop_docs", "hash1", "hash_gqa_odd", "hash_short_q"])
def test_counting_sort_matches_sort(mode):
    """``kernels.tokens.sort_tokens`` (one launch: a stable counting sort by bucket) gives
    ``run_sorted`` exactly what two PyTorch sorts of the composite positions give: the
    permutations, the inverse and the sorted composite positions and documents; the order keeps
    the call's token order inside a bucket and puts dropped tokens last."""
    from ringflash.kernels.tokens import sort_tokens

    B, S, H, Hkv, nb = (2, 77, 4, 2, 5) if mode != "hash_gqa_odd" else (3, 129, 6, 1, 19)
    nb = 1 if mode == "hash1" else nb
    Sq = 20 if mode == "hash_short_q" else S  # fewer queries than keys: the last ones
    g = torch.Generator().manual_seed(len(mode))
    pos = torch.arange(S) * 2 + 3  # increasing, not 0..S-1: a rank's positions in a layout
    q_pos = pos[S - Sq:]
    cu = [0, 1, 9, 10, 40, S] if mode.endswith("docs") else [0, S]
    doc = torch.repeat_interleave(torch.arange(len(cu) - 1), torch.tensor(cu).diff()).to(torch.int32)
    docs = doc if mode.endswith("docs") else None
    if mode.startswith("hash"):
        m = sp.HashSparse(torch.randint(0, nb, (B, Sq, H), generator=g, dtype=torch.int32),
                          torch.randint(0, nb, (B, S, Hkv), generator=g), nb)
        got = sort_tokens(m.q_buckets, m.k_buckets, nb, q_pos, pos, docs, docs, len(cu) - 1)
    else:
        m = sp.QKDrop(torch.rand(B, S, H, generator=g) > 0.5, torch.rand(B, S, Hkv, generator=g) > 0.5)
        got = sort_tokens(m.q_keep, m.k_keep, 2, pos, pos, docs, docs, len(cu) - 1, drop=(2**30, 2**30 + 1))
    q_cpos, k_cpos = sp.composite_positions(m, q_pos, pos, docs, docs, len(cu) - 1)
    (q_sorted, q_order), (k_sorted, k_order) = torch.sort(q_cpos, -1), torch.sort(k_cpos, -1)
    want = (q_order, sp._inverse(q_order), q_sorted, (q_sorted >> 31).int(), k_order, sp._inverse(k_order), k_sorted,
            (k_sorted >> 31).int())
    names = ("q_order", "q_inverse", "q_cpos", "q_cdoc", "k_order", "k_inverse", "k_cpos", "k_cdoc")
    for name, a, b in zip(names, got, want):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert torch.equal(a, b), name


def test_many_buckets_sort_with_pytorch():
    """On a GPU the counting sort takes up to MAX_BUCKETS buckets and PyTorch's sort the rest (and
    every CPU call); the PyTorch path with more buckets still matches the float64 reference."""
    import types

    from ringflash.kernels.tokens import MAX_BUCKETS

    B, S, H, nb = 1, 40, 2, MAX_BUCKETS + 1
    g = torch.Generator().manual_seed(5)
    q, k, v, dout = (torch.randn(B, S, H, 16, generator=g) for _ in range(4))
    ids = [torch.randint(0, 3, (B, S, H), generator=g) * (MAX_BUCKETS // 2) for _ in range(2)]  # up to 32
    many, fits = sp.HashSparse(*ids, nb), sp.HashSparse(*ids, MAX_BUCKETS)
    on_gpu = types.SimpleNamespace(device=torch.device("cuda", 0))
    assert sp._sorts_on_device(fits, on_gpu) and not sp._sorts_on_device(many, on_gpu)
    assert sp._sorts_on_device(QKDrop(ids[0] > 0, ids[1] > 0), on_gpu)
    assert not sp._sorts_on_device(fits, q) and not sp._moves_on_device(q)  # the CPU: PyTorch's path
    qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
    out = flash_attention(qq, kk, vv, causal=True, sparsity=many, backend="triton")
    out.backward(dout)
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    ref = reference.attention(q64, k64, v64, causal=True, sparsity=many)[0]
    ref.backward(dout.double())
    for name, a, b in (("out", out, ref), ("dq", qq.grad, q64.grad), ("dk", kk.grad, k64.grad), ("dv", vv.grad, v64.grad)):
        assert_close(a.detach(), b.detach(), None, name, torch.float32)


def test_permute_tokens_output_and_lse():
    """``sparse._Permute`` (``kernels.tokens.permute_tokens``) of one tensor with the LSE (the
    output's move back): rows move per head as ``gather_tokens`` moves them, on a strided input,
    the LSE alongside without a gradient; the gradient is ``torch.gather``'s."""
    B, S, H, D = 2, 37, 3, 24
    g = torch.Generator().manual_seed(11)
    order = torch.stack([torch.randperm(S, generator=g) for _ in range(B * H)]).view(B, H, S)
    inverse = sp._inverse(order)
    lse = torch.randn(B, H, S, generator=g)
    leaf = torch.randn(B, H, S, D, generator=g).requires_grad_()
    x = leaf.transpose(1, 2)  # (B, S, H, D), strided
    got, got_lse = sp._Permute.apply((order, inverse, 1), None, lse, x)
    assert torch.equal(got, sp.gather_tokens(x, order))
    assert torch.equal(got_lse, torch.gather(lse, -1, order)) and not got_lse.requires_grad
    dout = torch.randn(B, S, H, D, generator=g)
    got.backward(dout)
    ref = leaf.detach().clone().requires_grad_()
    sp.gather_tokens(ref.transpose(1, 2), order).backward(dout)
    assert torch.equal(leaf.grad, ref.grad)


def test_permute_tokens_unused_output():
    """An output nothing depends on gets no gradient (no zero-filled one is made): its input's
    gradient is None, the others' are the moves of theirs."""
    B, S, H, D = 1, 19, 2, 16
    g = torch.Generator().manual_seed(6)
    xs = [torch.randn(B, S, H, D, generator=g) for _ in range(3)]
    order = torch.stack([torch.randperm(S, generator=g) for _ in range(B * H)]).view(B, H, S)
    group = (order, sp._inverse(order), 1)
    leaves = [x.clone().requires_grad_() for x in xs]
    got = sp._Permute.apply(group, (order, sp._inverse(order), 2), None, *leaves)
    dout = torch.randn(got[0].shape, generator=g)
    (got[0] * dout).sum().backward(retain_graph=True)  # only the first output is used
    assert leaves[1].grad is None and leaves[2].grad is None
    assert torch.equal(leaves[0].grad, sp.gather_tokens(dout, sp._inverse(order)))
    (got[2] * dout).sum().backward()  # one of a group of two
    assert leaves[1].grad is None and torch.equal(leaves[2].grad, sp.gather_tokens(dout, sp._inverse(order)))


@pytest.mark.parametrize("needs", [(True, True, True), (True, False, True), (False, True, False)])
def test_permute_tokens_two_groups_and_gradient(needs):
    """Q by its order and K, V (fewer heads and tokens, views of one fused tensor) by theirs, in
    one launch: each as ``gather_tokens`` moves it; the gradients of those that need one equal
    ``torch.gather``'s, the others get none."""
    B, Sq, Sk, H, Hkv, D = 2, 37, 29, 4, 2, 24
    g = torch.Generator().manual_seed(12)
    q = torch.randn(B, Sq, H, D, generator=g)
    kv = torch.randn(B, Sk, 2, Hkv, D, generator=g)
    xs = [q, kv[:, :, 0], kv[:, :, 1]]
    q_order = torch.stack([torch.randperm(Sq, generator=g) for _ in range(B * H)]).view(B, H, Sq)
    k_order = torch.stack([torch.randperm(Sk, generator=g) for _ in range(B * Hkv)]).view(B, Hkv, Sk)
    orders = [q_order, k_order, k_order]
    leaves = [x.detach().clone().requires_grad_(n) for x, n in zip(xs, needs)]
    got = sp._Permute.apply((q_order, sp._inverse(q_order), 1), (k_order, sp._inverse(k_order), 2), None, *leaves)
    assert len(got) == 3
    for a, x, o in zip(got, xs, orders):
        assert torch.equal(a, sp.gather_tokens(x, o))
    douts = [torch.randn(a.shape, generator=g) for a in got]
    torch.autograd.backward([a for a, n in zip(got, needs) if n], [d for d, n in zip(douts, needs) if n])
    for leaf, x, o, d, n in zip(leaves, xs, orders, douts, needs):
        if not n:
            assert leaf.grad is None
            continue
        ref = x.detach().clone().requires_grad_()
        sp.gather_tokens(ref, o).backward(d)
        assert torch.equal(leaf.grad, ref.grad)
