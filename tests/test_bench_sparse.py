"""benchmarks/bench_sparse.py on the CPU: its --cpu-model run on tiny sizes (every timed callable
run once under Triton's interpreter, the layouts' tile counts), its densities against a
brute-force count of the dense mask, and its comparison arithmetic on given times."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import bench_sparse as bs  # noqa: E402

from ringflash.mask import visible  # noqa: E402

S, H, D, BLOCK = 64, 2, 16, 16
LAYOUT_S, LAYOUT_D = 1024, 64
ARGS = ["--seqlens", str(S), "--head-dims", str(D), "--heads", str(H), "--block-size", str(BLOCK),
        "--hash-buckets", "4", "--hash-ids", "random", "lsh", "--qkdrop", "0.5",
        "--block-patterns", "local=2,global=1", "density=0.25"]


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    out = tmp_path_factory.mktemp("sparse") / "sparse.jsonl"
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=ROOT, CUDA_VISIBLE_DEVICES="")
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "bench_sparse.py"), "--cpu-model", "--smoke", *ARGS,
           "--layouts", "--layout-seqlen", str(LAYOUT_S), "--layout-head-dim", str(LAYOUT_D), "--worlds", "2", "4",
           "--out", str(out)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "how each layout maps global blocks onto local tiles" in res.stdout
    return [json.loads(line) for line in out.read_text().splitlines()]


def _settings():
    """The run's settings, rebuilt in this process from the same seeds."""
    args = argparse.Namespace(masks=["hash", "qkdrop", "block_sparse"], hash_buckets=[4],
                              hash_ids=["random", "lsh"], qkdrop=[0.5], block_size=BLOCK,
                              block_patterns=["local=2,global=1", "density=0.25"], seed=0)
    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(1, S, H, D, generator=g, dtype=torch.float32) for _ in range(2))
    return bs.settings(args, S, 1, H, D, torch.device("cpu"), q, k)


def _brute_force(sp, seqlen: int) -> int:
    """Visible (query, key) pairs of causal + ``sp`` from the dense (B, H, S, S) mask."""
    pos = torch.arange(seqlen)
    if sp is None:
        return H * seqlen * (seqlen + 1) // 2
    if isinstance(sp, bs.BlockSparse):
        return H * int(visible(pos, pos, causal=True, blocks=sp).sum())
    causal = visible(pos, pos, causal=True)
    if isinstance(sp, bs.QKDrop):
        q, k = sp.q_keep.transpose(1, 2), sp.k_keep.transpose(1, 2)  # (B, H, S)
        tok = q[..., :, None] & k[..., None, :]
    else:
        q, k = sp.q_buckets.transpose(1, 2), sp.k_buckets.transpose(1, 2)
        tok = q[..., :, None] == k[..., None, :]
    return int((tok & causal).sum())


def test_kernel_rows(rows):
    kern = [r for r in rows if r["part"] == "kernels"]
    fields = {"impl", "gpu", "S", "D", "H", "mask", "sparsity", "density", "mode", "ms"}
    assert kern and all(fields <= r.keys() for r in kern)
    assert not [r for r in kern if "error" in r]
    assert {r["mask"] for r in kern} == {"causal", "hash", "qkdrop", "block_sparse"}
    assert {r["mode"] for r in kern} == {"fwd", "fwd+bwd"}  # no times on the CPU: no derived bwd
    assert {r["impl"] for r in kern} == {"ringflash", "ringflash-kernel", "sdpa_flash"}
    assert {r["impl"] for r in kern if r["mask"] != "causal"} == {"ringflash", "ringflash-kernel"}
    # 1 dense (3 impls) + 2 hash + 1 qkdrop + 2 block settings (2 impls), 2 modes each
    assert len(kern) == 2 * (3 + 2 * 5)
    assert all(r["gpu"] == "cpu" and r["ms"] is None for r in kern)
    # The default positions of flash_attention are made once per shape, like the ring's, so its
    # block tile lists hit the kernels' cache after the first call, as fixed positions do.
    for r in kern:
        if r["mask"] == "block_sparse":
            assert r["lists_built_per_call"] == {"fwd": 0, "fwd+bwd": 0}, r


def test_densities_match_a_brute_force_count(rows):
    got = {r["sparsity"]: r for r in rows if r["part"] == "kernels" and r["impl"] == "ringflash" and r["mode"] == "fwd"}
    sets = _settings()
    assert {s["sparsity"] for s in sets} == set(got)
    causal_pairs = H * S * (S + 1) // 2
    for s in sets:
        vis = _brute_force(s["sp"], S)
        assert s["visible"] == vis, s["sparsity"]
        r = got[s["sparsity"]]
        assert r["visible_pairs"] == vis and r["causal_pairs"] == causal_pairs
        assert r["density"] == pytest.approx(vis / causal_pairs, abs=1e-15), s["sparsity"]
        if s["mask"] == "block_sparse":  # the library's closed form agrees
            assert r["density"] == pytest.approx(r["density_lib"], abs=1e-12)
    d25 = next(s for s in sets if "density~0.25" in s["sparsity"])
    assert abs(d25["density"] - 0.25) < 0.1


def test_layout_rows(rows):
    lay = [r for r in rows if r["part"] == "layouts"]
    assert {(r["layout"], r["P"]) for r in lay} == {(n, p) for n in bs.LAYOUTS for p in (2, 4)}
    assert {r["pattern"] for r in lay} == {"causal", "local=2,global=1", "density=0.25"}
    block_m, block_n = bs.fwd_tiles(LAYOUT_D)
    pos = torch.arange(LAYOUT_S)
    for r in lay:
        assert r["block_m"] == block_m and r["block_n"] == block_n and r["S"] == LAYOUT_S
        sp = None
        if r["pattern"] != "causal":
            sp, _ = bs.make_block(LAYOUT_S, BLOCK, bs.parse_block(r["pattern"]))
        per_q = visible(pos, pos, causal=True, blocks=sp).sum(1)
        layout = bs.make_layout(r["layout"])
        for rank in range(r["P"]):
            mine = layout.positions(LAYOUT_S, rank=rank, world_size=r["P"])
            assert r["rank_visible"][rank] == int(per_q[mine].sum())
            assert r["rank_computed"][rank] >= r["rank_visible"][rank]
        assert r["visible_pairs"] == int(per_q.sum()) and 0 < r["tile_density"] <= 1
        assert sum(s["computed"] for s in r["step_detail"]) == r["computed_pairs"] == sum(r["rank_computed"])
        assert len(r["step_detail"]) == r["launched"] and "pace_ms" not in r
    by = {(r["layout"], r["P"], r["pattern"]): r for r in lay}
    for P in (2, 4):
        # causal: contiguous rank r runs steps 0..r, striped every step; a tile of block_m queries
        # spans block_m (contiguous) or block_m * P (striped) positions, i.e. that many / 16 blocks
        assert by[("contiguous", P, "causal")]["launched"] == P * (P + 1) // 2
        assert by[("striped", P, "causal")]["launched"] == P * P
        assert by[("striped", P, "causal")]["blocks_per_tile"] == pytest.approx(block_m * P / BLOCK)
        assert by[("contiguous", P, "causal")]["blocks_per_tile"] == pytest.approx(block_m / BLOCK)


@pytest.mark.skipif(not bs.kernels.INTERPRETED, reason="runs the kernels on CPU tensors (Triton's interpreter)")
def test_kernel_level_calls_compute_what_flash_attention_does():
    """The ``ringflash-kernel`` callables (inputs sorted beforehand, fixed positions) give
    flash_attention's output, once put back in the caller's order."""
    from ringflash.reference import default_positions
    from ringflash.sparse import composite, gather_tokens, sort_order

    g = torch.Generator().manual_seed(1)
    q, k, v, dout = (torch.randn(1, S, H, D, generator=g) for _ in range(4))
    for s in _settings():
        if s["sparsity"].endswith(":lsh") or "density" in s["label"]:
            continue
        want = bs.user_fns(q, k, v, dout, s["sp"])["fwd"]()
        got, _ = bs.kernel_fns(q, k, v, dout, s["sp"])["fwd"]()
        if s["mask"] in ("hash", "qkdrop"):
            q_cpos = composite(s["sp"], *default_positions(S, S), None, None, 1)[0]
            got = gather_tokens(got, sort_order(q_cpos)[1])
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=s["sparsity"])


def _rec(mask, ms, mode="fwd", density=1.0, impl="ringflash"):
    return dict(impl=impl, S=8192, D=128, mode=mode, mask=mask, sparsity=mask, density=density,
                visible_pairs=int(density * 1000), ms=ms)


def test_comparison_arithmetic(capsys):
    written, dense = [], {}
    bs.finish(_rec("causal", 10.0), dense, written.append)
    r = bs.finish(_rec("hash", 3.0, density=0.25), dense, written.append)
    assert r["dense_ms"] == 10.0 and r["ratio"] == pytest.approx(0.3) and r["expected"] == 0.25
    assert r["work_efficiency"] == pytest.approx(1.2) and r["meets_bar"]
    assert r["speedup"] == pytest.approx(10 / 3)
    r = bs.finish(_rec("hash", 3.5, density=0.25), dense, written.append)
    assert not r["meets_bar"]
    # another impl or mode has its own dense baseline
    r = bs.finish(_rec("hash", 3.0, mode="fwd+bwd", density=0.25), dense, written.append)
    assert "ratio" not in r
    assert len(written) == 4
    bs.summary([dict(x, pattern="") for x in written])
    assert "1/2" in capsys.readouterr().out
