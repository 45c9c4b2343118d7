"""Packed documents and masks in the training job (launch/): packing, the synthetic task whose
answers need document masking, the gradient of a batch run in micro-steps, the mask flags, and
that document masking leaks nothing between documents (bitwise, on 2 gloo ranks).

CPU only: gloo, the reference attention backend, tiny shapes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from distributed import spawn

pytestmark = pytest.mark.timeout(240)  # tests here start processes: a hang must fail, not stall

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "launch"))

import data as train_data  # noqa: E402  (launch/data.py)
import metrics as train_metrics  # noqa: E402  (launch/metrics.py)
import train  # noqa: E402  (launch/train.py)

from ringflash.batch import shard_batch, unshard  # noqa: E402
from ringflash.models import GPT, GPTConfig  # noqa: E402

IGNORE = train_data.IGNORE_INDEX


def _write_corpus(path: Path, n_docs: int = 60, seed: int = 0) -> list[bytes]:
    """Documents of a few words to a few hundred bytes, separated by blank lines; returns them."""
    g = torch.Generator().manual_seed(seed)
    words = [b"ring", b"attention", b"across", b"documents", b"mask", b"the", b"a", b"token", b"of"]
    docs = []
    for _ in range(n_docs):
        n = int(torch.randint(1, 60, (1,), generator=g))
        docs.append(b" ".join(words[int(i)] for i in torch.randint(len(words), (n,), generator=g)))
    path.write_bytes(b"\n\n".join(docs) + b"\n")
    return docs


def _check_packing(tokens, labels, cu_rows, seq_len, docs):
    """Every row: boundaries strictly increasing from 0 to seq_len; every document a piece of a
    corpus document; labels its next bytes there, the last byte of a corpus document ignored."""
    whole = b"\x00".join(docs)  # \x00 never in the corpus: a piece cannot span two documents
    targets = [t for d in docs for t in [*d[1:], IGNORE, None]]  # aligned with whole (None: a separator)
    for row, cu in enumerate(cu_rows):
        assert cu[0] == 0 and cu[-1] == seq_len
        assert all(a < b for a, b in zip(cu, cu[1:])), cu
        for start, end in zip(cu[:-1], cu[1:]):
            at = whole.find(bytes(tokens[row, start:end].tolist()))
            assert at >= 0 and end - start <= seq_len
            assert labels[row, start:end].tolist() == targets[at : at + end - start], (row, start)


# -- packing ----------------------------------------------------------------------------------


def test_text_documents_are_separated_by_blank_lines(tmp_path):
    path = tmp_path / "docs.txt"
    path.write_bytes(b"\n\nfirst line\nstill the first\n\nsecond\r\n  \t\r\nthird\n\n\n\nfourth\n")
    assert train_data.read_documents(str(path)) == [b"first line\nstill the first", b"second", b"third", b"fourth"]
    path.write_bytes(b"one document\nno blank line\n")  # the old --data file: one document
    assert train_data.read_documents(str(path)) == [b"one document\nno blank line"]
    path.write_bytes(b"\n \n\n")
    with pytest.raises(ValueError, match="no document"):
        train_data.read_documents(str(path))


def test_jsonl_documents_are_the_text_fields(tmp_path):
    path = tmp_path / "docs.jsonl"
    lines = [{"text": "first\n\nstill first"}, {"text": "héllo", "id": 3}, {"text": ""}]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n" + json.dumps({"text": "last"}) + "\n")
    assert train_data.read_documents(str(path)) == [b"first\n\nstill first", "héllo".encode(), b"last"]
    path.write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"body": "no text"}) + "\n")
    with pytest.raises(ValueError, match="line 2"):
        train_data.read_documents(str(path))
    path.write_text(json.dumps({"text": ["not", "a", "string"]}) + "\n")
    with pytest.raises(ValueError, match="line 1.*must be a string"):
        train_data.read_documents(str(path))


def test_packed_documents_are_deterministic_with_their_boundaries(tmp_path):
    """Sequences of --seq-len from documents of 1 to ~400 bytes (longer ones cut into pieces),
    boundaries from 0 to seq_len, next-byte targets inside each document, and sample ``index``
    a pure function of (seed, index): the same samples whatever the batches (ranks) they fall in."""
    path = tmp_path / "corpus.txt"
    docs = _write_corpus(path)
    ds = train_data.PackedDocuments(str(path), 64, seed=1)
    batch = ds.batch(3, 6)
    assert batch.tokens.shape == batch.labels.shape == (6, 64) and len(batch.cu_seqlens) == 6
    _check_packing(batch.tokens, batch.labels, batch.cu_seqlens, 64, docs)
    assert sum(len(cu) - 1 for cu in batch.cu_seqlens) > 6  # several documents per sequence
    again = train_data.PackedDocuments(str(path), 64, seed=1)
    halves = [again.batch(3, 2), again.batch(5, 4)]
    assert torch.equal(torch.cat([h.tokens for h in halves]), batch.tokens)
    assert torch.equal(torch.cat([h.labels for h in halves]), batch.labels)
    assert [cu for h in halves for cu in h.cu_seqlens] == batch.cu_seqlens
    assert not torch.equal(train_data.PackedDocuments(str(path), 64, seed=2).batch(3, 6).tokens, batch.tokens)
    assert not torch.equal(ds.batch(4, 6).tokens, batch.tokens)


def test_a_file_of_one_document_gives_its_pieces(tmp_path):
    """A file without blank lines is one document, cut into pieces of seq_len: a sequence is one
    piece, or the file's shorter last piece and the start of another; targets are the next bytes
    (across the cut of a piece too), none after the file's last byte."""
    path = tmp_path / "one.txt"
    body = bytes(range(256)) * 3  # no blank line
    path.write_bytes(body)
    ds = train_data.PackedDocuments(str(path), 32, seed=0)
    assert ds.n_documents == 1 and len(ds.piece_start) == len(body) // 32
    batch = ds.batch(0, 16)
    for row, cu in enumerate(batch.cu_seqlens):
        for start, end in zip(cu[:-1], cu[1:]):
            first = int(batch.tokens[row, start])
            assert batch.tokens[row, start:end].tolist() == [(first + i) % 256 for i in range(end - start)]
    kept = batch.labels != IGNORE
    assert torch.equal(batch.labels[kept], (batch.tokens[kept] + 1) % 256)
    assert (batch.tokens[~kept] == 255).all()  # only the file's last byte has no target


def test_packed_recall_answers_are_their_documents_bindings():
    """packed-recall: each document binds n of the n + 1 keys; the label at each queried key is
    its value in that document or '-' (unbound there), though other documents bound it to other
    values; rows share boundaries in blocks of 8 consecutive samples."""
    ds = train_data.PackedRecall(128, n_pairs=2, seed=5)
    misleading = 0
    for index in range(16):
        tokens, labels, cu = ds.sample(index)
        assert cu[0] == 0 and cu[-1] == 128 and all(a < b for a, b in zip(cu, cu[1:])) and len(cu) - 1 == ds.n_docs
        seen = {}  # key -> values bound by earlier documents of the sequence
        for start, end in zip(cu[:-1], cu[1:]):
            bindings = tokens[start : start + 2].tolist()
            bound = {train_data.PACKED_KEYS[(b - 128) // 10]: train_data.VALUES[(b - 128) % 10] for b in bindings}
            queries = range(end - 6, end, 3)
            for q in queries:
                assert tokens[q] == train_data.QUERY
                key = int(tokens[q + 1])
                want = bound.get(key, train_data.ABSENT)
                assert int(labels[q + 1]) == int(tokens[q + 2]) == want
                misleading += key in seen and seen[key] != {want}
            for k, v in bound.items():
                seen.setdefault(k, set()).add(v)
        assert (labels != IGNORE).sum() == 2 * ds.n_docs
    assert misleading > 16  # earlier documents often bound a queried key otherwise
    assert ds.sample(3)[2] == ds.sample(7)[2] != ds.sample(8)[2]
    assert torch.equal(ds.sample(3)[0], train_data.PackedRecall(128, n_pairs=2, seed=5).sample(3)[0])


# -- configuration ----------------------------------------------------------------------------


def _problems(argv, world_size=1):
    return train.config_problems(train.parse_args(argv).resolved(), world_size)


def test_mask_flags_are_checked(tmp_path):
    text = tmp_path / "docs.txt"
    text.write_bytes(b"a document\n\nanother\n")
    assert train.parse_args([]).resolved().mask == "causal"
    assert train.parse_args(["--data", str(text)]).resolved().mask == "causal+documents"
    assert train.parse_args(["--task", "packed-recall", "--no-doc-mask"]).resolved().mask == "causal"
    assert train.parse_args(["--task", "packed-recall", "--window", "8"]).resolved().mask == "causal+documents+window=8"
    assert _problems(["--data", str(text), "--window", "16"]) == []
    assert _problems(["--task", "packed-recall", "--no-doc-mask"]) == []
    (p,) = _problems(["--window", "-1"])
    assert "--window cannot be negative" in p
    (p,) = _problems(["--no-doc-mask"])
    assert "--no-doc-mask" in p and "--data or --task packed-recall" in p
    (p,) = _problems(["--data", str(text), "--task", "packed-recall"])
    assert "--task packed-recall" in p and "drop one" in p
    (p,) = _problems(["--task", "packed-recall", "--seq-len", "8"])
    assert "too short for --task packed-recall" in p
    (p,) = _problems(["--task", "packed-recall", "--recall-pairs", "10"])
    assert "1 to 9" in p
    (p,) = _problems(["--data", str(tmp_path / "empty.txt")])
    assert "no such file" in p
    (tmp_path / "empty.txt").write_bytes(b"")
    (p,) = _problems(["--data", str(tmp_path / "empty.txt")])
    assert "empty" in p
    cfg = train.parse_args(["--device", "cuda", "--backend", "cudnn", "--dtype", "bfloat16", "--heads", "4",
                            "--kv-heads", "2", "--window", "64"]).resolved()
    assert any("needs --backend triton" in p for p in train.config_problems(cfg, 1, hardware=False))


def test_resume_keeps_the_task_and_lets_the_mask_change(tmp_path):
    """--task decides the data (RESUME_FIXED); --window and --doc-mask only what attention sees.
    A checkpoint written before --task existed resumes as the recall task it was."""
    (tmp_path / "ckpt").mkdir()
    saved = dataclasses.asdict(train.parse_args(["--out", str(tmp_path), "--task", "packed-recall"]).resolved())
    (tmp_path / "ckpt" / "meta.json").write_text(json.dumps({"step": 5, "config": saved}))
    argv = ["--out", str(tmp_path), "--resume", "--task", "packed-recall"]
    assert _problems(argv + ["--window", "16", "--no-doc-mask"]) == []
    (p,) = _problems(["--out", str(tmp_path), "--resume"])
    assert "--task 'packed-recall' -> 'recall'" in p
    old = {k: v for k, v in dataclasses.asdict(train.parse_args(["--out", str(tmp_path)]).resolved()).items()
           if k not in ("task", "window", "doc_mask")}
    (tmp_path / "ckpt" / "meta.json").write_text(json.dumps({"step": 5, "config": old}))
    assert _problems(["--out", str(tmp_path), "--resume"]) == []


def test_plot_title_names_the_mask():
    records = [{"step": 1, "loss": 2.0, "mask": "causal+documents"}]
    assert train_metrics.plot_title("run", records) == "run: training loss (causal+documents)"
    assert train_metrics.plot_title("run", [{"step": 1}] + records) == "run: training loss (causal, causal+documents)"


# -- a batch of rows with different boundaries: micro-steps -----------------------------------

SEQ = 16
ROWS_CU = [(0, 5, SEQ), (0, 9, 12, SEQ), (0, 5, SEQ), (0, SEQ)]
GRAD_ARGS = ["--seq-len", str(SEQ), "--dim", "32", "--layers", "2", "--heads", "4", "--kv-heads", "2",
             "--device", "cpu", "--task", "packed-recall"]


def _rows():
    """Four rows of packed documents: tokens, targets (next tokens inside each document, some
    ignored), boundaries."""
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 256, (len(ROWS_CU), SEQ), generator=g)
    labels = torch.cat([tokens[:, 1:], torch.full((len(ROWS_CU), 1), IGNORE)], dim=1)
    for row, cu in enumerate(ROWS_CU):
        labels[row, [c - 1 for c in cu[1:]]] = IGNORE
    labels[0, :3] = IGNORE  # rows with different numbers of targets
    return tokens, labels


def _reference_step(cfg, replicas):
    """One process, float64: the mean over dp replicas of the mean over all targets of each
    replica's rows, every row attending inside its own documents; its loss per replica and gradient."""
    torch.manual_seed(cfg.seed)
    model = train.build_model(cfg, None).double()
    tokens, labels = _rows()
    losses = []
    for rows in replicas:
        total = sum((labels[r] != IGNORE).sum() for r in rows)
        sums = [F.cross_entropy(model(tokens[r : r + 1], cu_seqlens=ROWS_CU[r])[0][0], labels[r], reduction="sum")
                for r in rows]
        losses.append(sum(sums) / total)
    (sum(losses) / len(losses)).backward()
    return [x.item() for x in losses], {n: p.grad for n, p in model.named_parameters()}


def _grads_micro_steps(rank, world_size, cp_size, replicas):
    cfg = train.parse_args(GRAD_ARGS + ["--cp-size", str(cp_size)]).resolved()
    d = train.setup_distributed(cfg, rank, world_size, rank)
    torch.manual_seed(cfg.seed)
    model = train.build_model(cfg, d.cp_group).double()
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    tokens, labels = _rows()
    rows = replicas[d.dp_rank]
    autocast = torch.autocast("cpu", enabled=False)
    _, labels_local, loss = train.train_step(ddp, tokens[rows], labels[rows], cfg, d, autocast,
                                             [ROWS_CU[r] for r in rows], check=True)
    return {n: p.grad.tolist() for n, p in model.named_parameters()}, loss.item(), labels_local.shape[0]


@pytest.mark.parametrize("world_size,cp_size,replicas", [
    (2, 2, [[0, 1, 2, 3]]),  # one sequence group: rows 0 and 2 share boundaries -> 3 micro-steps
    (2, 1, [[0, 1], [2, 0]]),  # two dp replicas: 2 micro-steps on one, 1 on the other
])
def test_micro_steps_give_the_batch_gradient(world_size, cp_size, replicas):
    """Rows with different boundaries run as micro-steps (a group of rows per set of boundaries),
    weighted by their share of the batch's targets: the loss is the mean over all targets of the
    batch and the gradient its gradient (float64, to rounding), across dp x cp and with dp
    replicas running different numbers of micro-steps."""
    results = spawn(_grads_micro_steps, world_size, cp_size, replicas, timeout=120)
    cfg = train.parse_args(GRAD_ARGS).resolved()
    want_losses, want_grads = _reference_step(cfg, replicas)
    for rank, (grads, loss, rows) in enumerate(results):
        dp_rank = rank // cp_size
        assert rows == len(replicas[dp_rank])
        assert loss == pytest.approx(want_losses[dp_rank], rel=1e-12, abs=0)
        for name, g in want_grads.items():
            err = ((torch.tensor(grads[name], dtype=torch.float64) - g).norm() / g.norm()).item()
            assert err < 1e-10, f"rank {rank} {name}: relative error {err:.2e}"


# -- no leak between documents ----------------------------------------------------------------

LEAK_S, LEAK_CU = 32, [0, 11, 20, 32]  # documents A = 0..10, B = 11..19, C = 20..31
LEAK_CONFIG = GPTConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, rope_base=100.0)


def _logits(model, ids, layout, cu_seqlens=None):
    """The model's full-sequence logits from this rank's shard (ids the same on every rank)."""
    ids_local, *_ = shard_batch(ids, layout=layout, cu_seqlens=cu_seqlens)
    with torch.no_grad():
        logits_local, _ = model(ids_local, cu_seqlens=cu_seqlens)
    return unshard(logits_local, layout=layout)


def _leak(rank, world_size):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 64, (2, LEAK_S), generator=g)
    changed_b = ids.clone()
    changed_b[:, 11:20] = torch.randint(0, 64, (2, 9), generator=g)  # document B's tokens only
    changed_0 = ids.clone()
    changed_0[:, 0] = (ids[:, 0] + 1) % 64
    out = {}
    for layout in ("contiguous", "striped", "zigzag"):
        torch.manual_seed(0)
        model = GPT(dataclasses.replace(LEAK_CONFIG, layout=layout), backend="reference")
        masked = [_logits(model, x, layout, LEAK_CU) for x in (ids, changed_b)]
        plain = [_logits(model, x, layout) for x in (ids, changed_b)]
        alone = _logits(model, ids[:, 20:], layout)  # document C as a sequence of its own
        torch.manual_seed(0)
        windowed = GPT(dataclasses.replace(LEAK_CONFIG, layout=layout, window=4), backend="reference")
        win = [_logits(windowed, x, layout) for x in (ids, changed_0)]
        out[layout] = {
            "masked_a_equal": torch.equal(masked[0][:, :11], masked[1][:, :11]),
            "masked_c_equal": torch.equal(masked[0][:, 20:], masked[1][:, 20:]),
            "masked_b_equal": torch.equal(masked[0][:, 11:20], masked[1][:, 11:20]),
            "plain_c_equal": torch.equal(plain[0][:, 20:], plain[1][:, 20:]),
            "c_vs_alone": (masked[0][:, 20:] - alone).abs().max().item(),
            "window_far_equal": torch.equal(win[0][:, 9:], win[1][:, 9:]),  # 2 layers x window 4: reach 8
            "window_near_equal": torch.equal(win[0][:, 8], win[1][:, 8]),
        }
    return out


def test_documents_leak_nothing_bitwise():
    """GPT on 2 gloo ranks (reference backend, float32), every layout: with document masking,
    changing document B's tokens leaves the logits of documents A and C bitwise unchanged, and C's
    are those of C alone (rotary positions restart); without it, C's logits change. A window of
    4 over 2 layers: changing token 0 leaves positions >= 9 bitwise unchanged, not position 8."""
    results = spawn(_leak, 2, timeout=120)
    for rank, per_layout in enumerate(results):
        for layout, r in per_layout.items():
            where = f"rank {rank}, {layout}"
            assert r["masked_a_equal"] and r["masked_c_equal"], (where, r)
            assert not r["masked_b_equal"] and not r["plain_c_equal"], (where, r)
            assert r["c_vs_alone"] < 1e-5, (where, r)
            assert r["window_far_equal"] and not r["window_near_equal"], (where, r)


# -- whole runs -------------------------------------------------------------------------------

TINY = ["--dim", "32", "--layers", "2", "--heads", "2", "--kv-heads", "1", "--lr", "1e-2", "--warmup-steps", "3",
        "--log-every", "1", "--ckpt-every", "0"]


def _command(*args: str, nproc: int) -> list[str]:
    if nproc == 1:
        return [sys.executable, str(REPO / "launch" / "train.py"), *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            str(REPO / "launch" / "train.py"), *args]


def _env():
    launcher = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")  # a run of its own
    env = {k: v for k, v in os.environ.items() if k not in launcher}
    return {**env, "OMP_NUM_THREADS": "1"}


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


@pytest.mark.parametrize("corpus,extra,mask", [
    ("corpus.txt", [], "causal+documents"),
    ("corpus.jsonl", ["--window", "8"], "causal+documents+window=8"),
])
def test_two_ranks_train_on_packed_documents(tmp_path, corpus, extra, mask):
    """2 ranks, --data: blank-line text or JSON lines, packed with document masking (and a
    sliding window): the run finishes, its records and plot name the mask, the loss falls."""
    docs = _write_corpus(tmp_path / "corpus.txt")
    if corpus.endswith(".jsonl"):
        (tmp_path / corpus).write_text("".join(json.dumps({"text": d.decode()}) + "\n" for d in docs))
    out = tmp_path / "run"
    args = [*TINY, "--data", str(tmp_path / corpus), "--seq-len", "64", "--batch-size", "4", "--steps", "12",
            "--plot", *extra, "--out", str(out)]
    proc = subprocess.run(_command(*args, nproc=2), cwd=REPO, env=_env(), capture_output=True, text=True, timeout=150)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert f"attention {mask}" in proc.stderr
    records = _records(out)
    assert [r["step"] for r in records] == list(range(1, 13))
    assert {r["mask"] for r in records} == {mask}
    assert records[-1]["loss"] < records[0]["loss"] - 0.5
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert (out / "loss.png").stat().st_size > 0


def test_bad_corpus_fails_on_every_rank_with_a_message(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\nnot json\n')
    proc = subprocess.run(_command(*TINY, "--data", str(bad), "--out", str(tmp_path / "run"), nproc=1), cwd=REPO,
                          env=_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "train.py: error: --data" in proc.stderr and "line 2" in proc.stderr, proc.stderr[-3000:]
    assert 'train.py", line' not in proc.stderr  # a message, not a traceback


PACKED_ARGS = ["--task", "packed-recall", "--seq-len", "64", "--batch-size", "16", "--dim", "64", "--layers", "2",
               "--heads", "4", "--kv-heads", "2", "--lr", "3e-3", "--warmup-steps", "20", "--steps", "220",
               "--log-every", "10", "--ckpt-every", "0", "--no-plot", "--seed", "0"]


def test_packed_recall_needs_document_masking(tmp_path):
    """The same packed-recall sequences and targets, with and without document masking (two
    one-rank runs side by side): the masked model learns the answers, the unmasked one, misled by
    the other documents' bindings of the same keys, ends far above it."""
    runs = {}
    for name, flag in (("masked", "--doc-mask"), ("unmasked", "--no-doc-mask")):
        out = tmp_path / name
        runs[name] = (out, subprocess.Popen(_command(*PACKED_ARGS, flag, "--out", str(out), nproc=1), cwd=REPO,
                                            env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    end = {}
    for name, (out, proc) in runs.items():
        _, stderr = proc.communicate(timeout=200)
        assert proc.returncode == 0, stderr[-3000:]
        records = _records(out)
        end[name] = sum(r["loss"] for r in records[-3:]) / 3
    # Guessing: ln 3 - (2/3) ln(2/3) + (2/3) ln 10 ~ 2.2 nats ('-' a third of the time, a digit otherwise).
    assert end["masked"] < 0.1, end
    assert end["unmasked"] > 1.5, end
