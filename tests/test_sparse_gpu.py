"""Sparse attention in the Triton kernels on a CUDA GPU (bf16 and fp16): block-sparse patterns,
QK-dropping and hash buckets.

Every error is ``||x - ref||  / ||ref||`` against float64 attention with the same mask
(``reference.attention(sparsity=...)``), and must be no worse than ``SDPA_FACTOR`` times the
error of PyTorch SDPA run in the same dtype with the same mask as a boolean matrix (rows that see
no key are zero in both: SDPA's NaNs there are set to 0).

    PYTHONPATH=. python -m pytest -m gpu tests/test_sparse_gpu.py
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from common import rel as rel_err  # noqa: E402
from ringflash import flash_attention, kernels, reference  # noqa: E402
from ringflash import sparse as sp  # noqa: E402
from ringflash.mask import visible  # noqa: E402

SDPA_FACTOR = 1.5
DEV = "cuda"
S = 2048


def _mode(name: str, B: int, H: int, Hkv: int, g: torch.Generator):
    if name == "block":
        return sp.block_pattern(S, 128, local=2, global_=1, random=2, seed=3)
    if name == "block64":
        return sp.block_pattern(S, 64, local=3, global_=1, random=4, seed=5)
    if name == "qkdrop":
        return sp.QKDrop(torch.rand(B, S, H, generator=g, device=DEV) > 0.5,
                         torch.rand(B, S, Hkv, generator=g, device=DEV) > 0.5)
    return sp.HashSparse(torch.randint(0, 4, (B, S, H), generator=g, device=DEV),
                         torch.randint(0, 4, (B, S, Hkv), generator=g, device=DEV), 4)


def _dense_mask(mode, causal: bool, H: int, Hkv: int, window=None, cu=None) -> torch.Tensor:
    """(B or 1, H, S, S) boolean mask of the mode (with a window and documents), built directly."""
    pos = torch.arange(S, device=DEV)
    doc = None if cu is None else torch.bucketize(pos, torch.tensor(cu[1:], device=DEV), right=True)
    base = visible(pos, pos, causal=causal, window=window, q_doc=doc, k_doc=doc)
    if isinstance(mode, sp.BlockSparse):
        blk = mode.pattern.to(DEV).repeat_interleave(mode.block_size, 0).repeat_interleave(mode.block_size, 1)
        return (blk if base is None else base & blk)[None, None]
    G = H // Hkv
    if isinstance(mode, sp.QKDrop):
        qa, ka = mode.q_keep, mode.k_keep.repeat_interleave(G, 2)
        tok = rearrange(qa, "b s h -> b h s 1") & rearrange(ka, "b s h -> b h 1 s")
    else:
        qa, ka = mode.q_buckets, mode.k_buckets.repeat_interleave(G, 2)
        tok = rearrange(qa, "b s h -> b h s 1") == rearrange(ka, "b s h -> b h 1 s")
    return tok if base is None else tok & base


CASES = [(m, 128, (8, 8), torch.bfloat16, True) for m in ("block", "block64", "qkdrop", "hash")]
CASES += [(m, 64, (8, 2), torch.bfloat16, c) for m in ("block", "qkdrop", "hash") for c in (True, False)]
CASES += [("hash", 128, (8, 2), torch.float16, True), ("hash", 128, (8, 2), torch.bfloat16, False)]
# With a window and documents: at D = 128 the token modes' forward is the Hopper kernel's on an
# sm_90 GPU, whose window bounds take the global position out of the composite one.
CU = [0, 700, 1500, 1501, S]
MASKED_CASES = [(m, D, True, w, cu) for m in ("qkdrop", "hash") for D in (64, 128)
                for w, cu in (((300, 0), None), (None, CU), ((200, 0), CU))]
MASKED_CASES += [("hash", 128, False, (100, 50), CU)]


@pytest.mark.parametrize("name,head_dim,heads,dtype,causal", CASES)
def test_sparse_kernels_match_float64(name, head_dim, heads, dtype, causal):
    _check_against_float64(name, head_dim, heads, dtype, causal)


@pytest.mark.parametrize("name,head_dim,causal,window,cu", MASKED_CASES)
def test_sparse_with_window_and_documents(name, head_dim, causal, window, cu):
    _check_against_float64(name, head_dim, (8, 2), torch.bfloat16, causal, window, cu)


def _check_against_float64(name, head_dim, heads, dtype, causal, window=None, cu=None):
    (H, Hkv), B = heads, 2
    g = torch.Generator(device=DEV).manual_seed(0)
    mk = lambda h: torch.randn(B, S, h, head_dim, generator=g, device=DEV).to(dtype)  # noqa: E731
    q, k, v, dout = mk(H), mk(Hkv), mk(Hkv), mk(H)
    mode = _mode(name, B, H, Hkv, g)

    qd, kd, vd = (t.double().requires_grad_() for t in (q, k, v))
    mask_kw = dict(window=window, cu_seqlens=cu)
    ref, ref_lse = reference.attention(qd, kd, vd, causal=causal, sparsity=mode, **mask_kw)
    ref.backward(dout.double())
    refs = [ref.detach(), qd.grad, kd.grad, vd.grad]

    qt, kt, vt = (t.clone().requires_grad_() for t in (q, k, v))
    out, lse = flash_attention(qt, kt, vt, causal=causal, sparsity=mode, return_lse=True, backend="triton",
                               **mask_kw)
    out.backward(dout)
    ours = [out.detach(), qt.grad, kt.grad, vt.grad]
    fin = torch.isfinite(ref_lse)
    assert torch.equal(fin, torch.isfinite(lse))
    assert (lse[fin].double() - ref_lse[fin]).abs().max().item() < 2e-3
    assert (out.transpose(1, 2)[~fin] == 0).all()  # rows that see no key: O = 0

    vis = _dense_mask(mode, causal, H, Hkv, window, cu)
    qs, ks, vs = (t.clone().requires_grad_() for t in (q, k, v))
    o_sdpa = F.scaled_dot_product_attention(qs.transpose(1, 2), ks.transpose(1, 2), vs.transpose(1, 2),
                                            attn_mask=vis, enable_gqa=H != Hkv).transpose(1, 2)
    o_sdpa.nan_to_num(0.0).backward(dout)
    theirs = [o_sdpa.detach().nan_to_num(0.0), *(t.grad.nan_to_num(0.0) for t in (qs, ks, vs))]
    for what, x, y, r in zip(("out", "dq", "dk", "dv"), ours, theirs, refs):
        assert rel_err(x, r) <= SDPA_FACTOR * rel_err(y, r) + 1e-4, (what, rel_err(x, r), rel_err(y, r))


def test_block_sparse_ring_step_striped_positions():
    """The queries of one striped rank against the keys of another (a ring step), block-sparse."""
    P, D = 4, 128
    qp, kp = torch.arange(2, S, P, device=DEV), torch.arange(1, S, P, device=DEV)
    mode = sp.block_pattern(S, 128, local=2, global_=1, random=2, seed=7)
    g = torch.Generator(device=DEV).manual_seed(1)
    q, k, v, dout = (torch.randn(1, S // P, 4, D, generator=g, device=DEV).to(torch.bfloat16) for _ in range(4))
    kw = dict(q_pos=qp, k_pos=kp, causal=True, blocks=mode)
    out, lse = kernels.forward(q, k, v, **kw)
    r_out, r_lse = reference.forward(q.double(), k.double(), v.double(), **kw)
    assert rel_err(out, r_out) < 1e-2
    fin = torch.isfinite(r_lse)
    assert torch.equal(fin, torch.isfinite(lse)) and (lse[fin].double() - r_lse[fin]).abs().max() < 2e-3
    delta = reference.backward_delta(r_out, dout.double())
    got = kernels.backward(dout, q, k, v, r_lse.float(), delta.float(), **kw)
    want = reference.backward(dout.double(), q.double(), k.double(), v.double(), r_lse, delta, **kw)
    for x, r in zip(got, want):
        assert rel_err(x, r) < 2e-2


@pytest.mark.parametrize("name", ["block", "hash"])
def test_sparse_is_deterministic(name):
    B, H, Hkv, D = 1, 8, 2, 128
    g = torch.Generator(device=DEV).manual_seed(2)
    q, k, v, dout = (torch.randn(B, S, h, D, generator=g, device=DEV).bfloat16() for h in (H, Hkv, Hkv, H))
    mode = _mode(name, B, H, Hkv, g)
    runs = []
    for _ in range(2):
        qt, kt, vt = (t.clone().requires_grad_() for t in (q, k, v))
        out = flash_attention(qt, kt, vt, causal=True, sparsity=mode)
        out.backward(dout)
        runs.append([out, qt.grad, kt.grad, vt.grad])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("mode,buckets", [("hash", 1), ("hash", 8), ("hash", 32), ("qkdrop", 2), ("hash_docs", 16)])
def test_counting_sort_on_gpu(mode, buckets):
    """The counting sort of ``kernels.tokens`` (chunks of 256-1024 tokens on a GPU) gives exactly
    what PyTorch's sort of the composite positions gives, on rows of several chunks, with fewer
    queries than keys."""
    from ringflash.kernels.tokens import sort_tokens

    B, Sq, Sk, H, Hkv = 2, 3001, 5003, 8, 2
    g = torch.Generator(device=DEV).manual_seed(buckets)
    k_pos = torch.arange(Sk, device=DEV) * 3 + 1
    q_pos = k_pos[Sk - Sq:]
    cu = [0, 1, 700, 701, 2900, Sk] if mode.endswith("docs") else [0, Sk]
    k_doc = torch.bucketize(torch.arange(Sk, device=DEV), torch.tensor(cu[1:], device=DEV), right=True)
    k_doc = k_doc.to(torch.int32) if mode.endswith("docs") else None
    q_doc = None if k_doc is None else k_doc[Sk - Sq:]
    if mode == "qkdrop":
        m = sp.QKDrop(torch.rand(B, Sq, H, generator=g, device=DEV) > 0.3, torch.rand(B, Sk, Hkv, generator=g, device=DEV) > 0.3)
        got = sort_tokens(m.q_keep, m.k_keep, 2, q_pos, k_pos, q_doc, k_doc, len(cu) - 1, drop=(2**30, 2**30 + 1))
    else:
        m = sp.HashSparse(torch.randint(0, buckets, (B, Sq, H), generator=g, device=DEV),
                          torch.randint(0, buckets, (B, Sk, Hkv), generator=g, device=DEV, dtype=torch.int32), buckets)
        got = sort_tokens(m.q_buckets, m.k_buckets, buckets, q_pos, k_pos, q_doc, k_doc, len(cu) - 1)
    q_cpos, k_cpos = sp.composite_positions(m, q_pos, k_pos, q_doc, k_doc, len(cu) - 1)
    (q_sorted, q_order), (k_sorted, k_order) = torch.sort(q_cpos, -1), torch.sort(k_cpos, -1)
    want = (q_order, sp._inverse(q_order), q_sorted, (q_sorted >> 31).int(), k_order, sp._inverse(k_order), k_sorted,
            (k_sorted >> 31).int())
    for i, (a, b) in enumerate(zip(got, want)):
        assert a.dtype == b.dtype and torch.equal(a, b), i
