"""The training job (launch/) on the CPU: data, config checks, gradients over dp x cp, whole runs.

Whole runs go through ``torchrun`` with 2 gloo ranks and a tiny model; one uninterrupted run
is the reference that stopped-and-resumed runs must reproduce bit for bit.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from distributed import spawn

pytestmark = pytest.mark.timeout(240)  # tests here start processes: a hang must fail, not stall

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "launch"))

import data as train_data  # noqa: E402  (launch/data.py)
import train  # noqa: E402  (launch/train.py: the entry point, and every name the loop uses)

STEPS = 30
TINY = [
    "--seq-len", "64", "--batch-size", "4", "--dim", "32", "--layers", "2", "--heads", "2",
    "--kv-heads", "1", "--recall-pairs", "4", "--lr", "1e-2", "--warmup-steps", "3",
    "--log-every", "1", "--ckpt-every", "0", "--no-plot",
]


def torchrun(*args: str, nproc: int = 2, timeout: float = 90, check: bool = True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           str(REPO / "launch" / "train.py"), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def losses(out: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_metrics(out)]


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory) -> Path:
    """An uninterrupted 2-rank run of STEPS steps (with a loss plot)."""
    out = tmp_path_factory.mktemp("reference")
    torchrun(*TINY, "--plot", "--steps", str(STEPS), "--out", str(out))
    return out


# -- data -------------------------------------------------------------------------------------


def test_recall_sample_is_deterministic_and_answers_need_the_pairs():
    ds = train_data.AssociativeRecall(512, n_pairs=12, seed=3)
    tokens, labels = ds.sample(7)
    again, labels_again = train_data.AssociativeRecall(512, n_pairs=12, seed=3).sample(7)
    assert torch.equal(tokens, again) and torch.equal(labels, labels_again)
    assert not torch.equal(tokens, ds.sample(8)[0])
    assert tokens.shape == labels.shape == (512,)

    answers = (labels != train_data.IGNORE_INDEX).nonzero().flatten()
    assert len(answers) == 12
    pairs = {int(tokens[i]): int(tokens[i + 1]) for i in range(0, 24, 2)}
    for t in answers.tolist():
        assert int(tokens[t - 1]) == train_data.QUERY
        # The label is the next token, and it is the value paired with this key at the start.
        assert int(labels[t]) == int(tokens[t + 1]) == pairs[int(tokens[t])]
    assert answers.min() > 400  # queries at the end, pairs at the start


def test_data_file_labels_are_the_next_bytes(tmp_path):
    """--data: a file without blank lines is one document, whose pieces of --seq-len bytes are the
    samples; the targets are the next bytes, across a piece's end too (tests/test_train_docs.py
    covers documents, JSON lines and packing)."""
    path = tmp_path / "text.txt"
    path.write_bytes(bytes(range(256)) * 4)
    ds = train_data.make_dataset(data=str(path), seq_len=32, seed=0)
    tokens, labels, cu_seqlens = ds.batch(5, 3)
    assert tokens.shape == labels.shape == (3, 32) and len(cu_seqlens) == 3
    assert all(cu == (0, 32) for cu in cu_seqlens)  # 1024 bytes: 32 whole pieces
    assert torch.equal(labels[:, :-1], tokens[:, 1:])
    kept = labels[:, -1] != train_data.IGNORE_INDEX  # the file's last byte has no next byte
    assert torch.equal(labels[kept, -1], (tokens[kept, -1] + 1) % 256)
    assert torch.equal(ds.batch(5, 3)[0], tokens)


# -- configuration ----------------------------------------------------------------------------


def _problems(argv, world_size):
    return train.config_problems(train.parse_args(argv).resolved(), world_size)


def test_config_checks_say_what_to_change(tmp_path):
    assert _problems([], 2) == []
    assert _problems(["--cp-size", "2"], 4) == []
    (p,) = _problems(["--cp-size", "3"], 4)
    assert "--cp-size 3 does not divide the world size 4" in p and "[1, 2, 4]" in p
    (p,) = _problems(["--seq-len", "250", "--layout", "zigzag"], 4)
    assert "multiple of 8" in p and "248" in p
    (p,) = _problems(["--heads", "3", "--kv-heads", "3", "--dim", "99"], 1)
    assert "head dim" in p
    (p,) = _problems(["--heads", "4", "--kv-heads", "3"], 1)
    assert "--heads 4 must be a multiple of --kv-heads 3" in p
    (p,) = _problems(["--data", str(tmp_path / "missing.txt")], 1)
    assert "no such file" in p
    (p,) = _problems(["--seq-len", "32", "--recall-pairs", "20"], 1)
    assert "too short" in p
    assert len(_problems(["--cp-size", "3", "--lr", "0", "--steps", "0"], 2)) == 3
    (p,) = _problems(["--device", "cpu", "--backend", "cudnn"], 1)
    assert "--backend cudnn" in p and "--device cuda and --dtype bfloat16" in p
    # --ulysses-size 0 (the default): a node's ranks when a sequence spans nodes, else the ring alone.
    auto = train.parse_args(["--heads", "8", "--kv-heads", "2", "--dim", "256"]).resolved()
    assert train.resolve_ulysses(auto, 16, 8).ulysses_size == 8  # 2 nodes of 8: 2 x 8
    assert train.resolve_ulysses(auto, 8, 8).ulysses_size == 1  # one node
    assert train.resolve_ulysses(dataclasses.replace(auto, cp_size=8), 16, 8).ulysses_size == 1  # cp in a node
    assert train.resolve_ulysses(dataclasses.replace(auto, heads=6, kv_heads=6, dim=192), 16, 8).ulysses_size == 2
    assert train.resolve_ulysses(dataclasses.replace(auto, ulysses_size=1), 16, 8).ulysses_size == 1  # as asked
    # PyTorch's fused engines cannot cut Striped(U) over the ring: the ring alone, or zigzag.
    cudnn = dataclasses.replace(auto, backend="cudnn", device="cuda", dtype="bfloat16")
    assert train.resolve_ulysses(cudnn, 16, 8).ulysses_size == 1
    assert train.resolve_ulysses(dataclasses.replace(cudnn, layout="zigzag"), 16, 8).ulysses_size == 8
    (p,) = train.config_problems(dataclasses.replace(cudnn, ulysses_size=8), 16, hardware=False)
    assert "--layout zigzag" in p
    assert _problems(["--fsdp", "--compile"], 2) == []
    assert _problems(["--cp-size", "4", "--ulysses-size", "2"], 8) == []
    assert _problems(["--cp-size", "4", "--ulysses-size", "2", "--ulysses-chunks", "2"], 8) == []
    (p,) = _problems(["--ulysses-size", "2", "--ulysses-chunks", "0"], 2)
    assert "--ulysses-chunks must be at least 1" in p
    (p,) = _problems(["--cp-size", "4", "--ulysses-size", "3"], 8)
    assert "--ulysses-size 3 must be 0 (auto) or a positive divisor of the context-parallel size 4" in p
    (p,) = _problems(["--ulysses-size", "4", "--heads", "6", "--kv-heads", "6", "--dim", "96"], 4)
    assert "6 query heads are not a multiple of 4" in p
    (p,) = _problems(["--ulysses-size", "2", "--heads", "6", "--kv-heads", "3", "--dim", "96"], 2)
    assert "3 key/value heads" in p
    (p,) = _problems(["--device", "cpu", "--transport", "copy_engine"], 2)
    assert "--transport copy_engine" in p and "GPUs of one node" in p
    cfg = train.parse_args(["--backend", "cudnn", "--dim", "1024", "--heads", "4"]).resolved()
    assert any("multiple of 8 up to 128" in p for p in train.config_problems(cfg, 1, hardware=False))
    # One context-parallel rank holds the whole sequence: any length, whatever the layout.
    assert _problems(["--seq-len", "63", "--layout", "zigzag"], 1) == []
    assert _problems(["--seq-len", "63", "--layout", "zigzag", "--cp-size", "1"], 2) == []
    # Values that trained on anyway: a negative learning rate at the end of the schedule, NaN losses.
    (p,) = _problems(["--min-lr-ratio", "-1"], 1)
    assert "--min-lr-ratio" in p
    (p,) = _problems(["--grad-clip", "-1"], 1)
    assert "--grad-clip" in p
    (p,) = _problems(["--rope-base", "0"], 1)
    assert "--rope-base" in p
    # --recall-pairs does nothing with --data: refused rather than ignored.
    text = tmp_path / "text.txt"
    text.write_bytes(bytes(range(256)))
    assert _problems(["--data", str(text)], 1) == []
    (p,) = _problems(["--data", str(text), "--recall-pairs", "4"], 1)
    assert "--recall-pairs" in p and "--data" in p


def test_copy_engine_needs_every_gpu_of_the_group_visible(monkeypatch):
    """Under a launcher that shows each process only its own GPU, --transport copy_engine is
    refused before the process group exists (symmetric memory could not map the peers)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    argv = ["--device", "cuda", "--dtype", "float32", "--backend", "triton", "--transport", "copy_engine"]
    (p,) = _problems(argv, 2)
    assert "sees 1 for --cp-size 2" in p and "--transport nccl" in p
    assert _problems(argv + ["--cp-size", "1"], 2) == []  # a group of one rank sends nothing
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert _problems(argv, 2) == []


def test_resume_refuses_a_changed_model_or_data(tmp_path):
    """--resume onto a checkpoint refuses settings that decide the weights' shapes or the data
    (--seq-len among them: it decides the samples and, by default, their number of pairs)."""
    argv = ["--out", str(tmp_path), "--resume"]
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "meta.json").write_text(json.dumps(
        {"step": 5, "config": dataclasses.asdict(train.parse_args(argv).resolved())}))
    assert _problems(argv, 2) == []
    assert _problems(argv + ["--steps", "900", "--lr", "1e-3"], 2) == []  # the schedule may change
    (p,) = _problems(argv + ["--seq-len", "256"], 2)
    assert "--resume from" in p and "--seq-len 128 -> 256" in p and "another --out" in p
    (p,) = _problems(argv + ["--dim", "256", "--seq-len", "256"], 2)
    assert "--dim 128 -> 256" in p and "--seq-len 128 -> 256" in p
    assert _problems(["--out", str(tmp_path), "--seq-len", "256"], 2) == []  # a fresh run ignores it


def test_resume_takes_the_same_data_file_under_another_path(tmp_path, monkeypatch):
    """--data is compared as a file, not as a string: the Slurm launcher hands the job an absolute
    path, and resubmitting the same command (a relative path) must not be refused."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "text.txt").write_bytes(bytes(range(256)) * 2)
    (tmp_path / "other.txt").write_bytes(bytes(range(256)) * 2)
    (tmp_path / "ckpt").mkdir()
    saved = train.parse_args(["--out", str(tmp_path), "--data", str(tmp_path / "text.txt")]).resolved()
    (tmp_path / "ckpt" / "meta.json").write_text(json.dumps({"step": 5, "config": dataclasses.asdict(saved)}))
    for path in ("text.txt", "./text.txt", str(tmp_path / "text.txt")):
        assert _problems(["--out", str(tmp_path), "--resume", "--data", path], 2) == [], path
    (p,) = _problems(["--out", str(tmp_path), "--resume", "--data", "other.txt"], 2)
    assert "--data" in p and "another --out" in p
    (p,) = _problems(["--out", str(tmp_path), "--resume"], 2)  # the recall task instead of the file
    assert "--data" in p


def test_lr_schedule():
    cfg = train.parse_args(["--lr", "1.0", "--warmup-steps", "10", "--steps", "110", "--min-lr-ratio", "0.1"]).resolved()
    assert train.lr_at(cfg, 0) == pytest.approx(0.1)
    assert train.lr_at(cfg, 9) == pytest.approx(1.0)
    assert train.lr_at(cfg, 60) == pytest.approx(0.55)
    assert train.lr_at(cfg, 110) == pytest.approx(0.1)


def test_stop_signals_only_set_a_flag():
    before = signal.getsignal(signal.SIGUSR2)
    with train.StopSignals() as stop:
        os.kill(os.getpid(), signal.SIGUSR2)
        time.sleep(0.01)
        assert stop.received == signal.SIGUSR2
    assert signal.getsignal(signal.SIGUSR2) is before


def test_step_timer_leaves_pauses_out():
    now = [0.0]
    timer = train.StepTimer(clock=lambda: now[0])
    for _ in range(3):
        now[0] += 2.0
        timer.step()
    with timer.paused():
        now[0] += 100.0  # a checkpoint
    now[0] += 2.0
    timer.step()
    assert timer.interval() == (4, 8.0)  # the steps before the pause count, the pause does not
    timer.restart()
    assert timer.interval() == (0, 0.0)


def _run_on_a_fake_clock(rank, world_size, out):
    """launch/train.py's loop on a clock that each step moves 1 s and each checkpoint 100 s."""
    now = [0.0]
    step_timer, train_step, save_checkpoint = train.StepTimer, train.train_step, train.save_checkpoint

    def timed_step(*args, **kwargs):
        now[0] += 1.0
        return train_step(*args, **kwargs)

    def timed_save(*args, **kwargs):
        now[0] += 100.0
        return save_checkpoint(*args, **kwargs)

    train.StepTimer = lambda: step_timer(clock=lambda: now[0])
    train.train_step, train.save_checkpoint = timed_step, timed_save
    argv = [*TINY, "--steps", "20", "--log-every", "10", "--ckpt-every", "5", "--device", "cpu", "--out", out]
    cfg = train.parse_args(argv).resolved()
    d = train.setup_distributed(cfg, rank, world_size, rank)
    with train.StopSignals() as stop:
        train._train(cfg, d, stop)
    return read_metrics(Path(out)) if rank == 0 else None


def test_throughput_leaves_checkpoints_out(tmp_path):
    """Checkpoints between two log records (--ckpt-every 5, --log-every 10) neither count in the
    interval's time nor drop the steps before them from it: step_s is each step's 1 s."""
    records = spawn(_run_on_a_fake_clock, 2, str(tmp_path), timeout=120)[0]
    assert [r["step"] for r in records] == [1, 10, 20]
    tokens_per_step = 4 * 64  # --batch-size 4, --seq-len 64, one dp replica of 2 cp ranks
    for r in records:
        assert r["step_s"] == 1.0, r
        assert r["tokens_per_s"] == tokens_per_step and r["tokens_per_s_per_rank"] == tokens_per_step / 2, r


# -- gradients over dp x cp -------------------------------------------------------------------

GRAD_ARGS = ["--seq-len", "32", "--batch-size", "2", "--dim", "32", "--layers", "2", "--heads", "4",
             "--kv-heads", "2", "--recall-pairs", "3", "--device", "cpu"]


def _grads_dp_cp(rank, world_size, cp_size, ulysses_size=1, sparsity=""):
    cfg = train.parse_args(GRAD_ARGS + ["--cp-size", str(cp_size), "--ulysses-size", str(ulysses_size),
                                        "--sparsity", sparsity]).resolved()
    d = train.setup_distributed(cfg, rank, world_size, rank)
    torch.manual_seed(cfg.seed)
    model = train.build_model(cfg, d.cp_group)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    ds = train_data.make_dataset(data=None, seq_len=cfg.seq_len, seed=cfg.seed, recall_pairs=cfg.recall_pairs)
    tokens, labels, _ = ds.batch(d.dp_rank * cfg.batch_size, cfg.batch_size)
    _, _, loss = train.train_step(ddp, tokens, labels, cfg, d, torch.autocast("cpu", enabled=False))
    # Plain lists: tensors would go back through shared memory that dies with this process.
    return {n: p.grad.tolist() for n, p in model.named_parameters()}, loss.item()


@pytest.mark.parametrize("world_size,cp_size,ulysses_size,sparsity", [
    (4, 2, 1, ""), (2, 2, 1, ""), (4, 4, 2, ""), (4, 2, 2, ""), (4, 2, 2, "hash:3"),
    (4, 4, 2, "qkdrop:0.4"),  # one dp replica: the oracle draws anew on every forward
])
def test_gradients_equal_single_process_gradients(world_size, cp_size, ulysses_size, sparsity):
    """After train_step every rank holds the gradient of the mean over dp replicas of the
    whole-sequence loss: the same as one process computing it on the full sequences (also with
    the cp ranks split into ring x ulysses, and with sparse attention there)."""
    results = spawn(_grads_dp_cp, world_size, cp_size, ulysses_size, sparsity, timeout=120)

    cfg = train.parse_args(GRAD_ARGS + ["--sparsity", sparsity]).resolved()
    torch.manual_seed(cfg.seed)
    model = train.build_model(cfg, None)
    ds = train_data.make_dataset(data=None, seq_len=cfg.seq_len, seed=cfg.seed, recall_pairs=cfg.recall_pairs)
    dp = world_size // cp_size
    total, losses = 0.0, []
    for i in range(dp):
        tokens, labels, _ = ds.batch(i * cfg.batch_size, cfg.batch_size)
        _, loss = model(tokens, labels)
        total = total + loss / dp
        losses.append(loss.item())
    total.backward()

    for rank, (grads, _) in enumerate(results):
        for name, p in model.named_parameters():
            err = ((torch.tensor(grads[name]) - p.grad).norm() / p.grad.norm()).item()
            assert err < 1e-5, f"rank {rank} {name}: relative error {err:.2e}"
    # The loss each rank reports is its dp replica's whole-sequence loss.
    for rank, (_, loss) in enumerate(results):
        assert loss == pytest.approx(losses[rank // cp_size], rel=1e-5)


# -- whole runs -------------------------------------------------------------------------------


def test_two_ranks_loss_falls(reference_run):
    records = read_metrics(reference_run)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert {"step", "loss", "acc", "lr", "tokens_per_s"} <= set(records[0])
    first, last = records[0]["loss"], sum(r["loss"] for r in records[-5:]) / 5
    assert last < first - 1.5, f"loss did not fall: {first:.3f} -> {last:.3f}"
    meta = json.loads((reference_run / "ckpt" / "meta.json").read_text())
    assert meta["step"] == STEPS and meta["world_size"] == 2
    assert {p.name for p in (reference_run / "ckpt").iterdir()} == {
        "meta.json", "state.pt", "rng_rank0.pt", "rng_rank1.pt"}
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert (reference_run / "loss.png").stat().st_size > 0


def test_ring_by_ulysses_loss_falls(tmp_path):
    """4 ranks as ring 2 x ulysses 2 (TINY's 2 query heads share 1 K/V head, sent to both), with
    --ulysses-chunks 2, which one head per rank leaves at one chunk; and the first steps again
    under --fsdp (sharded over the 4 ranks): the same losses to float32 rounding."""
    hybrid = ("--cp-size", "4", "--ulysses-size", "2")
    torchrun(*TINY, "--steps", str(STEPS), *hybrid, "--ulysses-chunks", "2", "--out", str(tmp_path / "ddp"), nproc=4)
    records = read_metrics(tmp_path / "ddp")
    first, last = records[0]["loss"], sum(r["loss"] for r in records[-5:]) / 5
    assert last < first - 1.5, f"loss did not fall: {first:.3f} -> {last:.3f}"
    torchrun(*TINY, "--steps", "6", "--lr-decay-steps", str(STEPS), *hybrid, "--fsdp", "--out", str(tmp_path / "fsdp"),
             nproc=4)
    for (step, got), (_, want) in zip(losses(tmp_path / "fsdp"), losses(tmp_path / "ddp")[:6], strict=True):
        assert abs(got - want) < 1e-5 * abs(want), (step, got, want)


def test_two_ranks_learn_to_recall(tmp_path):
    """Training must teach attention to carry information across the sequence and the ring.

    With one key-value pair, the answer is the value at token 1, read from the query at the end.
    A model whose attention carries nothing can only learn the value marginal: ln(10) ~ 2.30
    nats per answer. The run has to end clearly below that floor.
    """
    args = ["--seq-len", "32", "--batch-size", "16", "--dim", "64", "--layers", "2", "--heads", "4",
            "--kv-heads", "2", "--recall-pairs", "1", "--lr", "3e-3", "--warmup-steps", "10",
            "--steps", "150", "--log-every", "1", "--ckpt-every", "0", "--no-plot", "--seed", "0"]
    torchrun(*args, "--out", str(tmp_path))
    last = sum(r["loss"] for r in read_metrics(tmp_path)[-10:]) / 10
    floor = math.log(10)
    assert last < floor - 0.7, f"no recall: loss {last:.3f} at the end vs the no-attention floor {floor:.3f}"


def test_compiled_run_matches_eager(reference_run, tmp_path):
    """--compile (inductor; ring attention as a custom op in the graph): the same losses as eager."""
    proc = torchrun(*TINY, "--compile", "--steps", "6", "--lr-decay-steps", str(STEPS), "--out", str(tmp_path), timeout=300)
    said = re.search(r"compiled: (\d+) graph", proc.stdout + proc.stderr)
    assert said and int(said.group(1)) >= 1, proc.stderr[-3000:]  # the model really compiled
    for (step, got), (_, want) in zip(losses(tmp_path), losses(reference_run)[:6], strict=True):
        assert abs(got - want) < 1e-5 * abs(want), (step, got, want)


def test_fsdp_compiled_matches_eager(reference_run, tmp_path):
    """--fsdp --compile: each block compiled inside FSDP's eager hooks; the DDP eager losses."""
    proc = torchrun(*TINY, "--fsdp", "--compile", "--steps", "6", "--lr-decay-steps", str(STEPS), "--out",
                    str(tmp_path), timeout=300)
    said = re.search(r"compiled: (\d+) graph", proc.stdout + proc.stderr)
    assert said and int(said.group(1)) >= 1, proc.stderr[-3000:]
    for (step, got), (_, want) in zip(losses(tmp_path), losses(reference_run)[:6], strict=True):
        assert abs(got - want) < 1e-5 * abs(want), (step, got, want)


def test_fsdp_matches_ddp_and_resumes_exactly(reference_run, tmp_path):
    """--fsdp: the losses of the DDP reference to float32 rounding; stopped half-way and resumed
    (from the gathered checkpoint), the same losses bit for bit as without the stop; and a DDP
    checkpoint resumes under --fsdp."""
    whole, halves, mixed = tmp_path / "whole", tmp_path / "halves", tmp_path / "mixed"
    torchrun(*TINY, "--fsdp", "--steps", str(STEPS), "--out", str(whole))
    for (step, got), (_, want) in zip(losses(whole), losses(reference_run), strict=True):
        assert abs(got - want) < 1e-5 * abs(want), (step, got, want)
    half = STEPS // 2
    torchrun(*TINY, "--fsdp", "--steps", str(half), "--lr-decay-steps", str(STEPS), "--out", str(halves))
    torchrun(*TINY, "--fsdp", "--steps", str(STEPS), "--resume", "--out", str(halves))
    assert losses(halves) == losses(whole)
    torchrun(*TINY, "--steps", str(half), "--lr-decay-steps", str(STEPS), "--out", str(mixed))
    torchrun(*TINY, "--fsdp", "--steps", str(STEPS), "--resume", "--out", str(mixed))
    for (step, got), (_, want) in zip(losses(mixed), losses(reference_run), strict=True):
        assert abs(got - want) < 1e-5 * abs(want), (step, got, want)


def test_resume_after_step_limit_is_bit_identical(reference_run, tmp_path):
    half = STEPS // 2
    # The same schedule as the reference: only the stopping point differs.
    torchrun(*TINY, "--steps", str(half), "--lr-decay-steps", str(STEPS), "--out", str(tmp_path))
    assert losses(tmp_path) == losses(reference_run)[:half]
    proc = torchrun(*TINY, "--steps", str(STEPS), "--resume", "--out", str(tmp_path))
    assert f"resuming at step {half}:" in proc.stderr, proc.stderr[-3000:]  # not a fresh run
    assert losses(tmp_path) == losses(reference_run)


def test_resume_after_sigterm_is_bit_identical(reference_run, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           str(REPO / "launch" / "train.py"), *TINY, "--steps", str(STEPS), "--out", str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        metrics = tmp_path / "metrics.jsonl"
        deadline = time.monotonic() + 60
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
            assert proc.poll() is None and time.monotonic() < deadline, "the run ended before the signal"
            time.sleep(0.01)
        os.killpg(proc.pid, signal.SIGTERM)  # as Slurm does: the launcher and every rank
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert "stopped by SIGTERM after checkpointing" in stdout, stderr[-3000:]
    stopped = json.loads((tmp_path / "ckpt" / "meta.json").read_text())["step"]
    assert 3 <= stopped < STEPS
    proc = torchrun(*TINY, "--steps", str(STEPS), "--resume", "--out", str(tmp_path))
    assert f"resuming at step {stopped}:" in proc.stderr, proc.stderr[-3000:]  # not a fresh run
    assert losses(tmp_path) == losses(reference_run)


def _killed_by_launcher(stderr: str, rank: int) -> bool:
    # torchrun stops the other ranks (SIGTERM) as soon as one exits with an error; a rank it
    # stopped before that rank reached its own check has no message to show.
    return re.search(rf"rank\s*: {rank} \(local_rank: {rank}\)\s*exitcode\s*: -15", stderr) is not None


def test_plain_python_is_a_one_rank_run(tmp_path):
    """``python launch/train.py`` without torchrun: a world of one rank, started from another
    directory (the script finds its sibling modules in launch/ and ringflash in the checkout)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    out = tmp_path / "run"
    cmd = [sys.executable, str(REPO / "launch" / "train.py"), *TINY, "--steps", "2", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=tmp_path, env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=90)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "world 1 = dp 1 x cp 1" in proc.stderr
    assert [r["step"] for r in read_metrics(out)] == [1, 2]
    assert "step 2: checkpoint" in proc.stdout


def test_runs_as_a_module_of_the_package_launch():
    """``python -m launch.train``: the same flags, with the siblings imported relative to launch."""
    proc = subprocess.run([sys.executable, "-m", "launch.train", "--help"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-3000:]
    script = subprocess.run([sys.executable, str(REPO / "launch" / "train.py"), "--help"], cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    flags = lambda text: text[text.index("options:"):]  # noqa: E731  (the usage line names the program)
    assert flags(proc.stdout) == flags(script.stdout)
    assert "--seq-len" in proc.stdout and "--no-plot" in proc.stdout


def test_bad_config_fails_fast_on_every_rank(tmp_path):
    cases = [
        (["--cp-size", "3"], "--cp-size 3 does not divide the world size 2"),
        (["--seq-len", "30", "--layout", "zigzag"],
         "--seq-len 30 cannot be split by the zigzag layout over 2 context-parallel ranks: it must be a multiple of 4"),
    ]
    for args, message in cases:
        proc = torchrun(*args, "--out", str(tmp_path), check=False, timeout=60)
        assert proc.returncode != 0
        printed = [r for r in (0, 1) if f"[rank {r}] train.py: error: {message}" in proc.stderr]
        assert printed, proc.stderr[-3000:]
        assert all(r in printed or _killed_by_launcher(proc.stderr, r) for r in (0, 1)), proc.stderr[-3000:]
        assert 'train.py", line' not in proc.stderr  # a message, not a traceback from the script
    assert not (tmp_path / "metrics.jsonl").exists()
