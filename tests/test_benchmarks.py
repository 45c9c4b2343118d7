"""The benchmark scripts' pure parts: sizes, FLOP counts and the profile's overlap arithmetic."""

from __future__ import annotations

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
from bench_ring import flops, parse_size, ring_backend  # noqa: E402
from profile_ring import summarize  # noqa: E402


def test_parse_size_and_flops():
    assert parse_size("32k") == 32768 and parse_size("2m") == 2 * 1024 * 1024 and parse_size("1000") == 1000
    # FlashAttention convention: 4·B·H·S²·D, halved when causal, ×3.5 for fwd+bwd.
    assert flops(1024, 2, 64, False, "fwd") == 4 * 2 * 1024 * 1024 * 64
    assert flops(1024, 2, 64, True, "fwdbwd") == 3.5 * 4 * 2 * 1024 * 1024 * 64 / 2


def _kernel(name, ts, dur, stream=7):
    return {"ph": "X", "cat": "kernel", "name": name, "ts": ts, "dur": dur, "args": {"stream": stream}}


def test_summarize_overlap(tmp_path):
    # Two iterations, microseconds. Compute on [0, 100) and [150, 300) (two kernels overlapping
    # each other on [200, 250)); NCCL on [50, 120) and [280, 400); nothing on [120, 150).
    events = [
        _kernel("_attn_fwd", 0, 100),
        _kernel("_attn_bwd", 150, 100),
        _kernel("_merge_kernel", 200, 100, stream=9),
        _kernel("ncclDevKernel_SendRecv", 50, 70, stream=17),
        _kernel("ncclDevKernel_SendRecv", 280, 120, stream=17),
        {"ph": "X", "cat": "cpu_op", "name": "aten::add", "ts": 0, "dur": 1000},  # not a kernel
    ]
    path = tmp_path / "trace.json"
    path.write_text(json.dumps({"traceEvents": events}))
    s = summarize(str(path), iters=2)
    ms = 1e-3 / 2
    assert s["window_ms"] == pytest.approx(400 * ms)
    assert s["compute_ms"] == pytest.approx(250 * ms)  # [0,100) + [150,300)
    assert s["nccl_ms"] == pytest.approx(190 * ms) and s["copy_ms"] == 0  # [50,120) + [280,400)
    assert s["overlap"] == pytest.approx(round((50 + 20) / 190, 3))  # [50,100) and [280,300)
    assert s["exposed_ms"] == pytest.approx(120 * ms)  # [100,120) + [300,400)
    assert s["idle_ms"] == pytest.approx(30 * ms)  # [120,150)
    assert s["top_kernels"][0] == ("ncclDevKernel_SendRecv", pytest.approx(190 * ms))


def _copy(name, ts, dur, stream):
    return {"ph": "X", "cat": "gpu_memcpy", "name": name, "ts": ts, "dur": dur, "args": {"stream": stream}}


def test_summarize_counts_the_copy_engine_transfers(tmp_path):
    # Compute on [0, 200). The copy-engine transport's stream 21: a wait kernel [150, 160), its
    # copy [160, 260), a put kernel [260, 262); the compute stream's wait for the next message
    # [300, 310). A local copy on the compute stream [200, 250) is neither compute (a kernel)
    # nor a transfer.
    events = [
        _kernel("_attn_fwd", 0, 200),
        _kernel("c10d::symmetric_memory::wait_signal_kernel(unsigned int**, int)", 150, 10, stream=21),
        _copy("Memcpy PtoP (Device -> Device)", 160, 100, stream=21),
        _kernel("c10d::symmetric_memory::put_signal_kernel(unsigned int**, int)", 260, 2, stream=21),
        _kernel("c10d::symmetric_memory::wait_signal_kernel(unsigned int**, int)", 300, 10),
        _copy("Memcpy DtoD (Device -> Device)", 200, 50, stream=7),
    ]
    path = tmp_path / "trace.json"
    path.write_text(json.dumps({"traceEvents": events}))
    s = summarize(str(path), iters=1)
    ms = 1e-3
    assert s["nccl_ms"] == 0 and s["copy_ms"] == pytest.approx(122 * ms)  # [150,262) + [300,310)
    assert s["overlap"] == pytest.approx(round(50 / 122, 3))  # [150,200)
    assert s["exposed_ms"] == pytest.approx(72 * ms)
    assert s["window_ms"] == pytest.approx(310 * ms) and s["idle_ms"] == pytest.approx(38 * ms)  # [262,300)


def test_summarize_refuses_a_trace_without_kernels(tmp_path):
    path = tmp_path / "trace.json"
    path.write_text(json.dumps({"traceEvents": []}))
    with pytest.raises(RuntimeError, match="no GPU kernels"):
        summarize(str(path), iters=1)


def test_plot_ring_writes_plots_and_table(tmp_path, monkeypatch, capsys):
    pytest.importorskip("matplotlib")
    import plot_ring

    rows = []
    for S in (32768, 131072):
        for mode in ("fwd", "fwdbwd"):
            base = dict(world=2, S=S, H=32, Hkv=8, D=128, causal=True, mode=mode, peak_mem_gib=1.0)
            rows += [dict(base, impl="ringflash", engine=e, layout=lay, tflops_per_gpu=400.0 + i)
                     for i, (e, lay) in enumerate([("triton", "contiguous"), ("triton", "striped"), ("cudnn", "zigzag")])]
            rows.append(dict(base, impl="torch_cp_cudnn", engine="cudnn", layout="zigzag", tflops_per_gpu=450.0))
            rows.append(dict(base, impl="single_gpu", engine="triton", layout="-", tflops_per_gpu=420.0))
    path = tmp_path / "ring.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "plot"
    monkeypatch.setattr(sys, "argv", ["plot_ring.py", str(path), "--out", str(out)])
    plot_ring.main()
    for suffix in ("_throughput.png", "_engines.png", "_striped_vs_contiguous.png"):
        assert (tmp_path / f"plot{suffix}").stat().st_size > 1000
    table = capsys.readouterr().out
    assert "| 128k | 8 | fwdbwd | ringflash | cudnn | zigzag | 402 | - | 1.0 |" in table  # no cuDNN single-GPU row
    assert "| 128k | 8 | fwdbwd | ringflash | triton | striped | 401 | 0.955 | 1.0 |" in table
    assert "NCCL" not in table.splitlines()[0]
    # rows run under different NCCL variables get a column naming them
    rows.append(dict(rows[-4], engine="triton_zero_fill", nccl_env={"NCCL_MAX_P2P_NCHANNELS": "8"}))
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    plot_ring.print_table(plot_ring.argparse.Namespace(files=[str(path)]))
    table = capsys.readouterr().out
    assert table.splitlines()[0].endswith("| NCCL |")
    # another environment is another run: no single-GPU row of its own, no ratio
    assert "| 128k | 8 | fwdbwd | ringflash | triton_zero_fill | striped | 401 | - | 1.0 | NCCL_MAX_P2P_NCHANNELS=8 |" in table
    assert "| 128k | 8 | fwdbwd | ringflash | triton | striped | 401 | 0.955 | 1.0 | - |" in table
    rows.append(dict(rows[-2], nccl_env={"NCCL_MAX_P2P_NCHANNELS": "8"}, tflops_per_gpu=410.0))  # its single GPU
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    plot_ring.print_table(plot_ring.argparse.Namespace(files=[str(path)]))
    assert "| 128k | 8 | fwdbwd | ringflash | triton_zero_fill | striped | 401 | 0.978 | 1.0 | NCCL_MAX_P2P_NCHANNELS=8 |" in capsys.readouterr().out
    rows = rows[:-2]
    # a file per run: a 4-GPU row takes its baseline from its own file, never from the 2-GPU run's
    four = tmp_path / "ring4.jsonl"
    four.write_text("".join(json.dumps(dict(r, world=4)) + "\n" for r in rows if r["impl"] == "ringflash"))
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    plot_ring.print_table(plot_ring.argparse.Namespace(files=[str(path), str(four)]))
    table = capsys.readouterr().out
    assert "| 128k | 8 | fwdbwd | ringflash | triton | striped | 401 | 0.955 | 1.0 |" in table
    assert "| 128k | 8 | fwdbwd | ringflash | triton | striped | 401 | - | 1.0 |" in table
    assert plot_ring._label(plot_ring.load([str(four)])[0]) == "ringflash triton contiguous"
    assert plot_ring._label([r for r in plot_ring.load([str(path), str(four)]) if r["world"] == 4][0]) == \
        "ringflash triton contiguous [4 GPUs]"
    assert plot_ring._label(rows[2]) == "ringflash cudnn zigzag"
    assert plot_ring._label({"impl": "ringflash", "layout": "striped"}) == "ringflash striped"
    # rows timed with the last dK/dV hop whole, and single-GPU rows of another engine
    whole = dict(rows[2], last_hop_parts=1)
    assert plot_ring._label(whole) == "ringflash cudnn zigzag (last hop in 1)"
    assert plot_ring._label(dict(rows[2], last_hop_parts=plot_ring.LAST_HOP_PARTS)) == "ringflash cudnn zigzag"
    assert plot_ring._label(dict(rows[4], engine="cudnn")) == "single_gpu cudnn"
    assert plot_ring._label(dict(rows[2], head_start_us=0.0)) == "ringflash cudnn zigzag (head start 0 us)"
    assert plot_ring._label(dict(rows[2], head_start_us=plot_ring.HEAD_START_US)) == "ringflash cudnn zigzag"
    # copy-engine rows: their own series, their receive workspace added to the table's peak
    ce = dict(rows[1], transport="copy_engine", workspace_gib=0.5)
    assert plot_ring._label(ce) == "ringflash triton striped (copy engine)"
    path.write_text(json.dumps(ce) + "\n" + json.dumps(rows[4]) + "\n")
    plot_ring.print_table(plot_ring.argparse.Namespace(files=[str(path)]))
    assert "| 32k | 8 | fwd | ringflash | triton | striped (copy engine) | 401 | 0.955 | 1.5 |" in capsys.readouterr().out
    # an A/B of the copy engine's signalling: one series and one table row per mode
    kernel, stream = (dict(ce, ce_signals=m, tflops_per_gpu=t) for m, t in (("kernel", 401.0), ("stream", 405.0)))
    assert plot_ring._label(stream) == "ringflash triton striped (copy engine, stream signals)"
    path.write_text("".join(json.dumps(r) + "\n" for r in (stream, kernel, rows[4])))
    plot_ring.print_table(plot_ring.argparse.Namespace(files=[str(path)]))
    table = capsys.readouterr().out.splitlines()
    assert [line.split(" | ")[5:7] for line in table[2:4]] == [
        ["striped (copy engine, kernel signals)", "401"], ["striped (copy engine, stream signals)", "405"]]


def test_ring_backend_of_the_benchmarks():
    """``triton_head_start`` is the Triton engine with the SDPA engines' head start (an A/B of
    ringflash.ring.HEAD_START_US), ``triton_zero_fill`` without the dK/dV store; named engines
    pass through."""
    assert ring_backend("cudnn") == "cudnn" and ring_backend("triton") == "triton"
    be = ring_backend("triton_head_start")
    assert be.name == "triton" and be.holds_sms and be.dkdv_hook and be.dkdv_store
    be = ring_backend("triton_zero_fill")
    assert be.name == "triton" and not be.dkdv_store and not getattr(be, "holds_sms", False)


def test_nccl_env_of_the_rows(monkeypatch):
    """The rows record the NCCL variables the run had, and only those."""
    from bench_ring import nccl_env

    for name in [n for n in os.environ if n.startswith(("NCCL_", "TORCH_NCCL_"))]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("NCCL_MAX_P2P_NCHANNELS", "8")
    monkeypatch.setenv("TORCH_NCCL_HIGH_PRIORITY", "1")
    monkeypatch.setenv("NOT_NCCL_X", "1")
    assert nccl_env() == {"NCCL_MAX_P2P_NCHANNELS": "8", "TORCH_NCCL_HIGH_PRIORITY": "1"}


def test_ring_bench_predicts_each_split_with_the_cost_model():
    """bench_ring.py --ulysses: the cost model's causal fwd+bwd time of a split on one node of P
    GPUs beside its measurement; None where the model does not apply (U not dividing the heads)."""
    from types import SimpleNamespace

    import cost_model
    from bench_ring import predicted_ms

    args = SimpleNamespace(model_tflops=400.0, nvlink_gbs=260.0)
    want = cost_model.estimate(seqlen=131072, heads=32, kv_heads=8, head_dim=128, nodes=1, gpus_per_node=4,
                               ulysses=2, tflops=400.0, nvlink_gbs=260.0, net_gbs=260.0).total_ms
    assert predicted_ms(131072, 32, 8, 128, 4, 2, args) == round(want, 3)
    assert predicted_ms(131072, 32, 8, 128, 4, 1, args) < predicted_ms(131072, 32, 8, 128, 4, 4, args) * 10
    assert predicted_ms(131072, 30, 8, 128, 4, 4, args) is None


def _masked_ring_hops(rank, world_size):
    from types import SimpleNamespace

    import torch

    from bench_ring_masks import mask_kwargs, pairs, ring_hops

    from ringflash import get_layout

    args = SimpleNamespace(window=3, doc_seed=0, doc_median=8)
    S, L = 64, 64 // world_size
    g = torch.Generator().manual_seed(rank)
    q, k, v = (torch.randn(1, L, 2, 8, generator=g) for _ in range(3))
    out = {}
    for mask in ("causal", "documents", "window"):
        kw = mask_kwargs(mask, S, args)
        out[mask] = (pairs(mask, S, kw, args), ring_hops(q, k, v, get_layout("contiguous"), kw, "fwd"),
                     ring_hops(q, k, v, get_layout("contiguous"), kw, "fwdbwd"))
    return out


def test_masked_ring_benchmark_counts_pairs_and_hops():
    """bench_ring_masks.py's mask arguments, visible pairs and hop count, on 4 CPU ranks: a window
    that a contiguous shard holds takes one forward hop where dense causal takes P - 1, and fewer
    in the backward too; the pairs are those of the dense masks."""
    from distributed import spawn

    from bench_masks import documents

    results = spawn(_masked_ring_hops, 4)
    for res in results[1:]:
        assert res == results[0]  # every rank counts the same exchanges
    res = results[0]
    S = 64
    assert res["causal"][0] == S * (S + 1) // 2
    cu = documents(S, seed=0, median=8)
    assert res["documents"][0] == sum((b - a) * (b - a + 1) // 2 for a, b in zip(cu[:-1], cu[1:]))
    assert res["window"][0] == 3 * 4 // 2 + (S - 3) * 4
    assert res["causal"][1] == 3 and res["window"][1] == 1
    assert res["window"][2] < res["causal"][2]
    assert res["documents"][1] <= res["causal"][1]


def _sparse_ring_rows(rank, world_size):
    """bench_ring_sparse.py's local sparsity and visible pairs on this rank, for each setting and
    layout; the ring's output with them against one process's float64 attention under the global
    mask (the rows of this rank's positions)."""
    from types import SimpleNamespace

    import torch

    from bench_ring_sparse import _ids, layout_of, sparsity_for

    from ringflash import flash_attention, ring_attention, sparse

    args = SimpleNamespace(seed=3, block_size=8, block_local=2, block_global=1, block_random=1)
    S, H, Hkv, D = 64, 4, 2, 8
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, S, h, D, generator=g, dtype=torch.float64) for h in (H, Hkv, Hkv))
    every = torch.arange(S)
    global_sp = {
        "hash:3": sparse.HashSparse(_ids(S, H, 3, 3, "cpu"), _ids(S, Hkv, 3, 4, "cpu"), 3),
        "qkdrop:0.5": sparse.QKDrop(sparse.keep_random(every, 1, H, 0.5, seed=3),
                                    sparse.keep_random(every, 1, Hkv, 0.5, seed=4)),
        "block": sparse.block_pattern(S, 8, local=2, global_=1, random=1, seed=3),
    }
    out = {}
    for name in ("zigzag", "striped", "striped:8", "contiguous"):
        layout = layout_of(name)
        pos = layout.positions(S, rank=rank, world_size=world_size)
        for spec, gsp in global_sp.items():
            sp, pairs = sparsity_for(spec, S, H, Hkv, layout, rank, world_size, "cpu", args)
            got = ring_attention(q[:, pos], k[:, pos], v[:, pos], causal=True, layout=layout, sparsity=sp)
            want = flash_attention(q, k, v, causal=True, sparsity=gsp)[:, pos]
            out[(name, spec)] = (pairs, float((got - want).abs().max()))
    return out


def test_sparse_ring_benchmark_shards_and_counts():
    """bench_ring_sparse.py on 2 CPU ranks: each rank's sparsity is the global mask's rows at its
    positions (the ring's output equals one process's float64 attention), and the visible pairs
    are those of the global masks built here by brute force."""
    import torch
    from distributed import spawn

    from bench_ring_sparse import _ids

    from ringflash import sparse

    results = spawn(_sparse_ring_rows, 2)
    S, H, Hkv = 64, 4, 2
    causal = torch.ones(S, S, dtype=torch.bool).tril()
    qb, kb = _ids(S, H, 3, 3, "cpu")[0], _ids(S, Hkv, 3, 4, "cpu")[0]
    every = torch.arange(S)
    qk, kk = sparse.keep_random(every, 1, H, 0.5, seed=3)[0], sparse.keep_random(every, 1, Hkv, 0.5, seed=4)[0]
    pattern = sparse.block_pattern(S, 8, local=2, global_=1, random=1, seed=3).pattern.bool()
    blocks = pattern[every // 8][:, every // 8]
    want = {
        "hash:3": sum(int(((qb[:, h, None] == kb[None, :, h // 2]) & causal).sum()) for h in range(H)),
        "qkdrop:0.5": sum(int((qk[:, h, None] & kk[None, :, h // 2] & causal).sum()) for h in range(H)),
        "block": int((blocks & causal).sum()) * H,
    }
    assert all(0 < w < int(causal.sum()) * H for w in want.values()), want
    for res in results:
        for (layout, spec), (pairs, err) in res.items():
            assert pairs == want[spec], (layout, spec)
            assert err < 1e-12, (layout, spec, err)


def test_result_row_keeps_failures_as_rows(tmp_path):
    """The ring benchmarks' rows: what a row's block raises becomes its ``error``; every row is
    kept and written (rank 0)."""
    from bench_ring import result_row

    rows, out = [], str(tmp_path / "rows.jsonl")
    with result_row({"impl": "a"}, rows, 0, out) as row:
        row["ms"] = 1.5
    with result_row({"impl": "b"}, rows, 0, out) as row:
        raise ValueError("no such layout\nsecond line")
    with result_row({"impl": "c"}, rows, 1, out):  # another rank: kept, not written
        pass
    assert rows == [{"impl": "a", "ms": 1.5}, {"impl": "b", "error": "ValueError: no such layout"}, {"impl": "c"}]
    assert [json.loads(line)["impl"] for line in open(out)] == ["a", "b"]


def test_program_cost_counts_and_fit(tmp_path, capsys):
    """bench_program_cost.py: its tile and pair counts against a brute-force count (at a small S),
    and its fit recovers a per-tile rate and a fixed part that a synthetic run was made of."""
    import bench_program_cost as pc
    import torch

    saved = pc.S, pc.H, pc.BLOCK
    try:
        pc.S, pc.H, pc.BLOCK = 64, 1, 8
        i = torch.arange(pc.S)
        tq, tk = i[:, None] // pc.BLOCK, i[None, :] // pc.BLOCK
        for mask, p in (("causal", None), ("window", 5), ("window", 17), ("docs", 16), ("docs", 8), ("docs", 12)):
            if mask == "causal":
                ok = i[None, :] <= i[:, None]
            elif mask == "window":
                ok = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - p)
            else:
                ok = (i[None, :] <= i[:, None]) & (i[None, :] // p == i[:, None] // p)
            assert pc.visible(mask, p) == int(ok.sum())
            touched = {(int(a), int(b)) for a, b in zip(tq.expand_as(ok)[ok], tk.expand_as(ok)[ok])}
            assert pc.tiles(mask, p) == len(touched), (mask, p)
    finally:
        pc.S, pc.H, pc.BLOCK = saved

    # a run made of 2e-5 ms per tile plus 0.5 ms, the causal call at the same tile rate
    rows = [dict(gpu="synthetic", mask="causal", param=None, hopper=False, fwd_ms=2e-5 * pc.tiles("causal", None))]
    for mask, params in (("window", pc.WINDOWS), ("docs", pc.DOC_LENGTHS)):
        rows += [dict(gpu="synthetic", mask=mask, param=p, hopper=False, fwd_ms=2e-5 * pc.tiles(mask, p) + 0.5)
                 for p in params]
    path = tmp_path / "program_cost.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    pc.analyze(str(path))
    out = capsys.readouterr().out
    assert "fwd: 20.00 ms per million tiles" in out and "fixed part 0.500 ms" in out, out


def test_host_breakdown_times_each_function_and_restores_them():
    """profile_sparse_host.py --breakdown: inside ``timed_functions`` every reference to a timed
    function (here ``ringflash.flash_attention``, also exported by the package) and the autograd
    Function's methods count their calls; on exit the originals are back."""
    import torch

    import ringflash
    from ringflash import ops
    from profile_sparse_host import timed_functions

    before = (ringflash.flash_attention, ops.flash_attention, ops._FlashAttention.__dict__["forward"])
    q, k, v = (torch.randn(1, 8, 2, 16, requires_grad=True) for _ in range(3))
    with timed_functions() as totals:
        assert ringflash.flash_attention is not before[0] and ops.flash_attention is not before[1]
        for _ in range(2):
            ringflash.flash_attention(q, k, v, causal=True, backend="reference").sum().backward()
    assert totals["ops.flash_attention"][1] == 2 and totals["ops.flash_attention"][0] > 0
    assert totals["_FlashAttention.forward"][1] == 2 and totals["_FlashAttention.backward"][1] == 2
    assert (ringflash.flash_attention, ops.flash_attention, ops._FlashAttention.__dict__["forward"]) == before


def test_token_tile_model_covers_every_visible_pair():
    """model_token_tiles.py's counts from the kernels' tile ranges, against brute force on a small
    hash call: the computed pairs cover every tile that holds a visible pair (and at most every
    causal tile of its bucket run), and every tile counted fully visible is."""
    import torch

    from model_token_tiles import computed, visible_pairs
    from ringflash import sparse
    from ringflash.kernels import attention as katt

    S, H, nb, bm, bn = 96, 2, 3, 16, 8
    g = torch.Generator().manual_seed(5)
    mode = sparse.HashSparse(*(torch.randint(0, nb, (1, S, H), generator=g, dtype=torch.int32) for _ in range(2)), nb)
    pos = torch.arange(S)
    q_c, k_c = (torch.sort(c, -1).values for c in sparse.composite_positions(mode, pos, pos, None, None, 1))
    vis = (q_c[0, :, :, None] >> 31 == k_c[0, :, None, :] >> 31) & (
        (q_c[0, :, :, None] & (2**31 - 1)) >= (k_c[0, :, None, :] & (2**31 - 1)))  # (H, S, S)
    assert int(vis.sum()) == visible_pairs(mode)
    tiles = vis.view(H, S // bm, bm, S // bn, bn)
    any_vis, all_vis = tiles.any(4).any(2), tiles.all(4).all(2)
    m = katt._mask_args(q_c, k_c, True, None, (q_c >> 31).int(), (k_c >> 31).int(), S, S, torch.device("cpu"),
                        shape=(1, H, H))
    c = computed(m, S, H, bm, bn, by_keys=False)
    assert c["computed"] >= int(any_vis.sum()) * bm * bn >= int(vis.sum())
    assert c["tiles"] >= int(any_vis.sum()) and c["full_tiles"] <= int(all_vis.sum())
    ck = computed(m, S, H, bm, bn, by_keys=True)
    assert ck["computed"] >= int(any_vis.sum()) * bm * bn and ck["full_tiles"] <= int(all_vis.sum())


def test_attention_settings_are_set_during_a_call_and_restored():
    """bench_kernels.with_attention_settings (the A/B impls of bench_kernels and bench_masks): the
    kernels' module settings hold during the call and are restored after it, also when it raises."""
    from bench_kernels import with_attention_settings
    from ringflash.kernels import attention

    before = attention.HOPPER_BWD_STATS_SMEM
    seen = []
    run = with_attention_settings(lambda: seen.append(attention.HOPPER_BWD_STATS_SMEM) or "out",
                                  {"HOPPER_BWD_STATS_SMEM": not before})
    assert run() == "out" and seen == [not before]
    assert attention.HOPPER_BWD_STATS_SMEM == before

    def fails():
        raise RuntimeError("inside")

    with pytest.raises(RuntimeError, match="inside"):
        with_attention_settings(fails, {"HOPPER_BWD_STATS_SMEM": not before})()
    assert attention.HOPPER_BWD_STATS_SMEM == before


def test_prev_kernels_timed_beside_this_trees(tmp_path):
    """bench_kernels --prev: another tree's kernels package loads under its own name, beside this
    tree's (not the same module objects), and ringflash_prev calls it as ringflash_default calls
    this tree's; here the copy is this tree's own package, so the results agree exactly."""
    import shutil

    import torch

    from common import require_interpreter

    require_interpreter()
    import bench_kernels
    from ringflash import kernels

    copy = tmp_path / "kernels"
    shutil.copytree(os.path.dirname(kernels.__file__), copy, ignore=shutil.ignore_patterns("__pycache__"))
    saved = bench_kernels.PREV
    try:
        bench_kernels.PREV = None
        with pytest.raises(ValueError, match="--prev"):
            bench_kernels.make_fns("ringflash_prev", *[torch.zeros(1, 16, 2, 16)] * 4, True)
        bench_kernels.PREV = prev = bench_kernels.load_prev(str(copy))
        assert prev is not kernels and prev.forward is not kernels.forward
        assert prev.__file__.startswith(str(copy))
        torch.manual_seed(0)
        q, k, v, dout = (torch.randn(1, 48, 2, 16) for _ in range(4))
        for mine, theirs in zip(bench_kernels.make_fns("ringflash_default", q, k, v, dout, True),
                                bench_kernels.make_fns("ringflash_prev", q, k, v, dout, True)):
            a, b = mine(), theirs()
            a, b = (a,) if torch.is_tensor(a) else a, (b,) if torch.is_tensor(b) else b
            assert all(torch.equal(x, y) for x, y in zip(a, b))
    finally:
        bench_kernels.PREV = saved
        sys.modules.pop("kernels_prev", None)
