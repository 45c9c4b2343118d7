"""The training job's --sparsity (launch/): the flag's checks, whole 2-rank runs of each mode on
the CPU (gloo, the reference attention), and a QK-dropping run stopped and resumed.

The runs use test_train.py's launcher and tiny model, 20 steps each.
"""

from __future__ import annotations

import dataclasses
import json
import re

import pytest
import torch

from test_train import TINY, losses, read_metrics, torchrun, train, train_data, _killed_by_launcher

pytestmark = pytest.mark.timeout(240)  # tests here start processes: a hang must fail, not stall

STEPS = 20
MODES = {"hash": "hash:4", "qkdrop": "qkdrop:0.3", "block": "block:size=16,local=2,global=1"}  # TINY: 64 tokens


@pytest.fixture(scope="module")
def sparse_runs(tmp_path_factory) -> dict:
    """An uninterrupted 2-rank run of STEPS steps per mode: {mode: OUT}."""
    runs = {}
    for mode, spec in MODES.items():
        out = tmp_path_factory.mktemp(mode)
        proc = torchrun(*TINY, "--sparsity", spec, "--steps", str(STEPS), "--out", str(out))
        runs[mode] = (out, proc.stderr)
    return runs


def _problems(argv, world_size):
    return train.config_problems(train.parse_args(argv).resolved(), world_size)


def _one_process_first_loss(argv) -> float:
    """The loss of the first step's batch, on one process with the weights the run starts from."""
    cfg = train.parse_args([*TINY, "--device", "cpu", *argv]).resolved()
    torch.manual_seed(cfg.seed)
    model = train.build_model(cfg, None)
    ds = train_data.make_dataset(data=None, seq_len=cfg.seq_len, seed=cfg.seed, recall_pairs=cfg.recall_pairs)
    tokens, labels, _ = ds.batch(0, cfg.batch_size)
    with torch.no_grad():
        return model(tokens, labels)[1].item()


# -- the flag ---------------------------------------------------------------------------------


def test_sparsity_flag_checks_say_what_to_change():
    for spec in MODES.values():
        assert _problems([*TINY, "--sparsity", spec], 2) == [], spec
    assert _problems(["--sparsity", "none"], 2) == []  # dense, as the default ""
    (p,) = _problems(["--sparsity", "hash:0"], 2)
    assert p.startswith("--sparsity 'hash:0': hash:BUCKETS needs a bucket count >= 1")
    (p,) = _problems(["--sparsity", "qkdrop:1.5"], 2)
    assert "qkdrop:FRACTION needs a drop fraction in [0, 1)" in p
    (p,) = _problems(["--sparsity", "lsh:4"], 2)
    assert "unknown sparsity 'lsh:4'; use hash:BUCKETS, qkdrop:FRACTION or block:PATTERN" in p
    (p,) = _problems(["--sparsity", "block:size=16,width=2"], 2)
    assert "comma list of size=, local=, global=, random=, seed=" in p
    # A block pattern tiles the whole sequence: --seq-len a multiple of its block size.
    (p,) = _problems(["--seq-len", "64", "--sparsity", "block:size=7"], 2)
    assert "--seq-len 64 is not a multiple of its block size 7" in p and "63 or 70" in p
    (p,) = _problems(["--seq-len", "64", "--sparsity", "block:size=16,global=5"], 2)
    assert "global=5 blocks" in p and "4 blocks of 16" in p
    # Under Ulysses too; not on PyTorch's fused engines.
    assert _problems(["--sparsity", "hash:4", "--ulysses-size", "2", "--heads", "2", "--kv-heads", "1",
                      "--dim", "32"], 2) == []
    cudnn = ["--device", "cuda", "--dtype", "bfloat16", "--backend", "cudnn", "--sparsity", "qkdrop:0.5"]
    (p,) = train.config_problems(train.parse_args(cudnn).resolved(), 2, hardware=False)
    assert "--sparsity qkdrop:0.5 needs --backend triton" in p and "--backend cudnn" in p
    # Every mode goes with activation checkpointing and torch.compile (the recomputed forward
    # reuses its QK-dropping draw: tests/test_sparse.py checks the gradients).
    for mode in MODES.values():
        assert _problems(["--sparsity", mode, "--checkpoint-activations", "--compile"], 2) == []


def test_auto_ulysses_takes_a_node_with_sparsity_too():
    """--ulysses-size 0 takes a node's ranks for a sequence across nodes, sparse or dense."""
    cfg = train.parse_args(["--heads", "8", "--kv-heads", "2", "--dim", "256"]).resolved()
    assert train.resolve_ulysses(cfg, 16, 8).ulysses_size == 8
    sparse = train.resolve_ulysses(dataclasses.replace(cfg, sparsity="hash:8"), 16, 8)
    assert sparse.ulysses_size == 8
    assert train.config_problems(sparse, 16, hardware=False) == []


def test_sparsity_is_named_in_the_mask_and_may_change_on_resume(tmp_path):
    """The resolved config spells the spec one way (the log line, metrics, meta.json); like
    --window it changes what attention sees, not the weights: a run may resume under another."""
    cfg = train.parse_args(["--sparsity", " block:size=16,local=2 "]).resolved()
    assert cfg.sparsity == "block:size=16,local=2,global=0,random=0,seed=0"
    assert cfg.mask == "causal+sparsity=block:size=16,local=2,global=0,random=0,seed=0"
    assert train.parse_args(["--sparsity", "none"]).resolved().sparsity == ""
    assert train.parse_args(["--task", "packed-recall", "--sparsity", "qkdrop:0.25"]).resolved().mask == (
        "causal+documents+sparsity=qkdrop:0.25")
    assert "sparsity" not in train.sys.modules["config"].RESUME_FIXED
    argv = ["--out", str(tmp_path), "--resume"]
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "meta.json").write_text(json.dumps(
        {"step": 5, "config": dataclasses.asdict(train.parse_args(argv).resolved())}))
    assert _problems(argv + ["--sparsity", "hash:8"], 2) == []


# -- whole runs -------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", list(MODES))
def test_two_ranks_sparse_loss_falls(sparse_runs, mode):
    """Each mode trains on 2 ranks: its first loss is one process's loss of the same sparse model
    (so the flag reached every layer, and the ring computes what one process does), not the
    dense model's; the loss falls; the log line and every record name the mask."""
    out, stderr = sparse_runs[mode]
    spec = str(train.parse_args(["--sparsity", MODES[mode]]).resolved().sparsity)
    assert f"attention causal+sparsity={spec}" in stderr, stderr[-3000:]
    records = read_metrics(out)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert {r["mask"] for r in records} == {f"causal+sparsity={spec}"}
    first = records[0]["loss"]
    assert first == pytest.approx(_one_process_first_loss(["--sparsity", MODES[mode]]), rel=1e-5)
    assert first != pytest.approx(_one_process_first_loss([]), rel=1e-6)  # not dense attention
    last = sum(r["loss"] for r in records[-3:]) / 3
    assert last < first - 1.5, f"loss did not fall: {first:.3f} -> {last:.3f}"
    meta = json.loads((out / "ckpt" / "meta.json").read_text())
    assert meta["config"]["sparsity"] == spec


def test_qkdrop_resume_is_bit_identical(sparse_runs, tmp_path):
    """QK-dropping draws new keep flags every step: a run stopped half-way and resumed draws
    what the uninterrupted run drew (the checkpoint keeps the layers' draw counts)."""
    whole, _ = sparse_runs["qkdrop"]
    half = STEPS // 2
    args = [*TINY, "--sparsity", MODES["qkdrop"], "--lr-decay-steps", str(STEPS), "--out", str(tmp_path)]
    torchrun(*args, "--steps", str(half))
    proc = torchrun(*args, "--steps", str(STEPS), "--resume")
    assert f"resuming at step {half}:" in proc.stderr, proc.stderr[-3000:]
    assert losses(tmp_path) == losses(whole)


BAD = [
    (["--sparsity", "hash:0"], "--sparsity 'hash:0': hash:BUCKETS needs a bucket count >= 1"),
    (["--sparsity", "qkdrop:1.5"], "--sparsity 'qkdrop:1.5': qkdrop:FRACTION needs a drop fraction in [0, 1)"),
    (["--sparsity", "block:size=7"], "--seq-len 64 is not a multiple of its block size 7"),
    (["--sparsity", "lsh:4"], "--sparsity 'lsh:4': unknown sparsity 'lsh:4'"),
]


@pytest.mark.parametrize("args,message", BAD)
def test_bad_sparsity_fails_before_training(tmp_path, monkeypatch, capsys, args, message):
    """launch/train.py's entry point as rank 1 of 2 (torchrun's variables): the message and exit
    status 2 before the process group exists (every rank reaches the same verdict on its own)."""
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    with pytest.raises(SystemExit) as exit_:
        train.main([*TINY, *args, "--device", "cpu", "--steps", "2", "--out", str(tmp_path / "run")])
    assert exit_.value.code == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("[rank 1] train.py: error: ") and message in line, line
    assert not torch.distributed.is_initialized() and not (tmp_path / "run").exists()


def test_bad_sparsity_fails_fast_under_torchrun(tmp_path):
    """The same through torchrun: every rank says it (or was stopped by the launcher first)."""
    args, message = BAD[2]
    proc = torchrun(*TINY, *args, "--steps", "2", "--out", str(tmp_path), check=False, timeout=60)
    assert proc.returncode != 0
    # Split at each rank tag, not only at line ends: two ranks' writes can still meet on one line.
    said = re.split(r"(?=\[rank \d+\] )", proc.stderr)
    printed = [r for r in (0, 1) if any(part.startswith(f"[rank {r}] train.py: error: ") and message in part
                                        for part in said)]
    assert printed, proc.stderr[-3000:]
    assert all(r in printed or _killed_by_launcher(proc.stderr, r) for r in (0, 1)), proc.stderr[-3000:]
    assert 'train.py", line' not in proc.stderr  # a message, not a traceback
    assert not (tmp_path / "metrics.jsonl").exists()
