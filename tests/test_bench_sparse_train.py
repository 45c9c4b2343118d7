"""benchmarks/bench_sparse_train.py on the CPU with tiny settings: the rows it writes, the corpus
split and cache, and the attention density it reports, checked against a brute force."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import bench_sparse_train as bst  # noqa: E402

RUN_FIELDS = {"kind", "impl", "sparsity", "gpu", "S", "steps", "steps_planned", "steps_timed", "batch",
              "tokens_per_step", "tokens_per_s", "tokens_per_s_median", "ms_per_step", "first_step_s",
              "val_loss", "val_bpb",
              "train_loss_last", "loss_curve", "attn_density", "peak_mem_gb", "corpus", "model", "train",
              "stopped_by_time", "params"}
SUMMARY_FIELDS = {"kind", "impl", "S", "gpu", "steps", "steps_match", "tokens_per_s_dense",
                  "tokens_per_s_sparse", "speedup", "speedup_median", "paper_speedup", "val_loss_dense",
                  "val_loss_sparse",
                  "val_loss_delta", "attn_density", "attn_flop_share", "amdahl_speedup"}


def _json_package() -> str:
    return os.path.dirname(json.__file__)  # a few files of the standard library


def test_tiny_cpu_run_writes_runs_and_summary(tmp_path):
    out = tmp_path / "results.jsonl"
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "bench_sparse_train.py"), "--device", "cpu",
           "--seqlens", "64", "--dim", "32", "--layers", "2", "--heads", "2", "--steps", "3",
           "--tokens-per-step", "128", "--val-batches", "2", "--sources", _json_package(),
           "--cache", str(tmp_path / "cache"), "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": ROOT, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "speedup" in proc.stdout and str(out) in proc.stdout
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    runs = [r for r in rows if r["kind"] == "run"]
    summaries = [r for r in rows if r["kind"] == "summary"]
    assert [r["impl"] for r in runs] == ["dense", "hash:8"] and len(summaries) == 1
    for r in runs:
        assert RUN_FIELDS <= r.keys() and "error" not in r, r
        assert r["gpu"] == "cpu" and r["S"] == 64 and r["batch"] == 2 and r["tokens_per_step"] == 128
        assert r["steps"] == r["steps_planned"] == 3 and r["steps_timed"] >= 1 and not r["stopped_by_time"]
        assert r["tokens_per_s"] > 0 and r["tokens_per_s_median"] > 0 and r["peak_mem_gb"] is None
        assert 0 < r["val_loss"] < 10 and r["val_bpb"] == pytest.approx(r["val_loss"] / 0.6931472, abs=1e-3)
        assert r["loss_curve"][-1][0] == 3 and r["train_loss_last"] == r["loss_curve"][-1][1]
        assert r["model"]["backend"] == "reference" and r["model"]["dim"] == 32
        c = r["corpus"]
        assert c["files_train"] >= 1 and c["files_val"] >= 1 and c["bytes_train"] > c["bytes_val"] > 64
        assert os.path.exists(c["cache"] + "_train.npy")
    assert runs[0]["attn_density"] is None and 0 < runs[1]["attn_density"] < 1
    s = summaries[0]
    assert SUMMARY_FIELDS <= s.keys() and s["impl"] == "hash:8" and s["steps_match"]
    assert s["speedup"] == pytest.approx(runs[1]["tokens_per_s"] / runs[0]["tokens_per_s"], rel=1e-2)
    assert s["val_loss_delta"] == pytest.approx(runs[1]["val_loss"] - runs[0]["val_loss"], abs=1e-3)
    assert 0 < s["attn_flop_share"] < 1 and s["amdahl_speedup"] >= 1


def test_corpus_split_is_deterministic_and_cached(tmp_path):
    args = ([_json_package()], (".py",), 1 << 20, 0.05, str(tmp_path))
    train, val, info = bst.build_corpus(*args)
    assert not info["cached"] and info["files_val"] == 1
    assert train.size == info["bytes_train"] and val.size == info["bytes_val"]
    assert bytes(train[:2]) != b"\0\0" and bytes(val).count(b"\0") == 0  # one validation file, no separator
    train2, val2, info2 = bst.build_corpus(*args)
    assert info2["cached"] and info2["sha1_train"] == info["sha1_train"]
    assert bytes(train2) == bytes(train) and bytes(val2) == bytes(val)


def test_causal_density_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    B, S, H, Hkv, nb = 2, 37, 4, 2, 3
    qb = torch.randint(0, nb, (B, S, H), generator=g)
    kb = torch.randint(0, nb, (B, S, Hkv), generator=g)
    seen = total = 0
    for b in range(B):
        for h in range(H):
            for i in range(S):
                for j in range(i + 1):
                    total += 1
                    seen += int(qb[b, i, h] == kb[b, j, h // (H // Hkv)])
    assert bst.causal_density(qb, kb, nb) == pytest.approx(seen / total)
    assert bst.causal_density(torch.zeros(1, 8, 1, dtype=torch.long), torch.zeros(1, 8, 1, dtype=torch.long), 1) == 1.0
