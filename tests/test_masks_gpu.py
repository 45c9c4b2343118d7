"""Windows and packed documents in the Triton kernels on a CUDA GPU (bf16 and fp16).

Every error is ``||x - ref||  / ||ref||`` against float64 attention with the same mask, and must
be no worse than ``SDPA_FACTOR`` times the error of PyTorch SDPA run in the same dtype with the
same mask as a boolean matrix.

    PYTHONPATH=. python -m pytest -m gpu tests/test_masks_gpu.py
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from common import rel as rel_err  # noqa: E402
from ringflash import flash_attention, kernels, reference  # noqa: E402
from ringflash.mask import doc_ids, visible  # noqa: E402

SDPA_FACTOR = 1.5
DEV = "cuda"


MASKS = {
    "window": dict(window=(300, 0), cu=None),
    "two_sided": dict(window=(200, 77), cu=None),
    "documents": dict(window=None, cu=[0, 1, 700, 701, 1500, 2048]),
    "documents_window": dict(window=(256, 0), cu=[0, 900, 901, 2048]),
}


CASES = [(name, 128, heads, torch.bfloat16) for name in sorted(MASKS) for heads in ((8, 8), (8, 2))]
CASES += [("documents_window", 64, (8, 2), torch.bfloat16), ("window", 128, (8, 8), torch.float16)]


@pytest.mark.parametrize("name,head_dim,heads,dtype", CASES)
def test_masked_kernels_match_float64(name, head_dim, heads, dtype):
    S, (H, Hkv) = 2048, heads
    spec = MASKS[name]
    g = torch.Generator(device=DEV).manual_seed(0)
    mk = lambda h: torch.randn(2, S, h, head_dim, generator=g, device=DEV).to(dtype)  # noqa: E731
    q, k, v, dout = mk(H), mk(Hkv), mk(Hkv), mk(H)
    causal = name != "two_sided"

    qd, kd, vd = (t.double().requires_grad_() for t in (q, k, v))
    ref, ref_lse = reference.attention(qd, kd, vd, causal=causal, window=spec["window"], cu_seqlens=spec["cu"])
    ref.backward(dout.double())
    refs = [ref.detach(), qd.grad, kd.grad, vd.grad]

    qt, kt, vt = (t.clone().requires_grad_() for t in (q, k, v))
    out, lse = flash_attention(qt, kt, vt, causal=causal, window=spec["window"], cu_seqlens=spec["cu"],
                               return_lse=True, backend="triton")
    out.backward(dout)
    ours = [out.detach(), qt.grad, kt.grad, vt.grad]
    assert torch.isfinite(lse).all()
    assert (lse.double() - ref_lse).abs().max().item() < 2e-3

    pos = torch.arange(S, device=DEV)
    doc = doc_ids(spec["cu"], pos) if spec["cu"] is not None else None
    vis = visible(pos, pos, causal=causal, window=spec["window"], q_doc=doc, k_doc=doc)
    qs, ks, vs = (t.clone().requires_grad_() for t in (q, k, v))
    o_sdpa = F.scaled_dot_product_attention(qs.transpose(1, 2), ks.transpose(1, 2), vs.transpose(1, 2),
                                            attn_mask=vis, enable_gqa=H != Hkv).transpose(1, 2)
    o_sdpa.backward(dout)
    theirs = [o_sdpa.detach(), qs.grad, ks.grad, vs.grad]
    for what, x, y, r in zip(("out", "dq", "dk", "dv"), ours, theirs, refs):
        assert rel_err(x, r) <= SDPA_FACTOR * rel_err(y, r) + 1e-4, (what, rel_err(x, r), rel_err(y, r))


def test_ring_positions_of_another_rank():
    """Striped positions of two different ranks (a ring step), documents and a window, bf16."""
    P, S, D = 4, 4096, 128
    qp, kp = torch.arange(2, S, P, device=DEV), torch.arange(1, S, P, device=DEV)
    cu = [0, 5, 1200, 1201, 3000, S]
    g = torch.Generator(device=DEV).manual_seed(1)
    q, k, v, dout = (torch.randn(1, S // P, 4, D, generator=g, device=DEV).to(torch.bfloat16) for _ in range(4))
    qd, kd = doc_ids(cu, qp), doc_ids(cu, kp)
    kw = dict(q_pos=qp, k_pos=kp, causal=True, window=(500, 0), q_doc=qd, k_doc=kd)
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
