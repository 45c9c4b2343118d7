"""The Hopper kernels (ringflash/kernels/_fwd_hopper.py, _bwd_dkdv_hopper.py, _bwd_dq_hopper.py)
on an sm_90 GPU, against float64.

Each case runs ``kernels.forward`` (and ``kernels.backward``) with the Hopper kernels switched
on, and checks that they were the ones that ran; the error ``||x - ref|| / ||ref||`` against the
float64 reference with the same mask must be within ``SDPA_FACTOR`` times SDPA's in the same
dtype with the mask as a boolean matrix, as in tests/test_kernels_gpu.py. The backward gets the
float64 reference's LSE and delta, so its own error is what is measured.

    PYTHONPATH=. python -m pytest -m gpu tests/test_kernels_hopper_gpu.py
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0):
    pytest.skip("needs an sm_90 GPU (H100/H200)", allow_module_level=True)

from common import rel as rel_err  # noqa: E402
from ringflash import get_layout, kernels, reference  # noqa: E402
from ringflash.kernels import attention  # noqa: E402
from ringflash.mask import doc_ids, visible  # noqa: E402

SDPA_FACTOR = 1.5
DEV = "cuda"


@pytest.fixture(autouse=True)
def hopper(monkeypatch):
    """The Hopper kernels on, and a list of the calls they served ("fwd", "bwd")."""
    calls = []

    def counted(name, real):
        def run(*args, **kwargs):
            calls.append(name)
            return real(*args, **kwargs)
        return run

    monkeypatch.setattr(attention, "HOPPER_FORWARD", True)
    monkeypatch.setattr(attention, "HOPPER_BACKWARD", True)
    monkeypatch.setattr(attention, "HOPPER_FWD_HEAD_DIMS", tuple(attention.HOPPER_FWD_CONFIGS))
    monkeypatch.setattr(attention, "HOPPER_BWD_HEAD_DIMS", tuple(attention.HOPPER_FWD_CONFIGS))
    monkeypatch.setattr(attention, "_forward_hopper", counted("fwd", attention._forward_hopper))
    monkeypatch.setattr(attention, "_backward_hopper", counted("bwd", attention._backward_hopper))
    return calls


def make(B, Sq, Sk, H, Hkv, D, dtype, seed=0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g, device=DEV).to(dtype)  # noqa: E731
    return mk(B, Sq, H, D), mk(B, Sk, Hkv, D), mk(B, Sk, Hkv, D)


def check(q, k, v, hopper, *, causal=False, q_pos=None, k_pos=None, window=None, q_doc=None, k_doc=None):
    """The Hopper forward against float64, within SDPA_FACTOR x SDPA's error; returns (out, lse)."""
    kw = dict(causal=causal, q_pos=q_pos, k_pos=k_pos, window=window, q_doc=q_doc, k_doc=k_doc)
    n = len(hopper)
    out, lse = kernels.forward(q, k, v, **kw)
    assert hopper[n:] == ["fwd"], "the Hopper kernel did not serve the call"
    ref, ref_lse = reference.forward(q.double(), k.double(), v.double(), **kw)
    check_backward(q, k, v, hopper, ref, ref_lse, kw)
    Sq, Sk = q.shape[1], k.shape[1]
    if q_pos is None and (causal or window is not None):
        q_pos, k_pos = reference.default_positions(Sq, Sk, DEV)
    if q_pos is None:
        q_pos, k_pos = torch.arange(Sq, device=DEV), torch.arange(Sk, device=DEV)
    vis = visible(q_pos, k_pos, causal=causal, window=window, q_doc=q_doc, k_doc=k_doc)
    if vis is None:
        vis = torch.ones(Sq, Sk, dtype=torch.bool, device=DEV)
    base = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=vis,
                                          enable_gqa=q.shape[2] != k.shape[2]).transpose(1, 2)
    seen = vis.any(1)  # SDPA gives NaN or garbage on rows that see nothing; ours must give 0
    assert out.dtype == torch.float32 and not torch.isnan(out).any()
    assert torch.all(out[:, ~seen] == 0) and torch.all(torch.isneginf(lse[:, :, ~seen]))
    fin = torch.isfinite(ref_lse)
    assert torch.equal(fin, torch.isfinite(lse))
    if fin.any():
        assert (lse[fin].double() - ref_lse[fin]).abs().max().item() < 2e-3
    if seen.any():
        err, err_sdpa = rel_err(out[:, seen], ref[:, seen]), rel_err(base[:, seen], ref[:, seen])
        assert err <= SDPA_FACTOR * err_sdpa + 1e-5, f"error {err:.2e} > {SDPA_FACTOR} x SDPA's {err_sdpa:.2e}"
    return out, lse


def check_backward(q, k, v, hopper, ref, ref_lse, kw):
    """dQ, dK, dV of the Hopper backward from the float64 LSE and delta, against float64, within
    SDPA_FACTOR x the error of SDPA's gradients in the same dtype (where every row sees a key:
    SDPA's gradients of a row that sees nothing are NaN), else within 2e-2."""
    g = torch.Generator(device=DEV).manual_seed(99)
    dout = torch.randn(q.shape, generator=g, device=DEV).to(q.dtype)
    delta = reference.backward_delta(ref, dout.double())
    n = len(hopper)
    got = kernels.backward(dout, q, k, v, ref_lse.float(), delta.float(), **kw)
    assert hopper[n:] == ["bwd"], "the Hopper backward did not serve the call"
    want = reference.backward(dout.double(), q.double(), k.double(), v.double(), ref_lse, delta, **kw)
    Sq, Sk = q.shape[1], k.shape[1]
    q_pos, k_pos = kw["q_pos"], kw["k_pos"]
    if q_pos is None and (kw["causal"] or kw["window"] is not None):
        q_pos, k_pos = reference.default_positions(Sq, Sk, DEV)
    if q_pos is None:
        q_pos, k_pos = torch.arange(Sq, device=DEV), torch.arange(Sk, device=DEV)
    vis = visible(q_pos, k_pos, causal=kw["causal"], window=kw["window"], q_doc=kw["q_doc"], k_doc=kw["k_doc"])
    base = None
    if vis is None or vis.any(1).all():
        qs, ks, vs = (t.detach().clone().requires_grad_() for t in (q, k, v))
        o = F.scaled_dot_product_attention(qs.transpose(1, 2), ks.transpose(1, 2), vs.transpose(1, 2), attn_mask=vis,
                                           enable_gqa=q.shape[2] != k.shape[2]).transpose(1, 2)
        base = torch.autograd.grad(o, (qs, ks, vs), dout)
    for i, name in enumerate(("dq", "dk", "dv")):
        assert got[i].dtype == torch.float32 and not torch.isnan(got[i]).any(), name
        if want[i].norm() == 0:
            # e.g. dQ with one key: dP - delta is 0 in float64 but rounding in float32; rows
            # that see nothing must give exact zeros
            tol = 0 if base is None else 1e-4 * dout.float().norm() * k.float().norm() / k.numel() ** 0.5
            assert got[i].norm() <= tol, name
            continue
        err = rel_err(got[i], want[i])
        bound = 2e-2 if base is None else SDPA_FACTOR * rel_err(base[i], want[i]) + 1e-5
        assert err <= bound, f"{name}: error {err:.2e} > {bound:.2e}"


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("heads", [(8, 8), (8, 2)], ids=["mha", "gqa"])
def test_head_dims_dtypes_gqa(D, dtype, causal, heads, hopper):
    q, k, v = make(2, 1000, 1000, *heads, D, dtype)
    check(q, k, v, hopper, causal=causal)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("Sq,Sk", [(1, 1), (77, 77), (128, 128), (333, 1111), (1111, 555), (4097, 4097)])
def test_odd_lengths(Sq, Sk, causal, hopper):
    q, k, v = make(2, Sq, Sk, 4, 2, 128, torch.bfloat16, seed=1)
    check(q, k, v, hopper, causal=causal)


def striped(S, world, rank):
    return get_layout("striped").positions(S, rank=rank, world_size=world, device=DEV)


def zigzag(S, world, rank):
    return get_layout("zigzag").positions(S, rank=rank, world_size=world, device=DEV)


@pytest.mark.parametrize(
    "q_pos,k_pos",
    [
        pytest.param(striped(4096, 4, 2), striped(4096, 4, 0), id="striped-src<r"),
        pytest.param(striped(4096, 4, 2), striped(4096, 4, 2), id="striped-src=r"),
        pytest.param(striped(4096, 4, 2), striped(4096, 4, 3), id="striped-src>r"),
        pytest.param(zigzag(4096, 4, 1), zigzag(4096, 4, 2), id="zigzag-r1-src2"),
        pytest.param(zigzag(4096, 4, 2), zigzag(4096, 4, 1), id="zigzag-r2-src1"),
        pytest.param(torch.arange(1500, device=DEV) + 1000, torch.arange(2000, device=DEV), id="offset"),
        pytest.param(torch.arange(500, device=DEV), torch.arange(700, device=DEV) + 500, id="nothing-visible"),
        pytest.param(striped(4096, 4, 1).int(), striped(4096, 4, 3).int(), id="int32"),
    ],
)
def test_ring_step_positions(q_pos, k_pos, hopper):
    q, k, v = make(1, len(q_pos), len(k_pos), 8, 2, 128, torch.bfloat16, seed=2)
    check(q, k, v, hopper, causal=True, q_pos=q_pos, k_pos=k_pos)


CU = [0, 1, 700, 701, 1500, 2048]


@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("name,causal,window,cu", [
    ("window", True, (300, 0), None),
    ("two_sided", False, (200, 77), None),
    ("right_only", False, (-1, 100), None),
    ("documents", True, None, CU),
    ("documents_full", False, None, CU),
    ("documents_window", True, (256, 0), [0, 900, 901, 2048]),
])
def test_windows_and_documents(name, causal, window, cu, D, hopper):
    q, k, v = make(2, 2048, 2048, 8, 2, D, torch.bfloat16, seed=3)
    pos = torch.arange(2048, device=DEV)
    doc = doc_ids(cu, pos) if cu is not None else None
    check(q, k, v, hopper, causal=causal, q_pos=pos if window else None, k_pos=pos if window else None,
          window=window, q_doc=doc, k_doc=doc)


def test_ring_step_with_documents_and_window(hopper):
    """Striped positions of two ranks, documents and a window (a ring step of a packed batch)."""
    P, S = 4, 8192
    qp, kp = striped(S, P, 2), striped(S, P, 1)
    cu = [0, 5, 1200, 1201, 3000, S]
    q, k, v = make(1, S // P, S // P, 4, 4, 128, torch.bfloat16, seed=4)
    check(q, k, v, hopper, causal=True, q_pos=qp, k_pos=kp, window=(500, 0), q_doc=doc_ids(cu, qp), k_doc=doc_ids(cu, kp))


@pytest.mark.parametrize("mode,window,fold", [("hash", None, False), ("qkdrop", None, False),
                                              ("hash", (300, 0), False), ("qkdrop", (200, 0), True)])
def test_per_head_attributes(mode, window, fold, hopper, monkeypatch):
    """QK-dropping and hash buckets: tokens sorted per head, with composite positions (document
    << 31 | position, so bit 31 and above are set) and documents, as ringflash.sparse passes them.
    The forward only (the Hopper backward takes no per-head attributes); its error against
    float64 within SDPA_FACTOR x the Triton kernel's on the same inputs."""
    from ringflash import sparse as sp

    B, S, H, Hkv, D = 2, 2048, 8, 2, 128
    g = torch.Generator(device=DEV).manual_seed(8)
    q, k, v = make(B, S, S, H, Hkv, D, torch.bfloat16, seed=8)
    if mode == "hash":
        mask = sp.HashSparse(torch.randint(0, 4, (B, S, H), generator=g, device=DEV),
                             torch.randint(0, 4, (B, S, Hkv), generator=g, device=DEV), 4)
    else:
        mask = sp.QKDrop(torch.rand(B, S, H, generator=g, device=DEV) > 0.4,
                         torch.rand(B, S, Hkv, generator=g, device=DEV) > 0.4)
    pos = torch.arange(S, device=DEV)
    doc = doc_ids([0, 700, 1500, 1501, S], pos)
    q_cpos, q_cdoc, k_cpos, k_cdoc = sp.composite(mask, pos, pos, doc, doc, 4)
    assert (q_cpos >= 2**31).any()
    q_order, _ = sp.sort_order(q_cpos)
    k_order, _ = sp.sort_order(k_cpos)
    q, k, v = sp.gather_tokens(q, q_order), sp.gather_tokens(k, k_order), sp.gather_tokens(v, k_order)
    kw = dict(causal=True, window=window, q_pos=torch.gather(q_cpos, -1, q_order), q_doc=torch.gather(q_cdoc, -1, q_order),
              k_pos=torch.gather(k_cpos, -1, k_order), k_doc=torch.gather(k_cdoc, -1, k_order))
    run = {}
    for name, on in (("hopper", True), ("triton", False)):
        monkeypatch.setattr(attention, "HOPPER_FORWARD", on)
        n = len(hopper)
        if fold:  # a first half of the keys, then the rest folded in
            half = {**kw, "k_pos": kw["k_pos"][..., : S // 2], "k_doc": kw["k_doc"][..., : S // 2]}
            out, lse = kernels.forward(q, k[:, : S // 2], v[:, : S // 2], **half)
            rest = {**kw, "k_pos": kw["k_pos"][..., S // 2:], "k_doc": kw["k_doc"][..., S // 2:]}
            kernels.forward(q, k[:, S // 2:], v[:, S // 2:], **rest, out=out, lse=lse)
        else:
            out, lse = kernels.forward(q, k, v, **kw)
        assert hopper[n:] == (["fwd"] * (1 + fold) if on else []), name
        run[name] = out, lse
    ref, ref_lse = reference.forward(q.double(), k.double(), v.double(), **kw)
    fin = torch.isfinite(ref_lse)
    (out, lse), (out_t, _) = run["hopper"], run["triton"]
    assert torch.equal(fin, torch.isfinite(lse)) and (~fin).any()
    assert (lse[fin].double() - ref_lse[fin]).abs().max().item() < 2e-3
    assert torch.all(out.transpose(1, 2)[~fin] == 0)
    err, err_t = rel_err(out, ref), rel_err(out_t, ref)
    assert err <= SDPA_FACTOR * err_t + 1e-5, f"error {err:.2e} > {SDPA_FACTOR} x the Triton kernel's {err_t:.2e}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_fold_matches_one_call(dtype, hopper):
    q, k, v = make(2, 2048, 4096, 8, 2, 128, dtype, seed=5)
    q_pos, k_pos = torch.arange(2048, device=DEV) + 2048, torch.arange(4096, device=DEV)
    out = lse = None
    for sl in (slice(3000, 4096), slice(0, 3000), slice(4096, 4096)):
        out, lse = kernels.forward(q, k[:, sl], v[:, sl], causal=True, q_pos=q_pos, k_pos=k_pos[sl], out=out, lse=lse)
    one, one_lse = kernels.forward(q, k, v, causal=True, q_pos=q_pos, k_pos=k_pos)
    ref, ref_lse = reference.forward(q.double(), k.double(), v.double(), causal=True, q_pos=q_pos, k_pos=k_pos)
    assert rel_err(out, ref) <= 2 * rel_err(one, ref) + 1e-5
    assert (lse.double() - ref_lse).abs().max().item() < 2e-3
    # A block nobody sees leaves the running state as it was.
    before = out.clone(), lse.clone()
    kernels.forward(q, k[:, :100], v[:, :100], causal=True, q_pos=q_pos, k_pos=k_pos[:100] + 10**6, out=out, lse=lse)
    assert torch.equal(out, before[0]) and torch.equal(lse, before[1])


def test_forward_is_deterministic(hopper):
    """Two runs bitwise equal (each checked against float64 by ``check``)."""
    q, k, v = make(2, 3000, 3000, 8, 2, 128, torch.bfloat16, seed=6)
    a = check(q, k, v, hopper, causal=True)
    b = kernels.forward(q, k, v, causal=True)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("kind", ["packed", "unaligned", "same_tensor"])
def test_strided_inputs(kind, hopper):
    """q, k, v as views of one packed projection (B, S, 3, H, D); views whose base is 2 bytes
    past an aligned address (copied for TMA); one tensor as q, k and v."""
    g = torch.Generator(device=DEV).manual_seed(7)
    if kind == "packed":
        qkv = torch.randn(2, 1500, 3, 8, 128, generator=g, device=DEV).to(torch.bfloat16)
        q, k, v = qkv.unbind(2)
    else:
        flat = torch.randn(1 + 3 * 2 * 700 * 4 * 64, generator=g, device=DEV).to(torch.bfloat16)
        q, k, v = flat[1:].view(3, 2, 700, 4, 64).unbind(0)
        if kind == "same_tensor":
            k = v = q
    check(q, k, v, hopper, causal=True)


def test_not_served_falls_back(hopper):
    """float32 and D = 96 stay on the Triton kernels."""
    for D, dtype in ((96, torch.bfloat16), (128, torch.float32)):
        q, k, v = make(1, 256, 256, 4, 4, D, dtype)
        out, lse = kernels.forward(q, k, v, causal=True)
        delta = kernels.backward_delta(out, q)
        kernels.backward(q, q, k, v, lse, delta, causal=True)
    assert hopper == []


def test_backward_deterministic_accumulates_and_calls_back(hopper):
    """Two runs bitwise equal; into given accumulators it adds; after_dkdv runs between the two
    kernels (the ring posts the dK/dV transfer there)."""
    q, k, v = make(2, 3000, 3000, 8, 2, 128, torch.bfloat16, seed=8)
    dout = make(2, 3000, 3000, 8, 2, 128, torch.bfloat16, seed=9)[0]
    out, lse = kernels.forward(q, k, v, causal=True)
    delta = kernels.backward_delta(out, dout)
    a = kernels.backward(dout, q, k, v, lse, delta, causal=True)
    b = kernels.backward(dout, q, k, v, lse, delta, causal=True)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    seen = []
    acc = [torch.ones_like(t) for t in a]
    kernels.backward(dout, q, k, v, lse, delta, causal=True, dq=acc[0], dk=acc[1], dv=acc[2],
                     after_dkdv=lambda: seen.append(acc[1].clone()))
    for x, y in zip(acc, a):
        assert torch.allclose(x, y + 1, rtol=0, atol=1e-5)
    assert len(seen) == 1 and torch.allclose(seen[0], a[1] + 1, rtol=0, atol=1e-5)


@pytest.mark.parametrize("case", ["odd_full", "odd_causal", "ring_step", "documents_window_fold"])
@pytest.mark.parametrize("variant", [(1, False), (2, True)], ids=["one_partition", "pingpong"])
@pytest.mark.parametrize("D", [64, 128])
def test_forward_variants(D, variant, case, hopper, monkeypatch):
    """The forward's other variants (the default, a consumer partition per warpgroup, is what
    every other test runs): both warpgroups in one partition (HOPPER_FWD_SPLIT = 1), and the two
    partitions taking turns (HOPPER_FWD_PINGPONG). The same checks on odd lengths, causal and
    full, a ring step, windows with documents, and the fold."""
    monkeypatch.setattr(attention, "HOPPER_FWD_SPLIT", variant[0])
    monkeypatch.setattr(attention, "HOPPER_FWD_PINGPONG", variant[1])
    _forward_cases(D, case, hopper)


@pytest.mark.parametrize("case", ["odd_full", "odd_causal", "ring_step", "documents_window_fold"])
@pytest.mark.parametrize("tiles", [(192, 64, 12, 3), (192, 128, 12, 2)], ids=["192x64", "192x128"])
@pytest.mark.parametrize("persistent", [False, True], ids=["grid", "persistent"])
def test_forward_three_warpgroups(tiles, persistent, case, hopper, monkeypatch):
    """A config of 12 consumer warps at D = 64: three consumer partitions of 64 rows each (192-row
    query tiles, FA3's shape at D = 64; not the table's default), on every case above, one program
    per query tile and persistent."""
    monkeypatch.setitem(attention.HOPPER_FWD_CONFIGS, 64, attention.KernelConfig(*tiles))
    monkeypatch.setattr(attention, "HOPPER_FWD_PERSISTENT", persistent)
    _forward_cases(64, case, hopper)


def _forward_cases(D, case, hopper):
    if case.startswith("odd"):
        q, k, v = make(2, 1111, 555, 8, 2, D, torch.bfloat16, seed=10)
        check(q, k, v, hopper, causal=case == "odd_causal")
    elif case == "ring_step":
        q, k, v = make(1, 1024, 1024, 8, 2, D, torch.float16, seed=11)
        check(q, k, v, hopper, causal=True, q_pos=zigzag(2048, 2, 1), k_pos=zigzag(2048, 2, 0))
    else:
        pos = torch.arange(2048, device=DEV)
        doc = doc_ids([0, 900, 901, 2048], pos)
        q, k, v = make(2, 2048, 2048, 8, 2, D, torch.bfloat16, seed=12)
        kw = dict(causal=True, q_pos=pos, window=(256, 0), q_doc=doc)
        out, lse = check(q, k, v, hopper, k_pos=pos, k_doc=doc, **kw)
        a = kernels.forward(q, k[:, :1000], v[:, :1000], k_pos=pos[:1000], k_doc=doc[:1000], **kw)
        kernels.forward(q, k[:, 1000:], v[:, 1000:], k_pos=pos[1000:], k_doc=doc[1000:], out=a[0], lse=a[1], **kw)
        ref, ref_lse = reference.forward(q.double(), k.double(), v.double(), k_pos=pos, k_doc=doc, **kw)
        assert rel_err(a[0], ref) <= 2 * rel_err(out, ref) + 1e-5  # the fold adds no error of note
        assert (a[1].double() - ref_lse).abs().max().item() < 2e-3


@pytest.mark.parametrize("case", ["odd_full", "odd_causal_gqa", "ring_step", "documents_window_fold", "many_items"])
@pytest.mark.parametrize("split", [2, 1])
@pytest.mark.parametrize("D", [64, 128])
def test_forward_persistent(D, split, case, hopper, monkeypatch):
    """Persistent programs drawing (query tile, head) items from a counter
    (HOPPER_FWD_PERSISTENT): against float64 like every forward, and bitwise equal to one program
    per query tile (the same tiles in the same order per item), twice in a row (the counter starts
    from zero on every call). ``many_items``: far more items than SMs, so that every program
    takes many and both Q slots turn over many times."""
    monkeypatch.setattr(attention, "HOPPER_FWD_SPLIT", split)
    monkeypatch.setattr(attention, "HOPPER_FWD_PINGPONG", False)
    kw = {}
    if case.startswith("odd"):
        q, k, v = make(2, 1111, 555, 8, 2 if case.endswith("gqa") else 8, D, torch.bfloat16, seed=20)
        kw = dict(causal=case != "odd_full")
    elif case == "ring_step":
        q, k, v = make(1, 1024, 1024, 8, 2, D, torch.float16, seed=21)
        kw = dict(causal=True, q_pos=zigzag(2048, 2, 1), k_pos=zigzag(2048, 2, 0))
    elif case == "many_items":
        q, k, v = make(3, 4096, 4096, 16, 4, D, torch.bfloat16, seed=22)
        pos = torch.arange(4096, device=DEV)
        doc = doc_ids([0, 100, 101, 2000, 4096], pos)
        kw = dict(causal=True, q_doc=doc, k_doc=doc)
    else:
        pos = torch.arange(2048, device=DEV)
        doc = doc_ids([0, 900, 901, 2048], pos)
        q, k, v = make(2, 2048, 2048, 8, 2, D, torch.bfloat16, seed=23)
        kw = dict(causal=True, q_pos=pos, k_pos=pos, window=(256, 0), q_doc=doc, k_doc=doc)
    monkeypatch.setattr(attention, "HOPPER_FWD_PERSISTENT", False)
    one = kernels.forward(q, k, v, **kw)
    monkeypatch.setattr(attention, "HOPPER_FWD_PERSISTENT", True)
    out, lse = check(q, k, v, hopper, **kw)
    again = kernels.forward(q, k, v, **kw)
    for got in ((out, lse), again):
        assert torch.equal(got[0], one[0]) and torch.equal(got[1], one[1])
    if case == "documents_window_fold":  # folded into a running result, in two key blocks
        a = kernels.forward(q, k[:, :1000], v[:, :1000], **dict(kw, k_pos=pos[:1000], k_doc=doc[:1000]))
        kernels.forward(q, k[:, 1000:], v[:, 1000:], **dict(kw, k_pos=pos[1000:], k_doc=doc[1000:]), out=a[0], lse=a[1])
        monkeypatch.setattr(attention, "HOPPER_FWD_PERSISTENT", False)
        b = kernels.forward(q, k[:, :1000], v[:, :1000], **dict(kw, k_pos=pos[:1000], k_doc=doc[:1000]))
        kernels.forward(q, k[:, 1000:], v[:, 1000:], **dict(kw, k_pos=pos[1000:], k_doc=doc[1000:]), out=b[0], lse=b[1])
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("case", ["odd_full", "odd_causal_gqa", "ring_step", "documents_window", "repeat_accumulate"])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("dq_mode", ["kernel", "atomic", "ordered"])
def test_backward_fa3_form(dq_mode, D, case, hopper, monkeypatch):
    """The dK/dV program with FA3's operand routes (HOPPER_BWD_SMEM_P: queries as rows, P and dS
    through shared memory, 64 queries a step), with its dQ kernel or adding dQ itself by bulk TMA
    reductions (HOPPER_BWD_DQ "atomic": any order; "ordered": a fixed order, the last key tile first): against float64 as
    every backward here, on odd lengths, GQA, a ring step, windows with documents; it accumulates
    into given buffers, and two runs are bitwise equal (three for the ordered reductions) but with
    the unordered ones, whose sums come in varying order."""
    monkeypatch.setattr(attention, "HOPPER_BWD_SMEM_P", True)
    monkeypatch.setattr(attention, "HOPPER_BWD_DQ", dq_mode)
    seed = 20 + 10 * (dq_mode != "kernel")
    if case == "odd_full":
        check(*make(2, 1111, 555, 8, 8, D, torch.bfloat16, seed=seed), hopper)
    elif case == "odd_causal_gqa":
        check(*make(2, 1000, 1234, 8, 2, D, torch.float16, seed=seed + 1), hopper, causal=True)
    elif case == "ring_step":
        q, k, v = make(1, 1024, 1024, 8, 2, D, torch.bfloat16, seed=seed + 2)
        check(q, k, v, hopper, causal=True, q_pos=zigzag(2048, 2, 1), k_pos=zigzag(2048, 2, 0))
    elif case == "documents_window":
        pos = torch.arange(2048, device=DEV)
        doc = doc_ids([0, 900, 901, 2048], pos)
        check(*make(2, 2048, 2048, 8, 2, D, torch.bfloat16, seed=seed + 3), hopper, causal=True, q_pos=pos,
              k_pos=pos, window=(256, 0), q_doc=doc, k_doc=doc)
    else:
        q, k, v = make(2, 3000, 3000, 8, 2, D, torch.bfloat16, seed=seed + 4)
        dout = make(2, 3000, 3000, 8, 2, D, torch.bfloat16, seed=seed + 5)[0]
        out, lse = kernels.forward(q, k, v, causal=True)
        delta = kernels.backward_delta(out, dout)
        a = kernels.backward(dout, q, k, v, lse, delta, causal=True)
        assert hopper.count("bwd") == 1
        if dq_mode != "atomic":
            for _ in range(3 if dq_mode == "ordered" else 1):
                b = kernels.backward(dout, q, k, v, lse, delta, causal=True)
                assert all(torch.equal(x, y) for x, y in zip(a, b))
        acc = [torch.ones_like(t) for t in a]
        kernels.backward(dout, q, k, v, lse, delta, causal=True, dq=acc[0], dk=acc[1], dv=acc[2])
        for x, y in zip(acc, a):
            unordered = dq_mode == "atomic"
            assert torch.allclose(x, y + 1, rtol=1e-5 if unordered else 0, atol=1e-4 if unordered else 1e-5)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_backward_padded_keys_low_lse(causal, hopper):
    """Keys past the end of a key tile (1000 keys: the last tile of 128 has 24 rows past Sk) are
    zero-filled, so they score 0: in rows whose every score is near -20 (LSE about -13) their P
    would be exp(13), past float16's range, and so would their dS, which the dK/dV program
    multiplies by the zero rows of K into dQ (inf * 0 = NaN). The default backward (dQ from the
    dK/dV programs) masks those keys: without a mask (every step of that program) and under
    causal (through the tile ranges, where that program has no fully visible tile)."""
    g = torch.Generator(device=DEV).manual_seed(7)
    B, S, H, Hkv, D = 1, 1000, 4, 2, 128
    u = torch.randn(D, generator=g, device=DEV)
    u = u / u.norm()
    noise = lambda *shape: 0.1 * torch.randn(*shape, generator=g, device=DEV)  # noqa: E731
    q = (-15 * u + noise(B, S, H, D)).half()
    k = (15 * u + noise(B, S, Hkv, D)).half()
    v = torch.randn(B, S, Hkv, D, generator=g, device=DEV).half()
    _, lse = check(q, k, v, hopper, causal=causal)
    seen = torch.isfinite(lse)
    assert lse[seen].max().item() < -5  # the rows this case is about


@pytest.mark.parametrize("case", ["causal_gqa", "documents_window", "accumulate"])
@pytest.mark.parametrize("dq_mode", ["ordered", "atomic"])
def test_two_dq_writers(dq_mode, case, hopper, monkeypatch):
    """Two dQ writers (HOPPER_BWD_DQ_WRITERS = 2, the even and the odd steps): against float64 as
    every backward here; ordered, bitwise the gradients of one writer (the additions into each
    query tile keep their order), run after run."""
    monkeypatch.setattr(attention, "HOPPER_BWD_DQ", dq_mode)
    pos = torch.arange(2048, device=DEV)
    doc = doc_ids([0, 900, 901, 2048], pos)
    kw = dict(causal=True)
    if case == "documents_window":
        kw.update(q_pos=pos, k_pos=pos, window=(256, 0), q_doc=doc, k_doc=doc)
    q, k, v = make(2, 2048, 2048, 8, 2, 128, torch.bfloat16, seed=41)
    dout = make(2, 2048, 2048, 8, 2, 128, torch.bfloat16, seed=42)[0]
    out, lse = kernels.forward(q, k, v, **kw)
    delta = kernels.backward_delta(out, dout)
    runs = {}
    for writers in ("1", "2", "2"):
        monkeypatch.setattr(attention, "HOPPER_BWD_DQ_WRITERS", writers)
        if case == "accumulate":
            acc = [torch.ones(t.shape, dtype=torch.float32, device=DEV) for t in (q, k, v)]
            kernels.backward(dout, q, k, v, lse, delta, dq=acc[0], dk=acc[1], dv=acc[2], **kw)
            runs.setdefault(writers, []).append(acc)
        else:
            runs.setdefault(writers, []).append(kernels.backward(dout, q, k, v, lse, delta, **kw))
    assert hopper.count("bwd") == 3
    if dq_mode == "ordered":
        for got in runs["2"]:
            assert all(torch.equal(x, y) for x, y in zip(got, runs["1"][0]))
    else:
        for x, y in zip(runs["2"][0], runs["1"][0]):
            assert torch.allclose(x, y, rtol=1e-5, atol=1e-4)
    monkeypatch.setattr(attention, "HOPPER_BWD_DQ_WRITERS", "2")
    if case != "accumulate":
        check(q, k, v, hopper, **kw)


@pytest.mark.parametrize("case", ["offset", "documents_window", "nothing_visible", "full"])
def test_dq_not_zeroed_first(case, hopper):
    """Ordered (the default), a new dQ is not zeroed before the backward: the first addition into
    each query tile stores it (DQ_MODE = 3), and the tiles no key tile walks are zeroed after
    (float32) or left out of the cast (bf16). On memory full of NaN, the gradients are bitwise
    those added into float32 zeros (0 + x = x), the unwalked rows exact zeros; and against float64."""
    assert attention._dq_mode() == 2
    S = 1500
    kw = dict(causal=True)
    if case == "offset":  # queries 0-699 (the first tiles) see no key
        kw.update(q_pos=torch.arange(S, device=DEV), k_pos=torch.arange(S, device=DEV) + 700)
    elif case == "nothing_visible":
        kw.update(q_pos=torch.arange(S, device=DEV), k_pos=torch.arange(S, device=DEV) + S)
    elif case == "documents_window":
        pos = torch.arange(S, device=DEV)
        doc = doc_ids([0, 1, 700, 701, S], pos)
        kw.update(q_pos=pos, k_pos=pos, window=(100, 0), q_doc=doc, k_doc=doc)
    else:
        kw.update(causal=False)
    q, k, v = make(2, S, S, 8, 2, 128, torch.bfloat16, seed=51)
    dout = make(2, S, S, 8, 2, 128, torch.bfloat16, seed=52)[0]
    out, lse = kernels.forward(q, k, v, **kw)
    delta = kernels.backward_delta(out, dout)
    acc = [torch.zeros(t.shape, dtype=torch.float32, device=DEV) for t in (q, k, v)]
    kernels.backward(dout, q, k, v, lse, delta, dq=acc[0], dk=acc[1], dv=acc[2], **kw)  # into zeros
    for grad_dtype in (torch.float32, torch.bfloat16):
        poison = [torch.full(q.shape, float("nan"), dtype=torch.float32, device=DEV) for _ in range(4)]
        del poison  # the caching allocator hands these blocks out again
        probe = torch.empty(q.shape, dtype=torch.float32, device=DEV)
        assert torch.isnan(probe).all(), "the poisoned block was not reused"
        del probe
        n = len(hopper)
        got = kernels.backward(dout, q, k, v, lse, delta, grad_dtype=grad_dtype, **kw)
        assert hopper[n:] == ["bwd"]
        for x, ref in zip(got, acc):
            assert x.dtype == grad_dtype and torch.equal(x, ref.to(grad_dtype))
    if case == "nothing_visible":
        assert acc[0].abs().max() == 0
    check(q, k, v, hopper, **kw)  # the default path (a new dQ) against float64


@pytest.mark.parametrize("case", ["causal_gqa", "odd_length", "documents_window", "accumulate"])
def test_backward_stats_smem_bitwise(case, hopper, monkeypatch):
    """LSE and delta rows loaded by the producer with Q and dO (HOPPER_BWD_STATS_SMEM, the default)
    change where the rows sit, not what is added in which order: the gradients are bitwise those of
    the consumers' own loads (the setting off), and an odd length takes those loads."""
    S = 2047 if case == "odd_length" else 2048
    pos = torch.arange(S, device=DEV)
    kw = dict(causal=True)
    if case == "documents_window":
        doc = doc_ids([0, 900, 901, S], pos)
        kw.update(q_pos=pos, k_pos=pos, window=(256, 0), q_doc=doc, k_doc=doc)
    q, k, v = make(2, S, S, 8, 2, 128, torch.bfloat16, seed=61)
    dout = make(2, S, S, 8, 2, 128, torch.bfloat16, seed=62)[0]
    out, lse = kernels.forward(q, k, v, **kw)
    delta = kernels.backward_delta(out, dout)

    def run():
        if case == "accumulate":
            acc = [torch.ones(t.shape, dtype=torch.float32, device=DEV) for t in (q, k, v)]
            kernels.backward(dout, q, k, v, lse, delta, dq=acc[0], dk=acc[1], dv=acc[2], **kw)
            return acc
        return kernels.backward(dout, q, k, v, lse, delta, grad_dtype=torch.bfloat16, **kw)

    monkeypatch.setattr(attention, "HOPPER_BWD_STATS_SMEM", True)  # the default, whatever the environment says
    assert attention._stats_smem(lse, delta) == (case != "odd_length")
    got = run()
    monkeypatch.setattr(attention, "HOPPER_BWD_STATS_SMEM", False)
    base = run()
    assert hopper.count("bwd") == 2
    assert all(torch.equal(x, y) for x, y in zip(got, base))
    monkeypatch.setattr(attention, "HOPPER_BWD_STATS_SMEM", True)
    check(q, k, v, hopper, **kw)  # and against float64, with the default


def test_default_choice(monkeypatch):
    """Without the fixture's switches: the module's defaults on this GPU. forward() takes the Hopper
    kernel at D = 128 (bf16 and fp16) and the Triton kernel at D = 64 and for float32; backward()
    takes the Hopper kernel at D = 64 and 128 (bf16 and fp16) and the Triton kernel for float32."""
    import importlib

    monkeypatch.delenv("RINGFLASH_HOPPER_FORWARD", raising=False)
    monkeypatch.delenv("RINGFLASH_HOPPER_BACKWARD", raising=False)
    monkeypatch.delenv("RINGFLASH_HOPPER_BWD_DQ", raising=False)
    fresh = importlib.reload(attention)
    try:
        calls = []
        for name in ("_forward_hopper", "_backward_hopper"):
            real = getattr(fresh, name)
            monkeypatch.setattr(fresh, name, lambda *a, _r=real, _n=name, **kw: (calls.append(_n), _r(*a, **kw))[1])
        both = ["_forward_hopper", "_backward_hopper"]
        for D, dtype, want in ((128, torch.bfloat16, both), (128, torch.float16, both),
                               (64, torch.bfloat16, ["_backward_hopper"]), (128, torch.float32, [])):
            calls.clear()
            q, k, v = make(1, 700, 700, 4, 2, D, dtype, seed=13)
            out, lse = fresh.forward(q, k, v, causal=True)
            ref, _ = reference.forward(q.double(), k.double(), v.double(), causal=True)
            assert rel_err(out, ref) < 2e-2
            fresh.backward(q, q, k, v, lse, fresh.backward_delta(out, q), causal=True)
            assert calls == want, (D, dtype, calls)
    finally:
        importlib.reload(attention)


@pytest.mark.parametrize("case", ["odd_causal_gqa", "window", "two_sided", "documents", "ring_step_documents_window",
                                  "persistent_window", "fold", "hash", "qkdrop_window"])
def test_row_bounds_match_per_tile_masks(case, hopper, monkeypatch):
    """HOPPER_FWD_ROW_BOUNDS (boundary tiles masked by each row's run of visible keys) gives the
    per-tile mask's results bitwise (the same elements are masked, the rest is the same code), and
    against float64 an error within SDPA_FACTOR x the Triton kernel's on the same inputs, rows
    that see no key exactly zero."""
    from ringflash import sparse as sp

    S, H, Hkv, D = 2048, 8, 2, 128
    q, k, v = make(1, S, S, H, Hkv, D, torch.bfloat16, seed=11)
    pos = torch.arange(S, device=DEV)
    doc = doc_ids([0, 700, 1500, 1501, S], pos)
    kw = dict(causal=True)
    if case == "odd_causal_gqa":
        q, k, v = q[:, :1111], k[:, :1111], v[:, :1111]
    elif case in ("window", "persistent_window"):
        kw = dict(causal=True, window=(300, 0))
        if case == "persistent_window":
            monkeypatch.setattr(attention, "HOPPER_FWD_PERSISTENT", True)
    elif case == "two_sided":
        kw = dict(causal=False, window=(200, 77), q_pos=pos, k_pos=pos)
    elif case == "documents":
        kw = dict(causal=True, q_doc=doc, k_doc=doc)
    elif case == "ring_step_documents_window":
        P = 4  # ranks 2 (queries) and 1 (keys) of a striped sequence of S * P tokens
        qp, kp = striped(S * P, P, 2), striped(S * P, P, 1)
        cu = [0, 5, 1200, 1201, 3000, S * P]
        kw = dict(causal=True, q_pos=qp, k_pos=kp, window=(500, 0), q_doc=doc_ids(cu, qp), k_doc=doc_ids(cu, kp))
    elif case in ("hash", "qkdrop_window"):
        g = torch.Generator(device=DEV).manual_seed(12)
        if case == "hash":
            mask = sp.HashSparse(torch.randint(0, 4, (1, S, H), generator=g, device=DEV),
                                 torch.randint(0, 4, (1, S, Hkv), generator=g, device=DEV), 4)
        else:
            mask = sp.QKDrop(torch.rand(1, S, H, generator=g, device=DEV) > 0.4,
                             torch.rand(1, S, Hkv, generator=g, device=DEV) > 0.4)
        q_cpos, q_cdoc, k_cpos, k_cdoc = sp.composite(mask, pos, pos, doc, doc, 4)
        q_order, _ = sp.sort_order(q_cpos)
        k_order, _ = sp.sort_order(k_cpos)
        q, k, v = sp.gather_tokens(q, q_order), sp.gather_tokens(k, k_order), sp.gather_tokens(v, k_order)
        kw = dict(causal=True, q_pos=torch.gather(q_cpos, -1, q_order), q_doc=torch.gather(q_cdoc, -1, q_order),
                  k_pos=torch.gather(k_cpos, -1, k_order), k_doc=torch.gather(k_cdoc, -1, k_order))
        if case == "qkdrop_window":
            kw["window"] = (200, 0)
    run = {}
    for on in (False, True):
        monkeypatch.setattr(attention, "HOPPER_FWD_ROW_BOUNDS", on)
        n = len(hopper)
        if case == "fold":  # the first half of the keys, then the rest folded in
            out, lse = kernels.forward(q, k[:, : S // 2], v[:, : S // 2], q_pos=pos, k_pos=pos[: S // 2], causal=True,
                                       q_doc=doc, k_doc=doc[: S // 2])
            kernels.forward(q, k[:, S // 2:], v[:, S // 2:], q_pos=pos, k_pos=pos[S // 2:], causal=True,
                            q_doc=doc, k_doc=doc[S // 2:], out=out, lse=lse)
        else:
            out, lse = kernels.forward(q, k, v, **kw)
        assert hopper[n:] and set(hopper[n:]) == {"fwd"}, "the Hopper forward did not serve the call"
        run[on] = out, lse
    (o0, l0), (o1, l1) = run[False], run[True]
    assert torch.equal(l0, l1) and torch.equal(o0, o1), f"rel diff {rel_err(o1, o0):.2e}"
    if case == "fold":
        kw = dict(causal=True, q_pos=pos, k_pos=pos, q_doc=doc, k_doc=doc)
    ref, ref_lse = reference.forward(q.double(), k.double(), v.double(), **kw)
    monkeypatch.setattr(attention, "HOPPER_FORWARD", False)
    out_t, _ = kernels.forward(q, k, v, **kw)
    fin = torch.isfinite(ref_lse)
    assert torch.equal(fin, torch.isfinite(l1)) and torch.all(o1.transpose(1, 2)[~fin] == 0)
    err, err_t = rel_err(o1, ref), rel_err(out_t, ref)
    assert err <= SDPA_FACTOR * err_t + 1e-5, f"error {err:.2e} > {SDPA_FACTOR} x the Triton kernel's {err_t:.2e}"


@pytest.mark.parametrize("case", ["odd_causal_gqa", "window", "documents", "ring_step_documents_window", "accumulate"])
def test_backward_row_bounds_match_per_tile_masks(case, hopper, monkeypatch):
    """HOPPER_BWD_ROW_BOUNDS (the dK/dV program's boundary tiles masked by each query row's run of
    visible keys) gives the per-tile mask's dQ, dK and dV bitwise under the deterministic dQ order,
    and against float64 an error within SDPA_FACTOR x the Triton backward's."""
    S, H, Hkv, D = 2048, 8, 2, 128
    q, k, v = make(1, S, S, H, Hkv, D, torch.bfloat16, seed=21)
    dout = torch.randn_like(q)
    pos = torch.arange(S, device=DEV)
    doc = doc_ids([0, 700, 1500, 1501, S], pos)
    kw = dict(causal=True)
    if case == "odd_causal_gqa":
        q, k, v, dout = q[:, :1111], k[:, :1111], v[:, :1111], dout[:, :1111]
    elif case == "window":
        kw = dict(causal=True, window=(300, 0))
    elif case in ("documents", "accumulate"):
        kw = dict(causal=True, q_doc=doc, k_doc=doc)
    else:
        P = 4  # ranks 2 (queries) and 1 (keys) of a striped sequence of S * P tokens
        qp, kp = striped(S * P, P, 2), striped(S * P, P, 1)
        cu = [0, 5, 1200, 1201, 3000, S * P]
        kw = dict(causal=True, q_pos=qp, k_pos=kp, window=(500, 0), q_doc=doc_ids(cu, qp), k_doc=doc_ids(cu, kp))
    monkeypatch.setattr(attention, "HOPPER_BWD_DQ", "ordered")
    out, lse = kernels.forward(q, k, v, **kw)
    delta = kernels.backward_delta(out, dout)
    run = {}
    for on in (False, True):
        monkeypatch.setattr(attention, "HOPPER_BWD_ROW_BOUNDS", "1" if on else "0")
        n = len(hopper)
        if case == "accumulate":  # into float32 gradients that hold something already
            grads = [torch.full(t.shape, 0.5, dtype=torch.float32, device=DEV) for t in (q, k, v)]
            kernels.backward(dout, q, k, v, lse, delta, dq=grads[0], dk=grads[1], dv=grads[2], **kw)
        else:
            grads = kernels.backward(dout, q, k, v, lse, delta, **kw)
        assert hopper[n:] == ["bwd"], "the Hopper backward did not serve the call"
        run[on] = grads
    for name, a, b in zip(("dq", "dk", "dv"), run[False], run[True]):
        assert torch.equal(a, b), f"{name}: rel diff {rel_err(b, a):.2e}"
    if case == "accumulate":
        return
    ref, ref_lse = reference.forward(q.double(), k.double(), v.double(), **kw)
    refs = reference.backward(dout.double(), q.double(), k.double(), v.double(), ref_lse,
                              reference.backward_delta(ref, dout.double()), **kw)
    monkeypatch.setattr(attention, "HOPPER_BACKWARD", False)
    tri = kernels.backward(dout, q, k, v, lse, delta, **kw)
    for name, got, t, ref in zip(("dq", "dk", "dv"), run[True], tri, refs):
        err, err_t = rel_err(got, ref), rel_err(t, ref)
        assert err <= SDPA_FACTOR * err_t + 1e-5, f"{name}: {err:.2e} > {SDPA_FACTOR} x the Triton backward's {err_t:.2e}"
