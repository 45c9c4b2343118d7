"""Hash-sparse against dense attention in a small GPT trained on real text: tokens/s and the
final validation loss at 8k and 16k tokens, on one GPU (the headline of Pagliardini et al.,
2023, "Faster Causal Attention Over Large Sequences Through Sparse Flash Attention": 2.0x and
3.3x the training speed at 8k and 16k tokens without losing perplexity).

    PYTHONPATH=. python benchmarks/bench_sparse_train.py                  # 8k and 16k, dense and hash:8
    PYTHONPATH=. python benchmarks/bench_sparse_train.py --sparsity hash:8 hash:16 --steps 2000 --time-limit 300
    PYTHONPATH=. python benchmarks/bench_sparse_train.py --device cpu --seqlens 64 --dim 32 --layers 2 \\
        --heads 2 --steps 3 --tokens-per-step 128 --sources /usr/lib/python3.12/json   # a smoke test

The corpus. Python source code that ships on the machine, read as bytes (one token per byte,
vocabulary 256): by default the standard library's ``.py`` files (``sysconfig``'s ``stdlib``
directory, without ``site-packages``/``dist-packages``) and those of the installed ``torch``,
``transformers`` and ``numpy`` packages (``--sources``: names of packages, ``stdlib``, or
directories and files). Files over ``--max-file-kb`` and duplicate files (vendored copies)
are left out. The files are put in a fixed pseudo-random order (by the SHA-1 of their source
and relative path, so no package is held out whole) and the last ``--val-fraction`` of them
(5%) is the validation split; the files of a split are joined with a NUL byte between them.
The splits are cached as uint8 ``.npy`` files under ``--cache`` (default /tmp), keyed by the
file list and sizes; every row names the corpus (sources, files, bytes, SHA-1).

The model. :class:`ringflash.models.GPT` (byte vocabulary, rotary, RMSNorm, tied embeddings)
on one process (no torch.distributed), default 512 wide, 8 layers of 8 heads of 64 (25M
parameters), float32 weights under bfloat16 autocast on GPUs (as launch/train.py), float32 on
the CPU; the default local attention backend of the device (Triton on GPUs). Dense runs have
``GPTConfig.sparsity = None``, sparse runs e.g. ``"hash:8"``: per layer and head, queries and
keys are hashed into 8 buckets by fixed random projections and a query sees only the earlier
keys of its bucket (:mod:`ringflash.sparse`). No document mask: a training sample is a random
window of ``S + 1`` bytes of the training split (the targets are the next bytes, file
boundaries included), with causal attention over the whole window.

Training. AdamW (betas 0.9/0.95, weight decay on matrices), linear warmup then cosine decay to
``--min-lr-ratio``, gradient clipping at 1.0, ``--tokens-per-step`` tokens per step (batch
``tokens_per_step // S``, at least 1). Every run of a length starts from the same weights (same
seed) and sees the same windows in the same order. The dense run goes first and stops at
``--steps`` or when ``--time-limit`` seconds have passed since its first step ended; the
sparse runs of that length then run exactly the steps the dense run did (the same schedule,
planned for ``--steps``), so their losses compare at equal steps and data. (A sparse run is
stopped only past twice the time limit, a guard of the time box; the summary's
``steps_match`` says whether it was.)

Measurements per run: tokens/s over the steps after the first ``--skip-steps`` (10; the first
compiles the Triton kernels), timed with ``torch.cuda.synchronize`` and ``perf_counter``, and
the median of the same rate over each ``--log-every`` interval (``tokens_per_s_median``: robust
to an interval slowed by a late compilation); the first step's seconds; the training loss every
``--log-every`` steps with its elapsed time; the final validation loss (mean over
``--val-batches`` fixed windows of the validation split, the same for every run of a length, in
eval mode: sparse models are evaluated sparse); the peak GPU memory; and, for sparse runs, the
fraction of the causal query-key pairs that the buckets leave visible (``attn_density``,
measured on the first validation batch, mean over layers and heads; 1/B if queries and keys fell
uniformly and independently into B buckets). One JSON line per run, then one ``summary`` line
per (length, sparsity) with ``speedup`` = sparse tokens/s / dense tokens/s and both validation
losses, go to ``--out`` (default ``benchmarks/results/sparse_train_<gpu>/results.jsonl``).
``attn_flop_share`` in the summary is attention's share of the dense step's FLOPs
(FlashAttention convention: 3.5x the forward for forward + backward, matmuls 3x), and
``amdahl_speedup`` the speedup if attention's time shrank by ``attn_density`` and nothing else
changed.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import math
import os
import sys
import sysconfig
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from ringflash.models import GPT, GPTConfig  # noqa: E402

PAPER_SPEEDUP = {8192: 2.0, 16384: 3.3}  # the paper's headline training speedups at 8k and 16k
SEPARATOR = b"\0"  # between files of a split
CORPUS_VERSION = 1  # part of the cache key: bump when the build changes


def parse_len(s: str) -> int:
    s = s.lower()
    return int(float(s[:-1]) * 1024) if s.endswith("k") else int(s)


def gpu_slug() -> str:
    if not torch.cuda.is_available():
        return "cpu"
    name = torch.cuda.get_device_name().lower()
    for tag in ("h200", "h100", "a100", "b200", "l40s", "l4", "a10g"):
        if tag in name:
            return tag
    return name.replace("nvidia", "").strip().replace(" ", "_")


# -- the corpus ------------------------------------------------------------------------------------


def source_root(source: str) -> str:
    """The directory (or file) of a source: ``stdlib``, an installed package's name, or a path."""
    if source == "stdlib":
        return sysconfig.get_paths()["stdlib"]
    if os.path.exists(source):
        return os.path.abspath(source)
    spec = importlib.util.find_spec(source)  # a top-level name: found without importing it
    if spec is None:
        raise ValueError(f"--sources {source!r}: neither 'stdlib', a path, nor an installed package")
    if spec.submodule_search_locations:
        return list(spec.submodule_search_locations)[0]
    return spec.origin


def list_files(sources: list[str], exts: tuple[str, ...], max_bytes: int) -> list[tuple[str, str, str, int]]:
    """(source, root, relative path, size) of every file of the sources, sorted by source and path."""
    skip_dirs = {"__pycache__", "site-packages", "dist-packages", ".git"}
    out = []
    for source in sources:
        root = source_root(source)
        if os.path.isfile(root):
            out.append((source, os.path.dirname(root), os.path.basename(root), os.path.getsize(root)))
            continue
        found = []
        for d, dirs, files in os.walk(root):
            dirs[:] = sorted(x for x in dirs if x not in skip_dirs)
            for f in files:
                if f.endswith(exts):
                    path = os.path.join(d, f)
                    try:
                        size = os.path.getsize(path)
                    except OSError:
                        continue
                    if 0 < size <= max_bytes:
                        found.append((source, root, os.path.relpath(path, root), size))
        out.extend(sorted(found))
    return out


def _order_key(entry) -> str:
    source, _, rel, _ = entry
    return hashlib.sha1(f"{source}/{rel}".encode()).hexdigest()


def build_corpus(sources: list[str], exts: tuple[str, ...], max_bytes: int, val_fraction: float,
                 cache_dir: str) -> tuple[np.ndarray, np.ndarray, dict]:
    """(train, val, info): uint8 arrays of the two splits and what they hold (see the module docstring)."""
    files = list_files(sources, exts, max_bytes)
    if len(files) < 2:
        raise ValueError(f"the corpus needs at least 2 files (one for validation); --sources {sources} "
                         f"with {exts} gave {len(files)}")
    listing = "\n".join(f"{s}/{r}:{n}" for s, _, r, n in files)
    key = hashlib.sha1(f"{CORPUS_VERSION}|{exts}|{max_bytes}|{val_fraction}\n{listing}".encode()).hexdigest()[:16]
    base = os.path.join(cache_dir, f"ringflash_sparse_corpus_{key}")
    info_path = base + ".json"
    t0 = time.perf_counter()
    if os.path.exists(info_path) and os.path.exists(base + "_train.npy") and os.path.exists(base + "_val.npy"):
        with open(info_path) as f:
            info = json.load(f)
        info["cached"] = True
    else:
        seen = set()
        docs = []
        for entry in sorted(files, key=_order_key):
            source, root, rel, _ = entry
            try:
                with open(os.path.join(root, rel), "rb") as f:
                    data = f.read()
            except OSError:
                continue
            digest = hashlib.sha1(data).digest()
            if not data or digest in seen:  # vendored copies, empty __init__ files
                continue
            seen.add(digest)
            docs.append((source, data))
        if len(docs) < 2:
            raise ValueError(f"the corpus needs at least 2 distinct files; got {len(docs)}")
        n_val = min(len(docs) - 1, max(1, round(val_fraction * len(docs))))
        train_docs, val_docs = docs[:-n_val], docs[-n_val:]
        train = np.frombuffer(SEPARATOR.join(d for _, d in train_docs), dtype=np.uint8)
        val = np.frombuffer(SEPARATOR.join(d for _, d in val_docs), dtype=np.uint8)
        os.makedirs(cache_dir, exist_ok=True)
        np.save(base + "_train.npy", train)
        np.save(base + "_val.npy", val)
        per_source = {}
        for source, d in docs:
            per_source[source] = per_source.get(source, 0) + len(d)
        info = dict(
            sources={s: source_root(s) for s in sources}, exts=list(exts), max_file_bytes=max_bytes,
            files_train=len(train_docs), files_val=len(val_docs), bytes_train=int(train.size),
            bytes_val=int(val.size), bytes_per_source=per_source,
            duplicates_skipped=len(files) - len(docs),
            sha1_train=hashlib.sha1(train.tobytes()).hexdigest(),
            sha1_val=hashlib.sha1(val.tobytes()).hexdigest(),
            split=f"files in SHA-1(source/path) order, the last {val_fraction:g} of them validation",
            separator="NUL byte between files", cache=base, cached=False,
        )
        with open(info_path, "w") as f:
            json.dump(info, f)
    train = np.load(base + "_train.npy", mmap_mode="r")
    val = np.load(base + "_val.npy", mmap_mode="r")
    info["build_s"] = round(time.perf_counter() - t0, 2)
    return train, val, info


def windows(data: np.ndarray, starts: np.ndarray, S: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-byte targets, (len(starts), S) int64, of the windows at ``starts``."""
    rows = np.stack([np.asarray(data[s : s + S + 1]) for s in starts]).astype(np.int64)
    t = torch.from_numpy(rows)
    return t[:, :-1].contiguous(), t[:, 1:].contiguous()


def train_starts(data: np.ndarray, S: int, batch: int, seed: int, step: int) -> np.ndarray:
    return np.random.default_rng([seed, 0, S, step]).integers(0, len(data) - S - 1, size=batch)


def val_starts(data: np.ndarray, S: int, count: int, seed: int) -> np.ndarray:
    if len(data) < S + 2:
        raise ValueError(f"the validation split holds {len(data)} bytes, too few for windows of {S + 1}; "
                         "use a larger corpus or a shorter sequence")
    return np.random.default_rng([seed, 1, S]).integers(0, len(data) - S - 1, size=count)


# -- FLOPs and attention density --------------------------------------------------------------------


def step_flops(dim: int, layers: int, heads: int, kv_heads: int, mlp_ratio: float, S: int, tokens: int,
               vocab: int = 256) -> tuple[float, float]:
    """(matmul FLOPs, attention FLOPs) of one training step of ``tokens`` tokens in sequences of ``S``."""
    hd = dim // heads
    per_token = 2 * (dim * (heads + 2 * kv_heads) * hd + heads * hd * dim + 2 * dim * int(mlp_ratio * dim))
    matmul = 3.0 * tokens * (layers * per_token + 2 * dim * vocab)
    attn = 3.5 * tokens * layers * 4 * heads * hd * (S + 1) / 2  # causal: (S + 1) / 2 keys per query
    return matmul, attn


def causal_density(qb: torch.Tensor, kb: torch.Tensor, num_buckets: int) -> float:
    """Visible causal pairs (query and key in one bucket, key at or before the query) over all
    causal pairs; ``qb`` (B, S, H), ``kb`` (B, S, Hkv) bucket ids."""
    B, S, H = qb.shape
    G = H // kb.shape[2]
    kb = kb.long().repeat_interleave(G, dim=2)
    counts = torch.nn.functional.one_hot(kb, num_buckets).cumsum(dim=1)  # (B, S, H, nb): keys <= position
    seen = counts.gather(-1, qb.long()[..., None]).squeeze(-1)  # (B, S, H)
    return float(seen.double().sum() / (B * H * S * (S + 1) / 2))


def measure_density(model, x: torch.Tensor, autocast) -> float | None:
    """attn_density of a hash-sparse model on the batch ``x``: buckets captured from its forward."""
    import ringflash.nn as rnn

    if model.config.sparsity is None or not model.config.sparsity.startswith("hash"):
        return None
    captured = []
    original = rnn.hash_buckets

    def capture(t, projection, num_buckets):
        out = original(t, projection, num_buckets)
        captured.append((out, num_buckets))
        return out

    rnn.hash_buckets = capture
    try:
        with torch.no_grad(), autocast:
            model(x)
    finally:
        rnn.hash_buckets = original
    pairs = [(captured[i], captured[i + 1]) for i in range(0, len(captured) - 1, 2)]  # (q, k) per layer
    if not pairs:
        return None
    return sum(causal_density(q, k, nb) for (q, nb), (k, _) in pairs) / len(pairs)


# -- one run ----------------------------------------------------------------------------------------


def lr_at(step: int, lr: float, warmup: int, total: int, min_ratio: float) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def evaluate(model, val: np.ndarray, starts: np.ndarray, S: int, batch: int, device, autocast) -> float:
    model.eval()
    losses = []
    with torch.no_grad():
        for i in range(0, len(starts), batch):
            x, y = windows(val, starts[i : i + batch], S)
            with autocast:
                _, loss = model(x.to(device), y.to(device))
            losses.append(loss.float())
    model.train()
    return float(torch.stack(losses).mean())


def run(args, sparsity: str | None, S: int, steps: int, time_limit: float, train: np.ndarray, val: np.ndarray,
        device) -> dict:
    cuda = device.type == "cuda"
    batch = max(1, args.tokens_per_step // S)
    config = GPTConfig(vocab_size=256, dim=args.dim, n_layers=args.layers, n_heads=args.heads,
                       n_kv_heads=args.kv_heads, sparsity=sparsity)
    torch.manual_seed(args.seed)
    model = GPT(config, backend=args.backend).to(device)
    model.train()
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), fused=cuda)
    fwd = torch.compile(model) if args.compile else model
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda)
    skip = min(args.skip_steps, steps // 2)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda:
        torch.cuda.reset_peak_memory_stats()

    curve, pending = [], []
    t_begin = time.perf_counter()
    t_first = t_timed = None
    stopped_by_time = False
    done = 0
    for step in range(steps):
        x, y = windows(train, train_starts(train, S, batch, args.seed, step), S)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.lr, args.warmup, steps, args.min_lr_ratio)
        with autocast:
            _, loss = fwd(x, y)
        loss.backward()
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        pending.append(loss.detach())
        done = step + 1
        if step == 0:
            sync()
            t_first = time.perf_counter()
        if done == skip:
            sync()
            t_timed = time.perf_counter()
        if done % args.log_every == 0 or done == steps:
            values = torch.stack(pending).float().tolist()  # synchronises
            pending.clear()
            curve.append([done, round(sum(values) / len(values), 4), round(time.perf_counter() - t_begin, 2)])
            if not math.isfinite(values[-1]):
                break
        if time_limit and time.perf_counter() - t_first > time_limit and done < steps:
            stopped_by_time = True
            break
    sync()
    t_end = time.perf_counter()
    if pending:
        values = torch.stack(pending).float().tolist()
        curve.append([done, round(sum(values) / len(values), 4), round(t_end - t_begin, 2)])
    if t_timed is None:  # stopped before the skipped steps were over: time all but the first
        t_timed, skip = t_first, 1
    timed = done - skip
    tokens_per_s = timed * batch * S / (t_end - t_timed) if timed > 0 and t_end > t_timed else None
    # The same over each logging interval (their ends are synchronised): the median leaves out an
    # interval that a late kernel compilation or a hiccup of the machine slowed down.
    marks = sorted({(skip, t_timed - t_begin)} | {(c[0], c[2]) for c in curve if c[0] > skip})
    rates = [(b[0] - a[0]) * batch * S / (b[1] - a[1]) for a, b in zip(marks, marks[1:]) if b[1] > a[1]]
    median = sorted(rates)[len(rates) // 2] if rates else None

    starts = val_starts(val, S, args.val_batches * batch, args.seed)
    val_loss = evaluate(model, val, starts, S, batch, device, autocast)
    density = measure_density(model, windows(val, starts[:batch], S)[0].to(device), autocast)
    mem = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    return dict(
        steps=done, steps_planned=steps, steps_timed=timed, batch=batch, tokens_per_step=batch * S,
        tokens_per_s=None if tokens_per_s is None else round(tokens_per_s, 1),
        tokens_per_s_median=None if median is None else round(median, 1),
        ms_per_step=None if tokens_per_s is None else round(1000 * batch * S / tokens_per_s, 2),
        first_step_s=round(t_first - t_begin, 2), train_s=round(t_end - t_begin, 2),
        stopped_by_time=stopped_by_time, val_loss=round(val_loss, 4),
        val_bpb=round(val_loss / math.log(2), 4), train_loss_last=curve[-1][1] if curve else None,
        loss_curve=curve, attn_density=None if density is None else round(density, 4),
        peak_mem_gb=None if mem is None else round(mem, 2),
        params=sum(p.numel() for p in model.parameters()),
    )


# -- main ---------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seqlens", nargs="+", default=["8k", "16k"], help="sequence lengths (e.g. 8k 16k)")
    p.add_argument("--sparsity", nargs="+", default=["hash:8"],
                   help="sparse settings run against dense (GPTConfig.sparsity, e.g. hash:8 hash:16)")
    p.add_argument("--no-dense", action="store_true", help="skip the dense runs (no speedups then)")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=None)
    p.add_argument("--tokens-per-step", type=int, default=16384, help="batch = this // S (at least 1)")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--time-limit", type=float, default=75.0,
                   help="seconds per dense run after its first step (0: none); the sparse runs then do the "
                        "dense run's steps (stopped only at twice this)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=50, help="linear warmup steps")
    p.add_argument("--min-lr-ratio", type=float, default=0.1)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--skip-steps", type=int, default=10, help="steps left out of tokens/s (compilation)")
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--val-batches", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sources", nargs="+", default=["stdlib", "torch", "transformers", "numpy"],
                   help="corpus sources: stdlib, installed package names, or paths")
    p.add_argument("--exts", nargs="+", default=[".py"], help="file name endings read from the sources")
    p.add_argument("--max-file-kb", type=int, default=1024, help="leave out larger files (generated tables)")
    p.add_argument("--val-fraction", type=float, default=0.05)
    p.add_argument("--cache", default="/tmp", help="folder of the cached corpus (.npy)")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    p.add_argument("--backend", default=None, help="local attention backend (default: by device)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--out", default=None,
                   help="JSON lines (default benchmarks/results/sparse_train_<gpu>/results.jsonl)")
    args = p.parse_args(argv)
    args.seqlens = [parse_len(s) for s in args.seqlens]
    args.sparsity = [None if s in ("none", "dense") else s for s in args.sparsity]
    if args.steps < 1 or args.tokens_per_step < 1 or args.val_batches < 1 or args.log_every < 1:
        p.error("--steps, --tokens-per-step, --val-batches and --log-every must be positive")
    return args


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    gpu = gpu_slug() if device.type == "cuda" else "cpu"
    out = args.out or os.path.join("benchmarks", "results", f"sparse_train_{gpu}", "results.jsonl")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)

    train, val, corpus = build_corpus(args.sources, tuple(args.exts), args.max_file_kb * 1024,
                                      args.val_fraction, args.cache)
    print(f"corpus: {corpus['bytes_train'] / 1e6:.1f} MB train ({corpus['files_train']} files), "
          f"{corpus['bytes_val'] / 1e6:.2f} MB val ({corpus['files_val']} files) from {', '.join(args.sources)}"
          f"{' (cached)' if corpus['cached'] else ''}, {corpus['build_s']} s", flush=True)
    env = dict(gpu=gpu, device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
               torch=torch.__version__)
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        pass
    model_info = dict(dim=args.dim, layers=args.layers, heads=args.heads, kv_heads=args.kv_heads or args.heads,
                      vocab=256, dtype="bf16 autocast" if device.type == "cuda" else "float32",
                      backend=args.backend or ("triton" if device.type == "cuda" else "reference"),
                      compile=args.compile)
    train_info = dict(lr=args.lr, warmup=args.warmup, min_lr_ratio=args.min_lr_ratio,
                      weight_decay=args.weight_decay, grad_clip=args.grad_clip, seed=args.seed,
                      time_limit=args.time_limit)

    rows = []
    with open(out, "w") as f:
        def write(row):
            rows.append(row)
            f.write(json.dumps(row) + "\n")
            f.flush()

        for S in args.seqlens:
            steps = args.steps
            settings = ([] if args.no_dense else [None]) + [s for s in args.sparsity if s is not None]
            results = {}
            for sparsity in settings:
                name = sparsity or "dense"
                print(f"S={S} {name}: up to {steps} steps ...", flush=True)
                row = dict(kind="run", impl=name, sparsity=sparsity, S=S, **env, model=model_info,
                           train=train_info, corpus=corpus)
                # A sparse run after a dense one does its steps; twice the time limit only guards
                # the time box (steps_match in the summary says whether it was needed).
                limit = args.time_limit * (2 if sparsity is not None and "dense" in results else 1)
                try:
                    row.update(run(args, sparsity, S, steps, limit, train, val, device))
                except Exception as e:  # noqa: BLE001 -- recorded, and the other runs go on
                    row["error"] = f"{type(e).__name__}: {e}"[:2000]
                    print(f"  failed: {row['error']}", flush=True)
                finally:
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                write(row)
                results[name] = row
                if "error" not in row:
                    print(f"  {row['steps']} steps, {row['tokens_per_s']} tokens/s ({row['ms_per_step']} ms/step; "
                          f"median of the logging intervals {row['tokens_per_s_median']}; "
                          f"first step {row['first_step_s']} s), val loss {row['val_loss']}, "
                          f"peak {row['peak_mem_gb']} GB" + (f", attn density {row['attn_density']}"
                                                               if row["attn_density"] is not None else ""),
                          flush=True)
                    if sparsity is None:
                        steps = row["steps"]  # the sparse runs do the steps the dense one did
            dense = results.get("dense")
            for name, row in results.items():
                if name == "dense" or dense is None or "error" in row or "error" in dense:
                    continue
                matmul, attn = step_flops(args.dim, args.layers, args.heads, args.kv_heads or args.heads, 4.0,
                                          S, row["tokens_per_step"])
                share = attn / (matmul + attn)
                d = row["attn_density"]
                speedup = (row["tokens_per_s"] / dense["tokens_per_s"]
                           if row["tokens_per_s"] and dense["tokens_per_s"] else None)
                write(dict(
                    kind="summary", impl=name, S=S, gpu=gpu, steps=row["steps"],
                    steps_match=row["steps"] == dense["steps"],
                    tokens_per_s_dense=dense["tokens_per_s"], tokens_per_s_sparse=row["tokens_per_s"],
                    speedup=None if speedup is None else round(speedup, 3),
                    speedup_median=(round(row["tokens_per_s_median"] / dense["tokens_per_s_median"], 3)
                                    if row["tokens_per_s_median"] and dense["tokens_per_s_median"] else None),
                    paper_speedup=PAPER_SPEEDUP.get(S),
                    val_loss_dense=dense["val_loss"], val_loss_sparse=row["val_loss"],
                    val_loss_delta=round(row["val_loss"] - dense["val_loss"], 4),
                    attn_density=d, attn_flop_share=round(share, 3),
                    amdahl_speedup=None if d is None else round(1 / (1 - share + share * d), 3),
                    peak_mem_gb_dense=dense["peak_mem_gb"], peak_mem_gb_sparse=row["peak_mem_gb"],
                ))

    print()
    print(f"{'S':>6} {'impl':>8} {'steps':>6} {'tokens/s':>11} {'ms/step':>8} {'val loss':>9} "
          f"{'train loss':>10} {'density':>8} {'peak GB':>8} {'speedup':>8} {'paper':>6}")
    summaries = {(r["S"], r["impl"]): r for r in rows if r["kind"] == "summary"}
    for r in rows:
        if r["kind"] != "run":
            continue
        if "error" in r:
            print(f"{r['S']:>6} {r['impl']:>8}  failed: {r['error'][:80]}")
            continue
        s = summaries.get((r["S"], r["impl"]), {})

        def fmt(v, width, spec, suffix=""):
            return (format(v, spec) + suffix if v is not None else "-").rjust(width)

        print(f"{r['S']:>6} {r['impl']:>8} {r['steps']:>6} {fmt(r['tokens_per_s'], 11, '.0f')} "
              f"{fmt(r['ms_per_step'], 8, '.1f')} {r['val_loss']:>9.4f} {fmt(r['train_loss_last'], 10, '.4f')} "
              f"{fmt(r['attn_density'], 8, '.3f')} {fmt(r['peak_mem_gb'], 8, '.2f')} "
              f"{fmt(s.get('speedup'), 8, '.2f', 'x')} {fmt(s.get('paper_speedup'), 6, '.1f', 'x')}")
    print(f"\nrows: {out}")
    return rows


if __name__ == "__main__":
    main()
