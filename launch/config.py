"""The training job's configuration: one dataclass, its command-line flags, and their checks.

Every flag of launch/train.py is a field of :class:`TrainConfig`, and :func:`build_parser`
makes ``--field-name`` from each field, so a new flag is one line in the dataclass::

    name: int = _f(0, "help text")                    # --name N (int, float or str)
    name: str = _f("a", "help text", choices=["a", "b"])  # --name a|b
    name: bool = _f(True, "help text")                # --name / --no-name

then, if some values cannot run, a check in the ``_*_problems`` function of its group (a
message that says what to change; :func:`config_problems` gathers them), and, if it decides
the weights' shapes or the data, its name in ``RESUME_FIXED``.

The checks run on every rank before any communication, so they are deterministic: every rank
reaches the same verdict and a bad flag fails fast everywhere (launch/train.py, ``fail``).
slurm/submit.py runs them on the submission host too (``hardware=False``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

if __package__:  # imported as launch.config
    from .checkpoint import META_FILE, find_checkpoint
    from .data import TASKS, dataset_problem
else:  # launch/ is on sys.path (launch/train.py run as a script, the tests)
    from checkpoint import META_FILE, find_checkpoint
    from data import TASKS, dataset_problem

from ringflash.layout import LAYOUTS, get_layout
from ringflash.sparse import parse_sparsity

__all__ = ["TrainConfig", "RESUME_FIXED", "build_parser", "parse_args", "config_problems", "resolve_ulysses"]


def _f(default, help: str, **kw):
    """A field with its flag's help (and ``choices=``, any other argparse keyword in ``kw``)."""
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    # output
    out: str = _f("runs/train", "directory for metrics.jsonl, loss.png and the checkpoint (ckpt/)")
    # data
    data: str = _f("", "train on the documents of this file instead of a synthetic task (bytes as tokens, "
                   "vocabulary 256): documents separated by blank lines, or a .jsonl file with a \"text\" "
                   "field per line; packed into sequences of --seq-len with their boundaries")
    task: str = _f("recall", "the synthetic task without --data: recall (pairs, then queries, across the whole "
                   "sequence) or packed-recall (short recall documents packed into each sequence, the same "
                   "keys bound to other values in every document)", choices=list(TASKS))
    recall_pairs: int = _f(0, "key-value pairs per recall sample (0: seq_len // 32, at most 52), or per "
                           "document of packed-recall (0: 2, at most 9)")
    seq_len: int = _f(128, "tokens per sequence, the whole sequence (split over the cp ranks)")
    batch_size: int = _f(16, "sequences per step per data-parallel replica")
    # parallelism
    cp_size: int = _f(0, "context-parallel ranks per sequence (0: all ranks); must divide the world size")
    layout: str = _f("striped", "sequence layout over the cp ranks", choices=sorted(LAYOUTS))
    ulysses_size: int = _f(0, "of the --cp-size ranks of a sequence, groups of this many consecutive ranks (a "
                           "node's GPUs) trade heads for tokens with an all-to-all (Ulysses) and the ring runs "
                           "across the groups, --cp-size / --ulysses-size ranks long; 1: the ring alone; 0 "
                           "(default): the ranks of a node (the largest divisor of them that fits the heads) when "
                           "a sequence's ranks span several nodes, else 1 (also 1 for --backend cudnn/sdpa_flash "
                           "with --layout striped). Must divide --cp-size and --heads; "
                           "--kv-heads a multiple or a divisor of it")
    ulysses_chunks: int = _f(1, "with --ulysses-size > 1: cut each rank's heads into up to this many chunks whose "
                             "all-to-alls run beside the other chunks' rings (ringflash.HybridGroup's chunks; "
                             "1: one all-to-all each way)")
    # model
    dim: int = _f(128, "model width")
    layers: int = _f(2, "transformer blocks")
    heads: int = _f(4, "query heads")
    kv_heads: int = _f(2, "key/value heads (GQA when fewer than --heads)")
    rope_base: float = _f(10000.0, "rotary embedding base (raise it for very long sequences)")
    window: int = _f(0, "sliding-window attention: each token sees itself and the N tokens before it (0: no window)")
    sparsity: str = _f("", "sparse attention (ringflash.sparse), on top of the mask: hash:BUCKETS (a query sees only "
                       "the keys of its hash bucket, per head), qkdrop:FRACTION (each query and key dropped with "
                       "this probability, drawn afresh every step), block:PATTERN (a block-sparse pattern over the "
                       "whole sequence, PATTERN a comma list of size=, local=, global=, random=, seed=, e.g. "
                       "block:size=128,local=4,global=1); '' (default): dense. Needs --backend triton (GPUs) or "
                       "reference; runs under --ulysses-size too")
    doc_mask: bool = _f(True, "with packed documents (--data, --task packed-recall), attend only inside each "
                        "document, rotary positions restarting at each; --no-doc-mask: causal attention over "
                        "the whole packed sequence (the same targets), to compare")
    checkpoint_activations: bool = _f(False, "recompute each block in the backward to save memory")
    compile: bool = _f(False, "torch.compile the model as one graph (ring attention is a custom op in it)")
    fsdp: bool = _f(False, "shard parameters, gradients and optimizer state over all dp x cp ranks with FSDP2 "
                    "(fully_shard per block and the root, as torchtitan does) instead of replicating them under DDP; "
                    "checkpoints hold the gathered state either way, so a run may resume with or without it; "
                    "with --compile each block is compiled inside FSDP's hooks")
    # optimisation
    steps: int = _f(600, "train until this many steps are done (a resumed run continues to it)")
    lr: float = _f(3e-3, "peak learning rate (AdamW)")
    min_lr_ratio: float = _f(0.1, "final learning rate as a fraction of --lr (cosine decay)")
    warmup_steps: int = _f(20, "linear warmup steps")
    lr_decay_steps: int = _f(0, "length of the cosine schedule (0: --steps); set it to stop early without changing the schedule")
    weight_decay: float = _f(0.0, "AdamW weight decay on matrices (not on norms or biases)")
    grad_clip: float = _f(1.0, "clip the gradient norm to this (0: no clipping)")
    seed: int = _f(0, "seed of the initial weights and of the data")
    # logging and checkpoints
    log_every: int = _f(25, "log a line and a metrics.jsonl record every N steps")
    ckpt_every: int = _f(200, "checkpoint every N steps (0: only on a signal and at the end)")
    resume: bool = _f(False, "continue from OUT/ckpt when it exists (start fresh otherwise)")
    plot: bool = _f(True, "write OUT/loss.png at the end (needs matplotlib)")
    # hardware
    device: str = _f("auto", "cpu, cuda, or auto (cuda when available)", choices=["auto", "cpu", "cuda"])
    dist_backend: str = _f("auto", "torch.distributed backend (auto: nccl on cuda, gloo on cpu)", choices=["auto", "nccl", "gloo"])
    backend: str = _f("auto", "local attention kernel (auto: triton on cuda, reference on cpu; cudnn and "
                      "sdpa_flash: PyTorch's fused SDPA kernels, bfloat16 on GPUs)",
                      choices=["auto", "triton", "reference", "cudnn", "sdpa_flash"])
    dtype: str = _f("auto", "compute dtype via autocast (auto: bfloat16 on cuda, float32 on cpu)", choices=["auto", "float32", "bfloat16"])
    transport: str = _f("nccl", "how ring transfers move: nccl, or copy_engine (GPUs of one node, "
                        "no SM spent on transfers, a kept receive workspace; ringflash.comm)",
                        choices=["nccl", "copy_engine"])

    def resolved(self) -> "TrainConfig":
        """A copy with every ``auto`` replaced by what this machine gets."""
        c = dataclasses.replace(self)
        if c.device == "auto":
            c.device = "cuda" if torch.cuda.is_available() else "cpu"
        if c.dist_backend == "auto":
            c.dist_backend = "nccl" if c.device == "cuda" else "gloo"
        if c.backend == "auto":
            c.backend = "triton" if c.device == "cuda" else "reference"
        if c.dtype == "auto":
            c.dtype = "bfloat16" if c.device == "cuda" else "float32"
        if c.lr_decay_steps == 0:
            c.lr_decay_steps = c.steps
        try:  # one spelling for the metrics, the checkpoint's config and the log ("none" -> "")
            c.sparsity = str(parse_sparsity(c.sparsity) or "")
        except (TypeError, ValueError):
            pass  # left as given: config_problems says what is wrong with it
        return c

    @property
    def packed(self) -> bool:
        """Whether the sequences are packed documents (with boundaries): --data or packed-recall."""
        return bool(self.data) or self.task == "packed-recall"

    @property
    def dense_mask(self) -> str:
        """The mask without --sparsity: ``causal``, ``causal+documents``, ``causal+window=N``,
        ``causal+documents+window=N``."""
        return "causal" + ("+documents" if self.packed and self.doc_mask else "") + (
            f"+window={self.window}" if self.window else "")

    @property
    def mask(self) -> str:
        """The attention mask, as the log line, the metrics and the loss plot name it:
        :attr:`dense_mask`, then ``+sparsity=SPEC`` with --sparsity (``causal+sparsity=hash:8``)."""
        try:
            spec = parse_sparsity(self.sparsity)
        except (TypeError, ValueError):
            spec = self.sparsity  # as given (config_problems refuses it)
        return self.dense_mask + (f"+sparsity={spec}" if spec else "")


# Fields that must not change when a run resumes: they decide the weights' shapes or the data.
# (--seq-len decides the samples and, with --recall-pairs 0, how many pairs each one holds.
# --window, --doc-mask and --sparsity change what attention sees, not the weights or the
# samples: a run may resume under another mask, e.g. dense training continued sparse. The hash
# projections of --sparsity hash:B are fixed per layer, not weights. The checkpoint records the
# run's --sparsity with the rest of its config, and every metrics record its mask.)
RESUME_FIXED = ("dim", "layers", "heads", "kv_heads", "data", "task", "seq_len", "recall_pairs", "seed")


# -- flags ------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """One flag per :class:`TrainConfig` field: ``--seq-len`` for ``seq_len``; ``--x/--no-x`` for a bool."""
    p = argparse.ArgumentParser(
        description="Train a small long-context GPT with ringflash context parallelism x data parallelism.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        kw = {"default": f.default, "help": f.metadata["help"]}
        if f.type in ("bool", bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        else:
            typ = {"int": int, "float": float, "str": str}[f.type if isinstance(f.type, str) else f.type.__name__]
            p.add_argument(flag, type=typ, choices=f.metadata.get("choices"), **kw)
    return p


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    return TrainConfig(**vars(build_parser().parse_args(argv)))


# -- checks -----------------------------------------------------------------------------------


def _sdpa_striped(cfg: TrainConfig) -> bool:
    """PyTorch's fused engines cannot cut the causal steps of the ring's striped layout under
    Ulysses (``Striped(U)`` over the ring); zigzag and contiguous keep forms they can."""
    return cfg.backend in ("cudnn", "sdpa_flash") and cfg.layout == "striped"


def resolve_ulysses(cfg: TrainConfig, world_size: int, ranks_per_node: int) -> TrainConfig:
    """``cfg`` with ``--ulysses-size 0`` (the default) decided for ``world_size`` ranks,
    ``ranks_per_node`` to a node: when a sequence's context-parallel ranks span several nodes, the
    largest divisor of ``ranks_per_node`` that divides the cp size and fits the heads (the ring then
    crosses nodes with fewer, larger hops and the all-to-all stays inside a node); else 1. Always 1
    for PyTorch's fused engines under --layout striped."""
    if cfg.ulysses_size != 0:
        return cfg
    from ringflash.ulysses import check_heads

    cp = cfg.cp_size or world_size
    u = 1
    if _sdpa_striped(cfg):
        return dataclasses.replace(cfg, ulysses_size=1)  # the ring alone (see _parallel_problems)
    if 1 < ranks_per_node < world_size and cp > ranks_per_node:
        for cand in range(ranks_per_node, 1, -1):
            if ranks_per_node % cand or cp % cand or cfg.heads < 1 or cfg.kv_heads < 1:
                continue
            try:
                check_heads(cfg.heads, cfg.kv_heads, cand)
            except ValueError:
                continue
            u = cand
            break
    return dataclasses.replace(cfg, ulysses_size=u)


def config_problems(cfg: TrainConfig, world_size: int, *, hardware: bool = True) -> list[str]:
    """Every reason ``cfg`` cannot run on ``world_size`` ranks, each saying what to change.

    Deterministic, so every rank reaches the same verdict before any communication.
    ``hardware=False`` skips the checks of this machine's GPUs (a submission host).
    """
    problems = (
        _number_problems(cfg)
        + _parallel_problems(cfg, world_size)
        + _head_problems(cfg)
        + _data_problems(cfg)
        + _mask_problems(cfg)
        + _hardware_problems(cfg, world_size, hardware=hardware)
    )
    if cfg.resume:
        problems += _resume_problems(cfg)
    return problems


def _number_problems(cfg: TrainConfig) -> list[str]:
    """Counts, rates and sizes out of their range."""
    problems = []
    for name in ("seq_len", "batch_size", "steps", "dim", "layers", "heads", "kv_heads", "log_every"):
        if getattr(cfg, name) < 1:
            problems.append(f"--{name.replace('_', '-')} must be at least 1; got {getattr(cfg, name)}")
    if cfg.ckpt_every < 0 or cfg.cp_size < 0 or cfg.warmup_steps < 0 or cfg.lr_decay_steps < 0:
        problems.append("--ckpt-every, --cp-size, --warmup-steps and --lr-decay-steps cannot be negative")
    if cfg.lr <= 0:
        problems.append(f"--lr must be positive; got {cfg.lr}")
    if not 0 <= cfg.min_lr_ratio <= 1:
        problems.append(f"--min-lr-ratio must be between 0 and 1; got {cfg.min_lr_ratio}")
    if cfg.weight_decay < 0 or cfg.grad_clip < 0:
        problems.append(f"--weight-decay and --grad-clip cannot be negative; got {cfg.weight_decay} and {cfg.grad_clip}")
    if not (math.isfinite(cfg.rope_base) and cfg.rope_base > 0):
        problems.append(f"--rope-base must be positive; got {cfg.rope_base}")
    return problems


def _parallel_problems(cfg: TrainConfig, world_size: int) -> list[str]:
    """The dp x cp split of the world, and the layout's cut of a sequence over the cp ranks."""
    cp = cfg.cp_size or world_size
    if cp >= 1 and world_size % cp != 0:
        return [
            f"--cp-size {cp} does not divide the world size {world_size}: the world is "
            f"data-parallel x context-parallel; use a --cp-size among "
            f"{[d for d in range(1, world_size + 1) if world_size % d == 0]}"
        ]
    if cfg.ulysses_size < 0 or (cp >= 1 and cfg.ulysses_size > 0 and cp % cfg.ulysses_size != 0):
        return [
            f"--ulysses-size {cfg.ulysses_size} must be 0 (auto) or a positive divisor of the context-parallel size "
            f"{cp} (--cp-size, or the world): the cp ranks are --cp-size / --ulysses-size ring positions "
            f"of --ulysses-size ranks each"
        ]
    if cfg.ulysses_chunks < 1:
        return [f"--ulysses-chunks must be at least 1 (1: one all-to-all each way); got {cfg.ulysses_chunks}"]
    if cfg.ulysses_size > 1 and _sdpa_striped(cfg):
        return [
            f"--ulysses-size {cfg.ulysses_size} with --backend {cfg.backend} and --layout striped: under Ulysses "
            f"the ring's layout is striped with stripes of {cfg.ulysses_size} tokens, whose causal steps the "
            f"{cfg.backend} engine cannot cut; use --layout zigzag (or contiguous), or --backend triton"
        ]
    if cfg.ulysses_size > 1 and cfg.heads >= 1 and cfg.kv_heads >= 1:
        from ringflash.ulysses import check_heads

        try:
            check_heads(cfg.heads, cfg.kv_heads, cfg.ulysses_size)
        except ValueError as e:
            return [f"--heads {cfg.heads} / --kv-heads {cfg.kv_heads} with --ulysses-size {cfg.ulysses_size}: {e}"]
    if cp >= 1 and cfg.seq_len >= 1:
        layout = get_layout(cfg.layout)
        m = layout.multiple(cp) if cp > 1 else 1  # one rank holds the whole sequence: any length
        if cfg.seq_len % m != 0:
            return [
                f"--seq-len {cfg.seq_len} cannot be split by the {cfg.layout} layout over {cp} "
                f"context-parallel ranks: it must be a multiple of {m} (e.g. {_multiples(cfg.seq_len, m)})"
            ]
    return []


def _multiples(n: int, m: int) -> str:
    """The multiples of ``m`` nearest ``n`` (n not one of them), for an error message."""
    lower, upper = n // m * m, (n // m + 1) * m
    return f"{lower} or {upper}" if lower else f"{upper}"


def _head_problems(cfg: TrainConfig) -> list[str]:
    """Heads and the head dim, for rotary embeddings, GQA and the chosen attention kernel."""
    if cfg.heads < 1 or cfg.kv_heads < 1:
        return []  # already refused by _number_problems
    problems = []
    if cfg.dim % cfg.heads != 0:
        problems.append(f"--dim {cfg.dim} must be a multiple of --heads {cfg.heads}")
    elif (cfg.dim // cfg.heads) % 2 != 0:
        problems.append(f"the head dim --dim / --heads = {cfg.dim // cfg.heads} must be even (rotary embeddings)")
    elif cfg.backend == "triton" and ((cfg.dim // cfg.heads) % 8 != 0 or cfg.dim // cfg.heads > 256):
        problems.append(
            f"the triton kernels take a head dim (--dim / --heads) that is a multiple of 8 up to "
            f"256; got {cfg.dim // cfg.heads}"
        )
    elif cfg.backend in ("cudnn", "sdpa_flash"):
        max_d = 128 if cfg.backend == "cudnn" else 256
        if (cfg.dim // cfg.heads) % 8 != 0 or cfg.dim // cfg.heads > max_d:
            problems.append(
                f"--backend {cfg.backend} takes a head dim (--dim / --heads) that is a multiple of 8 "
                f"up to {max_d}; got {cfg.dim // cfg.heads} (--backend triton takes up to 256)"
            )
    if cfg.heads % cfg.kv_heads != 0:
        problems.append(f"--heads {cfg.heads} must be a multiple of --kv-heads {cfg.kv_heads}")
    return problems


def _data_problems(cfg: TrainConfig) -> list[str]:
    """The data flags together, and whether their source can feed sequences of --seq-len tokens."""
    problems = []
    if cfg.data and cfg.recall_pairs:
        problems.append("--recall-pairs sets up the recall task; with --data the model trains on the file: drop one")
    if cfg.data and cfg.task != "recall":
        problems.append(f"--task {cfg.task} is a synthetic task; with --data the model trains on the file: drop one")
    if cfg.seq_len >= 1:
        problem = dataset_problem(data=cfg.data, seq_len=cfg.seq_len, recall_pairs=cfg.recall_pairs, task=cfg.task)
        if problem:
            problems.append(problem)
    return problems


def _mask_problems(cfg: TrainConfig) -> list[str]:
    """The attention mask: the window, document masking, and the kernels that can serve them."""
    problems = []
    if cfg.window < 0:
        problems.append(f"--window cannot be negative; got {cfg.window} (0: no window; N: each token sees "
                        "itself and the N tokens before it)")
    if not cfg.doc_mask and not cfg.packed:
        problems.append(f"--no-doc-mask compares training without document masking on packed documents; "
                        f"--task {cfg.task} has none: use it with --data or --task packed-recall, or drop it")
    if cfg.backend in ("cudnn", "sdpa_flash") and cfg.dense_mask != "causal":
        problems.append(f"--backend {cfg.backend} serves causal attention only; the mask {cfg.dense_mask} needs "
                        "--backend triton (or reference)"
                        + (" or --no-doc-mask" if cfg.packed and cfg.doc_mask and not cfg.window else ""))
    return problems + _sparsity_problems(cfg)


def _sparsity_problems(cfg: TrainConfig) -> list[str]:
    """--sparsity: a spec that parses, fits --seq-len, and runs with the other flags."""
    try:
        spec = parse_sparsity(cfg.sparsity)
    except (TypeError, ValueError) as e:
        return [f"--sparsity {cfg.sparsity!r}: {e}"]
    if spec is None:
        return []
    problems = []
    if spec.kind == "block" and cfg.seq_len >= 1:
        size = spec.block_size
        if cfg.seq_len % size:
            problems.append(
                f"--sparsity {spec}: the block pattern must tile the whole sequence, but --seq-len "
                f"{cfg.seq_len} is not a multiple of its block size {size}; use a --seq-len such as "
                f"{_multiples(cfg.seq_len, size)}, or a size= that divides {cfg.seq_len}")
        elif spec.global_ > cfg.seq_len // size:
            problems.append(
                f"--sparsity {spec}: global={spec.global_} blocks, but --seq-len {cfg.seq_len} holds "
                f"{cfg.seq_len // size} blocks of {size}; use global= at most {cfg.seq_len // size}")
    if cfg.backend in ("cudnn", "sdpa_flash"):
        problems.append(f"--sparsity {spec} needs --backend triton (on GPUs; or reference): --backend "
                        f"{cfg.backend} runs PyTorch's dense fused kernels")
    return problems


def _hardware_problems(cfg: TrainConfig, world_size: int, *, hardware: bool) -> list[str]:
    """Device, backends, dtype and transport that do not go together (or not on this machine)."""
    problems = []
    if hardware and cfg.device == "cuda" and not torch.cuda.is_available():
        problems.append("--device cuda, but torch sees no GPU; use --device cpu (gloo, reference attention)")
    if cfg.device == "cpu" and cfg.dist_backend == "nccl":
        problems.append("--dist-backend nccl needs --device cuda; on the CPU use gloo")
    if cfg.transport == "copy_engine" and cfg.device != "cuda":
        problems.append("--transport copy_engine moves CUDA tensors between GPUs of one node; on the CPU keep --transport nccl (the process group's point-to-point transfers, gloo there)")
    elif hardware and cfg.transport == "copy_engine" and torch.cuda.is_available():
        cp = cfg.cp_size or world_size
        if torch.cuda.device_count() < cp:
            problems.append(
                f"--transport copy_engine needs every process to see all GPUs of its context-parallel "
                f"group: this process sees {torch.cuda.device_count()} for --cp-size {cp} (a launcher "
                f"or Slurm's per-task GPU binding shows each process only its own GPU); use --transport nccl"
            )
    if cfg.device == "cpu" and cfg.backend == "triton" and os.environ.get("TRITON_INTERPRET") != "1":
        problems.append("--backend triton needs --device cuda (or TRITON_INTERPRET=1 on the CPU); use --backend reference")
    if cfg.backend in ("cudnn", "sdpa_flash") and (cfg.device != "cuda" or cfg.dtype != "bfloat16"):
        problems.append(
            f"--backend {cfg.backend} runs PyTorch's fused kernels on GPUs in bfloat16: it needs "
            f"--device cuda and --dtype bfloat16 (got {cfg.device}, {cfg.dtype}); elsewhere use "
            "--backend triton or reference"
        )
    if cfg.device == "cpu" and cfg.dtype == "bfloat16":
        problems.append("--dtype bfloat16 is for GPUs; on the CPU use float32")
    return problems


def _resume_problems(cfg: TrainConfig) -> list[str]:
    """--resume onto a checkpoint whose RESUME_FIXED settings differ from ``cfg``'s."""
    ckpt = find_checkpoint(Path(cfg.out))
    if ckpt is None:
        return []
    try:
        saved = json.loads((ckpt / META_FILE).read_text())["config"]
    except (OSError, ValueError, KeyError) as e:
        return [f"cannot read the checkpoint in {ckpt} ({e}); remove it or drop --resume"]

    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}

    def same(k):
        if k == "data" and saved.get(k) and cfg.data:  # one file, however its path is written
            return Path(saved[k]).resolve() == Path(cfg.data).resolve()
        # A checkpoint from before a flag existed ran with the flag's default (--task recall).
        return saved.get(k, defaults[k]) == getattr(cfg, k)

    changed = [f"--{k.replace('_', '-')} {saved.get(k)!r} -> {getattr(cfg, k)!r}" for k in RESUME_FIXED if not same(k)]
    if changed:
        return [f"--resume from {ckpt} with settings that changed the model or the data: "
                f"{', '.join(changed)}; use the checkpoint's settings or another --out"]
    return []
