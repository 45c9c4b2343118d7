"""flash_attention (single device, reference backend) against float64 attention."""

from __future__ import annotations

import pytest
import torch
from common import rel

from ringflash import flash_attention, reference



@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("seqlens", [(33, 33), (17, 40)])
@pytest.mark.parametrize("heads", [(4, 4), (8, 2), (4, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_flash_attention_reference_backend(causal, seqlens, heads, dtype):
    sq, sk = seqlens
    (h, hkv), d = heads, 32
    q = torch.randn(2, sq, h, d, dtype=torch.float64)
    k = torch.randn(2, sk, hkv, d, dtype=torch.float64)
    v = torch.randn(2, sk, hkv, d, dtype=torch.float64)
    dout = torch.randn(2, sq, h, d, dtype=torch.float64)

    def run(fn, dt):
        qq, kk, vv = (x.detach().to(dt).requires_grad_() for x in (q, k, v))
        out, lse = fn(qq, kk, vv)
        out.backward(dout.to(dt))
        return [out, qq.grad, kk.grad, vv.grad], lse

    ref, ref_lse = run(lambda a, b, c: reference.attention(a, b, c, causal=causal), torch.float64)
    got, lse = run(lambda a, b, c: flash_attention(a, b, c, causal=causal, return_lse=True, backend="reference"), dtype)
    assert got[0].dtype == dtype and lse.dtype == torch.float32 and lse.shape == (2, h, sq)
    if dtype == torch.float32:
        assert all(rel(x, r) < 1e-5 for x, r in zip(got, ref))
    else:
        bf16, _ = run(lambda a, b, c: reference.attention(a, b, c, causal=causal), dtype)
        for x, b, r in zip(got, bf16, ref):
            assert rel(x, r) <= 2 * rel(b, r)
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite)
    assert rel(lse[finite], ref_lse[finite]) < (1e-6 if dtype == torch.float32 else 1e-2)


def test_rows_that_see_no_key():
    # Causal with more queries than keys: the first queries see nothing (bottom-right alignment).
    q, k, v = torch.randn(1, 12, 2, 16), torch.randn(1, 5, 2, 16), torch.randn(1, 5, 2, 16)
    q.requires_grad_()
    out, lse = flash_attention(q, k, v, causal=True, return_lse=True, backend="reference")
    assert torch.isneginf(lse[:, :, :7]).all() and torch.isfinite(lse[:, :, 7:]).all()
    assert (out[:, :7] == 0).all() and not out.isnan().any()
    out.sum().backward()
    assert not q.grad.isnan().any() and (q.grad[:, :7] == 0).all()


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    from ringflash import kernels

    monkeypatch.setattr(kernels, "INTERPRETED", False)  # as in a process without TRITON_INTERPRET
    q = torch.randn(1, 4, 2, 16)
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        flash_attention(q, q, q, backend="triton")


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_reference_blockwise_equals_whole(causal):
    """The reference backend walks the keys in blocks (online softmax): with blocks of 7 keys over
    45, every rescaling step runs, and the result is the whole-matrix oracle's."""
    from ringflash import reference

    g = torch.Generator().manual_seed(11)
    q, dout = (torch.randn(1, 20, 4, 8, dtype=torch.float64, generator=g) * 3 for _ in range(2))
    k, v = (torch.randn(1, 45, 2, 8, dtype=torch.float64, generator=g) * 3 for _ in range(2))
    qq, kk, vv = (x.clone().requires_grad_() for x in (q, k, v))
    want, want_lse = reference.attention(qq, kk, vv, causal=causal)
    want.backward(dout)
    out, lse = reference.forward(q, k, v, causal=causal, block=7)
    dq, dk, dv = reference.backward(dout, q, k, v, lse, reference.backward_delta(out, dout), causal=causal, block=7)
    for got, ref in ((out, want), (lse, want_lse), (dq, qq.grad), (dk, kk.grad), (dv, vv.grad)):
        assert torch.allclose(got, ref.detach(), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "hash"])
def test_backward_makes_no_zero_lse_gradient(sparse):
    """The LSE has no gradient, so the backward is not handed a zero-filled one (autograd would
    otherwise allocate and fill a (B, H, S) tensor per call); the gradients stay those of the
    float64 reference."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from ringflash.sparse import HashSparse

    class CountFills(TorchDispatchMode):
        def __init__(self, shape):
            super().__init__()
            self.shape, self.fills = shape, 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            zeroing = (torch.ops.aten.fill_, torch.ops.aten.zero_, torch.ops.aten.zeros)
            if func.overloadpacket in zeroing and isinstance(out, torch.Tensor) and tuple(out.shape) == self.shape:
                self.fills += 1
            return out

    B, S, H, D = 1, 32, 2, 16
    g = torch.Generator().manual_seed(4)
    q, k, v, dout = (torch.randn(B, S, H, D, generator=g, dtype=torch.float64) for _ in range(4))
    sparsity = None
    if sparse:
        sparsity = HashSparse(*(torch.randint(0, 2, (B, S, H), generator=g) for _ in range(2)), 2)
    qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
    out, lse = flash_attention(qq, kk, vv, causal=True, return_lse=True, sparsity=sparsity)
    with CountFills((B, H, S)) as count:
        out.backward(dout)
    assert count.fills == 0
    q64, k64, v64 = (t.clone().requires_grad_() for t in (q, k, v))
    ref, _ = reference.attention(q64, k64, v64, causal=True, sparsity=sparsity)
    ref.backward(dout)
    for a, b in ((qq.grad, q64.grad), (kk.grad, k64.grad), (vv.grad, v64.grad)):
        assert rel(a, b) < 1e-12
