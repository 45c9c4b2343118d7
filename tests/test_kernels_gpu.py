"""The Triton kernels on a CUDA GPU, against the float64 reference and PyTorch SDPA.

Every error is ``||x - ref|| / ||ref||`` against float64 attention on the same inputs, and
must be no worse than ``SDPA_FACTOR`` times the error of ``torch.nn.functional.
scaled_dot_product_attention`` run in the same dtype on the same inputs.

    PYTHONPATH=. python -m pytest -m gpu tests/test_kernels_gpu.py
"""

from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from ringflash import kernels, reference  # noqa: E402

SDPA_FACTOR = 1.5
DEV = "cuda"


def rel_err(x, ref):
    x, ref = x.double(), ref.double()
    return (x - ref).norm().item() / max(ref.norm().item(), 1e-30)


def make_qkv(B, Sq, Sk, H, Hkv, D, dtype, seed=0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g, device=DEV, dtype=torch.float32).to(dtype)  # noqa: E731
    return mk(B, Sq, H, D), mk(B, Sk, Hkv, D), mk(B, Sk, Hkv, D), mk(B, Sq, H, D)


def oracle64(q, k, v, dout, *, causal, q_pos=None, k_pos=None):
    q, k, v = (t.detach().double().requires_grad_() for t in (q, k, v))
    out, lse = reference.attention(q, k, v, causal=causal, q_pos=q_pos, k_pos=k_pos)
    out.backward(dout.double())
    return out.detach(), lse.detach(), q.grad, k.grad, v.grad


def sdpa(q, k, v, dout, *, causal, q_pos=None, k_pos=None):
    """SDPA in the inputs' dtype: the yardstick."""
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    Sq, Sk = q.shape[1], k.shape[1]
    mask, is_causal = None, False
    if causal:
        if q_pos is None and Sq == Sk:
            is_causal = True
        else:
            if q_pos is None:
                q_pos, k_pos = reference.default_positions(Sq, Sk, DEV)
            mask = q_pos[:, None] >= k_pos[None, :]
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
        attn_mask=mask, is_causal=is_causal, enable_gqa=q.shape[2] != k.shape[2],
    ).transpose(1, 2)
    out.backward(dout)
    return out.detach(), None, q.grad, k.grad, v.grad


def run_kernels(q, k, v, dout, *, causal, q_pos=None, k_pos=None):
    out, lse = kernels.forward(q, k, v, causal=causal, q_pos=q_pos, k_pos=k_pos)
    delta = kernels.backward_delta(out.to(q.dtype), dout)
    dq, dk, dv = kernels.backward(dout, q, k, v, lse, delta, causal=causal, q_pos=q_pos, k_pos=k_pos)
    return out, lse, dq, dk, dv


def check_against_sdpa(q, k, v, dout, *, causal, q_pos=None, k_pos=None):
    got = run_kernels(q, k, v, dout, causal=causal, q_pos=q_pos, k_pos=k_pos)
    ref = oracle64(q, k, v, dout, causal=causal, q_pos=q_pos, k_pos=k_pos)
    base = sdpa(q, k, v, dout, causal=causal, q_pos=q_pos, k_pos=k_pos)
    fin = torch.isfinite(ref[1])
    assert torch.equal(torch.isneginf(got[1]), ~fin)
    assert (got[1][fin].double() - ref[1][fin]).abs().max().item() < 1e-2
    report = {}
    for i, name in ((0, "out"), (2, "dq"), (3, "dk"), (4, "dv")):
        assert not torch.isnan(got[i]).any(), f"{name} has NaN"
        err, err_sdpa = rel_err(got[i], ref[i]), rel_err(base[i], ref[i])
        report[name] = (err, err_sdpa)
        assert err <= SDPA_FACTOR * err_sdpa + 1e-5, (
            f"{name}: relative error {err:.2e} > {SDPA_FACTOR} x SDPA's {err_sdpa:.2e}"
        )
    return report


DTYPES = [torch.bfloat16, torch.float16]


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("D", [64, 128, 32, 80, 96, 256])
def test_head_dims(D, dtype, causal):
    q, k, v, dout = make_qkv(2, 1024, 1024, 8, 2, D, dtype)
    check_against_sdpa(q, k, v, dout, causal=causal)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("Hkv", [8, 2], ids=["mha", "gqa"])
@pytest.mark.parametrize("D", [16, 32])
def test_small_head_dims(D, Hkv, causal):
    """Head dims 16 and 32 run their own dK/dV tiles with and without grouped queries (64 x 128
    and 128 x 64): odd lengths, so both partial tiles are taken, and ring-step positions."""
    q, k, v, dout = make_qkv(1, 1111, 1111, 8, Hkv, D, torch.bfloat16, seed=3)
    check_against_sdpa(q, k, v, dout, causal=causal)
    if causal:
        q, k, v, dout = make_qkv(1, 2048, 2048, 8, Hkv, D, torch.bfloat16, seed=4)
        check_against_sdpa(q, k, v, dout, causal=True, q_pos=zigzag(2048, 4, 2), k_pos=zigzag(2048, 4, 1))


@pytest.mark.parametrize("D", [64, 128, 256])
def test_float32_head_dims(D):
    """float32 inputs take smaller tiles (twice the bytes per element); exact products (no tf32)."""
    q, k, v, dout = make_qkv(2, 777, 1024, 8, 2, D, torch.float32, seed=4)
    got = run_kernels(q, k, v, dout, causal=True)
    ref = oracle64(q, k, v, dout, causal=True)
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), got, ref):
        assert rel_err(a, b) < 1e-5, f"{name}: {rel_err(a, b):.2e}"


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("Sq,Sk", [(1000, 1000), (77, 77), (333, 1111), (1111, 555), (4097, 4097)])
def test_odd_lengths(Sq, Sk, causal):
    # Sq > Sk with causal: bottom-right alignment leaves the first rows empty (O = 0, LSE = -inf);
    # SDPA gives NaN there, so those shapes compare only the rows that see a key.
    q, k, v, dout = make_qkv(1, Sq, Sk, 4, 1, 128, torch.bfloat16, seed=1)
    if causal and Sq > Sk:
        got = run_kernels(q, k, v, dout, causal=True)
        empty = Sq - Sk
        assert torch.all(got[0][:, :empty] == 0) and torch.all(torch.isneginf(got[1][..., :empty]))
        assert not any(torch.isnan(t).any() for t in got)
        ref = oracle64(q, k, v, dout, causal=True)
        assert rel_err(got[0][:, empty:], ref[0][:, empty:]) < 1e-2
        for i in (2, 3, 4):
            assert rel_err(got[i], ref[i]) < 2e-2
        return
    check_against_sdpa(q, k, v, dout, causal=causal)


def striped(L, world, rank):
    return rank + world * torch.arange(L, device=DEV)


def zigzag(L, world, rank):
    C = L // 2
    ar = torch.arange(C, device=DEV)
    return torch.cat([rank * C + ar, (2 * world - 1 - rank) * C + ar])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "q_pos,k_pos",
    [
        pytest.param(striped(2048, 4, 2), striped(2048, 4, 0), id="striped-src<r"),
        pytest.param(striped(2048, 4, 2), striped(2048, 4, 2), id="striped-src=r"),
        pytest.param(striped(2048, 4, 2), striped(2048, 4, 3), id="striped-src>r"),
        pytest.param(zigzag(2048, 4, 1), zigzag(2048, 4, 2), id="zigzag-r1-src2"),
        pytest.param(zigzag(2048, 4, 2), zigzag(2048, 4, 1), id="zigzag-r2-src1"),
        pytest.param(torch.arange(1500, device=DEV) + 1000, torch.arange(2000, device=DEV), id="offset"),
    ],
)
def test_ring_step_positions(q_pos, k_pos, dtype):
    q, k, v, dout = make_qkv(1, len(q_pos), len(k_pos), 8, 2, 128, dtype, seed=2)
    check_against_sdpa(q, k, v, dout, causal=True, q_pos=q_pos, k_pos=k_pos)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fold_matches_one_call(dtype):
    q, k, v, dout = make_qkv(1, 2048, 4096, 8, 8, 128, dtype, seed=3)
    q_pos = torch.arange(2048, device=DEV) + 2048
    k_pos = torch.arange(4096, device=DEV)
    out = lse = None
    for sl in (slice(3000, 4096), slice(0, 3000)):
        out, lse = kernels.forward(q, k[:, sl], v[:, sl], causal=True, q_pos=q_pos, k_pos=k_pos[sl], out=out, lse=lse)
    ref = oracle64(q, k, v, dout, causal=True, q_pos=q_pos, k_pos=k_pos)
    base = sdpa(q, k, v, dout, causal=True, q_pos=q_pos, k_pos=k_pos)
    assert rel_err(out, ref[0]) <= SDPA_FACTOR * rel_err(base[0], ref[0]) + 1e-5
    assert (lse.double() - ref[1]).abs().max().item() < 1e-2


def test_backward_is_deterministic():
    q, k, v, dout = make_qkv(1, 3000, 3000, 8, 2, 128, torch.bfloat16, seed=4)
    a = run_kernels(q, k, v, dout, causal=True)
    b = run_kernels(q, k, v, dout, causal=True)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_fully_masked_block():
    q, k, v, dout = make_qkv(1, 500, 700, 4, 4, 64, torch.bfloat16, seed=5)
    q_pos, k_pos = torch.arange(500, device=DEV), torch.arange(700, device=DEV) + 500
    out, lse = kernels.forward(q, k, v, causal=True, q_pos=q_pos, k_pos=k_pos)
    assert torch.all(out == 0) and torch.all(torch.isneginf(lse))
    delta = kernels.backward_delta(out, dout)
    dq, dk, dv = kernels.backward(dout, q, k, v, lse, delta, causal=True, q_pos=q_pos, k_pos=k_pos)
    assert all(torch.all(t == 0) for t in (dq, dk, dv))


@pytest.mark.parametrize("positions", ["causal", "masked-block"])
def test_backward_store_dkdv(positions):
    """``store_dkdv`` into buffers of NaN: bit for bit the stored (no accumulator) result, with
    key tiles that no query sees written as zeros, and dQ still added into its accumulator."""
    q, k, v, dout = make_qkv(1, 1500, 2000, 8, 2, 128, torch.bfloat16, seed=6)
    if positions == "causal":
        q_pos, k_pos = torch.arange(1500, device=DEV) * 2 + 1, torch.arange(2000, device=DEV) * 2
    else:  # the last 800 keys come after every query
        q_pos, k_pos = torch.arange(1500, device=DEV) + 1000, torch.arange(2000, device=DEV) + 1300
    out, lse = kernels.forward(q, k, v, causal=True, q_pos=q_pos, k_pos=k_pos)
    delta = kernels.backward_delta(out.to(q.dtype), dout)
    fresh = kernels.backward(dout, q, k, v, lse, delta, causal=True, q_pos=q_pos, k_pos=k_pos)
    dq = torch.ones_like(fresh[0])
    dk, dv = torch.full_like(fresh[1], float("nan")), torch.full_like(fresh[2], float("nan"))
    kernels.backward(dout, q, k, v, lse, delta, causal=True, q_pos=q_pos, k_pos=k_pos,
                     dq=dq, dk=dk, dv=dv, store_dkdv=True)
    assert torch.equal(dk, fresh[1]) and torch.equal(dv, fresh[2])
    assert torch.allclose(dq - 1, fresh[0], atol=1e-5, rtol=1e-4)
    if positions == "causal":  # against float64 (SDPA, the yardstick, gives NaN for rows that see no key)
        ref = oracle64(q, k, v, dout, causal=True, q_pos=q_pos, k_pos=k_pos)
        base = sdpa(q, k, v, dout, causal=True, q_pos=q_pos, k_pos=k_pos)
        for got, i, name in ((dq - 1, 2, "dq"), (dk, 3, "dk"), (dv, 4, "dv")):
            assert rel_err(got, ref[i]) <= SDPA_FACTOR * rel_err(base[i], ref[i]) + 1e-5, name
    else:
        assert torch.all(dk[:, 1200:] == 0) and torch.all(dv[:, 1200:] == 0)


# -- the SDPA engines on one GPU ------------------------------------------------------------


def run_engine(engine, q, k, v, dout, *, causal, q_pos=None, k_pos=None):
    """One block through an engine's seam, as a ring step runs it (global O/LSE in backward)."""
    from ringflash.ops import get_backend

    be = get_backend(engine, q.device)
    out, lse = be.forward(q, k, v, causal=causal, q_pos=q_pos, k_pos=k_pos)
    o = out.to(q.dtype)
    dq, dk, dv = be.backward(dout, q, k, v, lse, be.backward_delta(o, dout), causal=causal,
                             q_pos=q_pos, k_pos=k_pos, out=o)
    return out, lse, dq, dk, dv


@pytest.mark.parametrize("engine", ["cudnn", "sdpa_flash"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("Hkv", [8, 2])
def test_sdpa_engines(engine, causal, Hkv):
    """flash_attention with an SDPA engine, GQA passed through, against float64."""
    from ringflash import flash_attention

    q, k, v, dout = make_qkv(2, 1000, 1000, 8, Hkv, 128, torch.bfloat16, seed=Hkv + causal)
    qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
    out = flash_attention(qq, kk, vv, causal=causal, backend=engine)
    out.backward(dout)
    ref = oracle64(q, k, v, dout, causal=causal)
    base = sdpa(q, k, v, dout, causal=causal)
    for name, got, i in (("out", out, 0), ("dq", qq.grad, 2), ("dk", kk.grad, 3), ("dv", vv.grad, 4)):
        err, err_sdpa = rel_err(got, ref[i]), rel_err(base[i], ref[i])
        assert err <= SDPA_FACTOR * err_sdpa + 1e-5, f"{engine} {name}: {err:.2e} vs SDPA {err_sdpa:.2e}"


@pytest.mark.parametrize("engine", ["cudnn", "sdpa_flash"])
@pytest.mark.parametrize("layout", ["striped", "zigzag", "contiguous"])
def test_sdpa_engines_on_ring_steps(engine, layout):
    """Every (rank, src) step of a 4-rank causal ring through the engine's decomposition into
    full and square-causal pieces, with the real fused ops, against float64 on that step."""
    from ringflash import get_layout

    lay = get_layout(layout)
    S, P = 512, 4
    for r in range(P):
        for src in range(P):
            q_pos = lay.local_positions(S, rank=r, world_size=P)
            k_pos = lay.local_positions(S, rank=src, world_size=P)
            if q_pos[-1] < k_pos[0]:
                continue  # nothing visible: the ring skips the step
            q, k, v, dout = make_qkv(1, S, S, 8, 2, 128, torch.bfloat16, seed=10 * r + src)
            got = run_engine(engine, q, k, v, dout, causal=True, q_pos=q_pos, k_pos=k_pos)
            ref = oracle64(q, k, v, dout, causal=True, q_pos=q_pos.to(DEV), k_pos=k_pos.to(DEV))
            base = run_kernels(q, k, v, dout, causal=True, q_pos=q_pos.to(DEV), k_pos=k_pos.to(DEV))
            fin = torch.isfinite(ref[1])
            assert torch.equal(torch.isneginf(got[1]), ~fin), (r, src)
            for i, name in ((0, "out"), (2, "dq"), (3, "dk"), (4, "dv")):
                # Rows that see nothing have zero output and gradients on both sides.
                err, err_triton = rel_err(got[i], ref[i]), rel_err(base[i], ref[i])
                assert err <= 2.0 * err_triton + 1e-5, f"{layout} r={r} src={src} {name}: {err:.2e} vs {err_triton:.2e}"


def test_accumulate_kernel_bf16():
    from ringflash.kernels.merge import accumulate_

    g = torch.Generator(device=DEV).manual_seed(4)
    dst = torch.randn(2, 300, 4, 128, device=DEV, generator=g)
    src = torch.randn(2, 4, 300, 128, device=DEV, generator=g).bfloat16().transpose(1, 2)
    want = dst.double() + src.double()
    accumulate_(dst, src)
    assert rel_err(dst, want) < 1e-7
    accumulate_(dst, src, fresh=True)
    assert torch.equal(dst, src.float())


def test_merge_kernel_bf16():
    from ringflash.kernels.merge import merge_

    g = torch.Generator(device=DEV).manual_seed(3)
    out = torch.randn(2, 300, 4, 128, device=DEV, generator=g)
    lse = torch.randn(2, 4, 300, device=DEV, generator=g)
    block_out = torch.randn(2, 4, 300, 128, device=DEV, generator=g).bfloat16().transpose(1, 2)
    block_lse = torch.randn(2, 4, 300, device=DEV, generator=g)
    want_out, want_lse = out.double(), lse.double()
    reference.merge_(want_out, want_lse, block_out.double(), block_lse.double())
    merge_(out, lse, block_out, block_lse)
    assert rel_err(out, want_out) < 1e-6 and rel_err(lse, want_lse) < 1e-6


# -- offsets past 2**31 elements ------------------------------------------------------------


def test_offsets_past_int32():
    """seqlen * heads * head_dim > 2**31: every kernel's tile offsets must be 64-bit. Heads are
    independent, so the first and last heads of a large call must equal the same two heads
    called alone (whose offsets are small, and whose results the tests above check)."""
    S, H, D = 67584, 256, 128  # S * H * D = 2.21e9 elements per tensor
    if torch.cuda.get_device_properties(0).total_memory < 70 * 2**30:
        pytest.skip("needs a GPU with 70 GiB")
    assert S * H * D > 2**31
    q, k, v, dout = make_qkv(1, S, S, H, H, D, torch.bfloat16, seed=7)
    out, lse = kernels.forward(q, k, v, causal=True)
    delta = kernels.backward_delta(out.to(q.dtype), dout)
    dq, dk, dv = kernels.backward(dout, q, k, v, lse, delta, causal=True)
    heads = [0, H - 1]
    big = [t[:, :, heads].float() for t in (out, dq, dk, dv)] + [lse[:, heads].float()]
    del out, lse, delta, dq, dk, dv
    small_in = [t[:, :, heads].contiguous() for t in (q, k, v, dout)]
    del q, k, v, dout
    torch.cuda.empty_cache()
    out, lse = kernels.forward(*small_in[:3], causal=True)
    delta = kernels.backward_delta(out.to(small_in[0].dtype), small_in[3])
    small = [out, *kernels.backward(small_in[3], *small_in[:3], lse, delta, causal=True), lse]
    for name, a, b in zip(("out", "dq", "dk", "dv", "lse"), big, small):
        assert torch.isfinite(a).all(), name
        assert rel_err(a, b.float()) < 1e-3, (name, rel_err(a, b.float()))
    del big, small, small_in, out, lse, delta
    torch.cuda.empty_cache()

    # The SDPA engines' merge pass over a (B, S, H, D) float32 state of as many elements.
    from ringflash.kernels.merge import merge_

    g = torch.Generator(device=DEV).manual_seed(8)
    o = torch.randn(1, S, H, D, generator=g, device=DEV)
    l = torch.randn(1, H, S, generator=g, device=DEV)
    bo = torch.randn(1, S, H, D, generator=g, device=DEV).bfloat16()
    bl = torch.randn(1, H, S, generator=g, device=DEV)
    want_o, want_l = o[:, :, heads].contiguous(), l[:, heads].contiguous()
    merge_(want_o, want_l, bo[:, :, heads].contiguous(), bl[:, heads].contiguous())
    merge_(o, l, bo, bl)
    assert torch.equal(o[:, :, heads], want_o) and torch.equal(l[:, heads], want_l)
