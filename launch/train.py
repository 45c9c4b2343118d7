"""Train a small long-context GPT with context parallelism (ringflash) x data parallelism.

On a machine without GPUs (gloo, reference attention), about a minute and a half on 2 cores:

    torchrun --standalone --nproc-per-node 2 launch/train.py --out runs/cpu

One node with 4 GPUs (NCCL, Triton kernels, bf16): one sequence of 128k tokens striped over
4 GPUs, 32k tokens per GPU:

    torchrun --standalone --nproc-per-node 4 launch/train.py --out runs/gpu4-128k \
        --cp-size 4 --layout striped --seq-len 131072 --batch-size 1 \
        --dim 1024 --layers 8 --heads 16 --kv-heads 4 --rope-base 1000000 \
        --steps 60 --warmup-steps 10 --lr 1e-3 --log-every 5 --ckpt-every 0

8 GPUs as 2 data-parallel replicas x 4 context-parallel ranks:

    torchrun --standalone --nproc-per-node 8 launch/train.py --cp-size 4 --seq-len 131072 ...

Several nodes: run the same line on every node with a shared rendezvous (see slurm/train.sbatch):

    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint $HEAD:29500 \
        --rdzv-id $JOB launch/train.py --cp-size 8 ...

The world of ``dp x cp`` ranks is a 2-D device mesh; each context-parallel group is ``cp``
consecutive ranks (on one node when ``cp`` divides the GPUs per node, where the ring's
point-to-point traffic stays on NVLink). Every rank of a cp group holds its layout's shard of
the same sequences; the dp groups see different sequences.

Gradients. The model's loss is the mean over the whole sequence (its cp group) and its
gradient on each rank is scaled so that the *average* of the cp ranks' parameter gradients is
the gradient of that mean (ringflash.batch.sharded_cross_entropy): each rank's backward holds
its tokens' share of the gradient times cp, and ring attention carries dK/dV back to the
ranks that own them. The training objective is the mean over dp replicas of those losses, so
DDP over the whole world -- the average over all dp x cp ranks -- gives exactly its gradient.

Checkpoints (model, optimizer, every rank's RNG states, data position, step) go to
``OUT/ckpt`` every ``--ckpt-every`` steps and when SIGTERM or SIGUSR2 arrives: the handler
only sets a flag, all ranks agree on it at the next step boundary, save, and exit cleanly.
``--resume`` continues from ``OUT/ckpt`` (or starts fresh when there is none), with the same
losses an uninterrupted run would have had (bit-identical on the CPU).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import math
import os
import random
import shutil
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

if __package__ in (None, ""):  # run as a script (torchrun launch/train.py): make launch/ importable
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.path.insert(1, str(Path(__file__).resolve().parent.parent))
    from data import IGNORE_INDEX, dataset_problem, make_dataset
else:
    from .data import IGNORE_INDEX, dataset_problem, make_dataset

from ringflash import comm
from ringflash.batch import shard_batch
from ringflash.layout import LAYOUTS, get_layout
from ringflash.models import GPT, GPTConfig

STATE_FILE = "state.pt"  # model, optimizer, step, data position (written by rank 0)
META_FILE = "meta.json"  # the config and step, readable without torch
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR2)


# -- configuration ----------------------------------------------------------------------------


def _f(default, help: str, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    # output
    out: str = _f("runs/train", "directory for metrics.jsonl, loss.png and the checkpoint (ckpt/)")
    # data
    data: str = _f("", "train on this text file (bytes as tokens, vocabulary 256) instead of the recall task")
    recall_pairs: int = _f(0, "key-value pairs per recall sample (0: seq_len // 32, at most 52)")
    seq_len: int = _f(128, "tokens per sequence, the whole sequence (split over the cp ranks)")
    batch_size: int = _f(16, "sequences per step per data-parallel replica")
    # parallelism
    cp_size: int = _f(0, "context-parallel ranks per sequence (0: all ranks); must divide the world size")
    layout: str = _f("striped", "sequence layout over the cp ranks", choices=sorted(LAYOUTS))
    # model
    dim: int = _f(128, "model width")
    layers: int = _f(2, "transformer blocks")
    heads: int = _f(4, "query heads")
    kv_heads: int = _f(2, "key/value heads (GQA when fewer than --heads)")
    rope_base: float = _f(10000.0, "rotary embedding base (raise it for very long sequences)")
    checkpoint_activations: bool = _f(False, "recompute each block in the backward to save memory")
    compile: bool = _f(False, "torch.compile the model as one graph (ring attention is a custom op in it)")
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
        return c


# Fields that must not change when a run resumes: they decide the weights' shapes or the data.
# (--seq-len decides the samples and, with --recall-pairs 0, how many pairs each one holds.)
_RESUME_FIXED = ("dim", "layers", "heads", "kv_heads", "data", "seq_len", "recall_pairs", "seed")


def build_parser() -> argparse.ArgumentParser:
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


def config_problems(cfg: TrainConfig, world_size: int, *, hardware: bool = True) -> list[str]:
    """Every reason ``cfg`` cannot run on ``world_size`` ranks, each saying what to change.

    Deterministic, so every rank reaches the same verdict before any communication.
    ``hardware=False`` skips the checks of this machine's GPUs (a submission host).
    """
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
    cp = cfg.cp_size or world_size
    if cp >= 1 and world_size % cp != 0:
        problems.append(
            f"--cp-size {cp} does not divide the world size {world_size}: the world is "
            f"data-parallel x context-parallel; use a --cp-size among "
            f"{[d for d in range(1, world_size + 1) if world_size % d == 0]}"
        )
    elif cp >= 1 and cfg.seq_len >= 1:
        layout = get_layout(cfg.layout)
        m = layout.multiple(cp) if cp > 1 else 1  # one rank holds the whole sequence: any length
        if cfg.seq_len % m != 0:
            lower, upper = cfg.seq_len // m * m, (cfg.seq_len // m + 1) * m
            problems.append(
                f"--seq-len {cfg.seq_len} cannot be split by the {cfg.layout} layout over {cp} "
                f"context-parallel ranks: it must be a multiple of {m} (e.g. {lower or upper} or {upper})"
            )
    if cfg.heads >= 1 and cfg.kv_heads >= 1:
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
    if cfg.data and cfg.recall_pairs:
        problems.append("--recall-pairs sets up the recall task; with --data the model trains on the file: drop one")
    if cfg.seq_len >= 1:
        problem = dataset_problem(data=cfg.data, seq_len=cfg.seq_len, recall_pairs=cfg.recall_pairs)
        if problem:
            problems.append(problem)
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
    if cfg.resume:
        problems += _resume_problems(cfg)
    return problems


def _resume_problems(cfg: TrainConfig) -> list[str]:
    ckpt = find_checkpoint(Path(cfg.out))
    if ckpt is None:
        return []
    try:
        saved = json.loads((ckpt / META_FILE).read_text())["config"]
    except (OSError, ValueError, KeyError) as e:
        return [f"cannot read the checkpoint in {ckpt} ({e}); remove it or drop --resume"]
    def same(k):
        if k == "data" and saved.get(k) and cfg.data:  # one file, however its path is written
            return Path(saved[k]).resolve() == Path(cfg.data).resolve()
        return saved.get(k) == getattr(cfg, k)

    changed = [f"--{k.replace('_', '-')} {saved.get(k)!r} -> {getattr(cfg, k)!r}" for k in _RESUME_FIXED if not same(k)]
    if changed:
        return [f"--resume from {ckpt} with settings that changed the model or the data: "
                f"{', '.join(changed)}; use the checkpoint's settings or another --out"]
    return []


# -- distributed setup ------------------------------------------------------------------------


@dataclass
class Dist:
    rank: int
    world_size: int
    local_rank: int
    dp_rank: int
    dp_size: int
    cp_rank: int
    cp_size: int
    device: torch.device
    cp_group: object  # the ProcessGroup of this rank's context-parallel ranks


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def world_from_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's variables; a world of one without them."""
    if "RANK" not in os.environ:  # plain `python launch/train.py`: a one-rank world
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))


def setup_distributed(cfg: TrainConfig, rank: int, world_size: int, local_rank: int) -> Dist:
    from torch.distributed.device_mesh import init_device_mesh

    if cfg.device == "cuda":
        # One GPU per rank: GPU local_rank of those this process sees, or its only one where the
        # launcher or Slurm's per-task binding shows each process just its own.
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        # NCCL kernels on high-priority streams start as soon as SMs free up instead of after
        # every block of the attention kernel queued before them (README, "Performance").
        os.environ.setdefault("TORCH_NCCL_HIGH_PRIORITY", "1")
        dist.init_process_group(cfg.dist_backend, timeout=datetime.timedelta(minutes=10))
    cp = cfg.cp_size or world_size
    dp = world_size // cp
    # Row-major (dp, cp) mesh: each cp group is cp consecutive ranks.
    mesh = init_device_mesh(device.type, (dp, cp), mesh_dim_names=("dp", "cp"))
    return Dist(
        rank=rank, world_size=world_size, local_rank=local_rank,
        dp_rank=mesh.get_local_rank("dp"), dp_size=dp,
        cp_rank=mesh.get_local_rank("cp"), cp_size=cp,
        device=device, cp_group=mesh.get_group("cp"),
    )


# -- model and batches ------------------------------------------------------------------------


def build_model(cfg: TrainConfig, group) -> torch.nn.Module:
    comm.TRANSPORT = cfg.transport
    model_cfg = GPTConfig(
        vocab_size=256,
        dim=cfg.dim,
        n_layers=cfg.layers,
        n_heads=cfg.heads,
        n_kv_heads=cfg.kv_heads,
        layout=cfg.layout,
        rope_base=cfg.rope_base,
        checkpoint=cfg.checkpoint_activations,
    )
    return GPT(model_cfg, group=group, backend=cfg.backend)


def shard(tokens: torch.Tensor, labels: torch.Tensor, cfg: TrainConfig, d: Dist):
    """This rank's shard of full sequences ``(B, S)`` -> ``(B, S / cp)``, ids and labels alike.

    The labels are already the next-token targets of the full sequences (launch/data.py).
    """
    ids_local, labels_local, _ = shard_batch(tokens, labels, layout=cfg.layout, group=d.cp_group, shift=False)
    return ids_local, labels_local


def train_step(ddp, tokens: torch.Tensor, labels: torch.Tensor, cfg: TrainConfig, d: Dist, autocast):
    """Forward and backward of this rank's shard of full sequences ``(B, S)``; gradients averaged.

    Returns this rank's logits ``(B, S / cp, 256)``, labels ``(B, S / cp)`` and the loss (the mean
    over the cp group's sequences). After it, every rank's ``.grad`` is the gradient of the mean
    loss over the dp replicas (module docstring).
    """
    ids_local, labels_local = (t.to(d.device, non_blocking=True) for t in shard(tokens, labels, cfg, d))
    with autocast:
        logits_local, loss = ddp(ids_local, labels_local)  # (B, S/cp, 256), scalar
    loss.backward()  # DDP averages over all dp x cp ranks
    return logits_local, labels_local, loss


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Linear warmup, then cosine decay to ``min_lr_ratio * lr`` at ``lr_decay_steps``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.lr_decay_steps - cfg.warmup_steps)
    t = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def build_optimizer(cfg: TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95))


# -- checkpoints ------------------------------------------------------------------------------


def find_checkpoint(out: Path) -> Path | None:
    """The newest complete checkpoint under ``out`` (``ckpt``, or ``ckpt.old`` mid-replacement)."""
    for name in ("ckpt", "ckpt.old"):
        if (out / name / META_FILE).is_file():
            return out / name
    return None


def _rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def save_checkpoint(out: Path, cfg: TrainConfig, d: Dist, model, optimizer, step: int, data_position: int) -> Path:
    """Write ``out/ckpt`` from every rank; the old checkpoint is replaced only once the new one is whole."""
    tmp, final, old = out / "ckpt.tmp", out / "ckpt", out / "ckpt.old"
    if d.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    torch.save(_rng_state(d.device), tmp / f"rng_rank{d.rank}.pt")
    if d.rank == 0:
        torch.save(
            {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
             "data_position": data_position},
            tmp / STATE_FILE,
        )
    dist.barrier()
    if d.rank == 0:
        (tmp / META_FILE).write_text(json.dumps(
            {"step": step, "data_position": data_position, "world_size": d.world_size,
             "config": dataclasses.asdict(cfg)}, indent=1))
        shutil.rmtree(old, ignore_errors=True)
        if final.exists():
            final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def load_checkpoint(ckpt: Path, d: Dist, model, optimizer) -> tuple[int, int]:
    """Restore model, optimizer and this rank's RNG state; return (step, data position)."""
    state = torch.load(ckpt / STATE_FILE, map_location="cpu", weights_only=True)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    meta = json.loads((ckpt / META_FILE).read_text())
    rng = ckpt / f"rng_rank{d.rank}.pt"
    if meta["world_size"] == d.world_size and rng.is_file():
        _set_rng_state(torch.load(rng, map_location="cpu", weights_only=False), d.device)
    elif d.rank == 0:
        print(f"resuming on {d.world_size} ranks from a checkpoint of {meta['world_size']}: "
              "RNG states are not restored", file=sys.stderr)
    return int(state["step"]), int(state["data_position"])


class StopSignals:
    """SIGTERM and SIGUSR2 set a flag; the loop checkpoints at the next step boundary and exits.

    Nothing else happens in the handler: a checkpoint needs every rank, and a signal may reach
    the ranks at different moments.
    """

    def __init__(self):
        self.received: int | None = None
        self.previous: dict = {}

    def _handle(self, signum, frame):
        self.received = signum

    def __enter__(self):
        for s in STOP_SIGNALS:
            self.previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


# -- metrics ----------------------------------------------------------------------------------


def _trim_metrics(path: Path, last_step: int) -> None:
    """Drop records after ``last_step``: a resumed run logs those steps again."""
    if not path.is_file():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= last_step]
    path.write_text("".join(line + "\n" for line in keep))


def plot_loss(metrics: Path, png: Path) -> Path | None:
    """Loss against step from ``metrics.jsonl``; None (with a warning) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no loss plot (pip install matplotlib)", file=sys.stderr)
        return None
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    if not records:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["step"] for r in records], [r["loss"] for r in records])
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per label)")
    ax.set_title(f"{png.parent.name}: training loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return png


class StepTimer:
    """Steps and seconds of training since the last log record (tokens/s, step_s).

    Time spent in :meth:`paused` (a checkpoint) is left out by moving the interval's start
    forward by it: the steps before the pause still count, with the time they took.
    """

    def __init__(self, clock=time.perf_counter):
        self.clock = clock
        self.start, self.steps = clock(), 0

    def step(self) -> None:
        self.steps += 1

    @contextlib.contextmanager
    def paused(self):
        t0 = self.clock()
        try:
            yield
        finally:
            self.start += self.clock() - t0

    def interval(self) -> tuple[int, float]:
        """(steps, seconds) since the last :meth:`restart`."""
        return self.steps, self.clock() - self.start

    def restart(self) -> None:
        self.start, self.steps = self.clock(), 0


# -- training ---------------------------------------------------------------------------------


@dataclass
class TrainResult:
    step: int  # steps done
    finished: bool  # reached --steps
    stop_signal: int | None  # the signal that stopped the run early, if one did
    last_loss: float | None


def fail(rank: int, world_size: int, problems: list[str]) -> None:
    """Every rank prints the same problems and exits with status 2, before any communication."""
    tag = f"[rank {rank}] " if world_size > 1 else ""
    print("\n".join(f"{tag}train.py: error: {p}" for p in problems), file=sys.stderr, flush=True)
    raise SystemExit(2)


def train(cfg: TrainConfig) -> TrainResult:
    rank, world_size, local_rank = world_from_env()
    cfg = cfg.resolved()
    problems = config_problems(cfg, world_size)
    if problems:
        fail(rank, world_size, problems)

    d = setup_distributed(cfg, rank, world_size, local_rank)
    try:
        with StopSignals() as stop:
            return _train(cfg, d, stop)
    finally:
        dist.destroy_process_group()


def _train(cfg: TrainConfig, d: Dist, stop: StopSignals) -> TrainResult:
    out = Path(cfg.out)
    metrics_path = out / "metrics.jsonl"
    if d.rank == 0:
        out.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    dataset = make_dataset(data=cfg.data or None, seq_len=cfg.seq_len, seed=cfg.seed, recall_pairs=cfg.recall_pairs)
    model = build_model(cfg, d.cp_group).to(d.device)
    optimizer = build_optimizer(cfg, model)

    step, data_position = 0, 0
    ckpt = find_checkpoint(out) if cfg.resume else None
    if ckpt is not None:
        step, data_position = load_checkpoint(ckpt, d, model, optimizer)
    if d.rank == 0:
        if ckpt is None and metrics_path.exists() and not cfg.resume:
            metrics_path.unlink()  # a fresh run in an old directory
        _trim_metrics(metrics_path, step)
        n_params = sum(p.numel() for p in model.parameters())
        print(
            f"{'resuming at step ' + str(step) if ckpt else 'training'}: {n_params / 1e6:.2f}M parameters, "
            f"world {d.world_size} = dp {d.dp_size} x cp {d.cp_size} ({cfg.layout}), {cfg.seq_len} tokens "
            f"per sequence ({cfg.seq_len // d.cp_size} per rank), {cfg.batch_size * d.dp_size} sequences "
            f"per step, {d.device.type}/{cfg.dist_backend}/{cfg.backend}/{cfg.dtype}",
            file=sys.stderr, flush=True,
        )

    # Checkpoints hold the plain model's state; DDP wraps the compiled one (same parameters).
    ddp = torch.nn.parallel.DistributedDataParallel(
        torch.compile(model) if cfg.compile else model, device_ids=[d.device.index] if d.device.type == "cuda" else None
    )
    autocast = torch.autocast(d.device.type, dtype=getattr(torch, cfg.dtype), enabled=cfg.dtype != "float32")
    tokens_per_step = cfg.batch_size * d.dp_size * cfg.seq_len
    stop_flag = torch.zeros(1, device=d.device)
    metrics = open(metrics_path, "a") if d.rank == 0 else None
    pbar = None
    if d.rank == 0:
        from tqdm.auto import tqdm

        pbar = tqdm(total=cfg.steps, initial=step, desc="train", unit="step", dynamic_ncols=True, file=sys.stderr)

    def checkpoint():
        path = save_checkpoint(out, cfg, d, model, optimizer, step, data_position)
        if pbar is not None:
            pbar.write(f"step {step}: checkpoint {path}")

    last_loss = None
    timer = StepTimer()
    compiled_said = False
    if d.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(d.device)
    try:
        while step < cfg.steps:
            lr = lr_at(cfg, step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            # Sequences data_position + dp_rank*B ... : full length, labels shifted, then sharded.
            tokens, labels = dataset.batch(data_position + d.dp_rank * cfg.batch_size, cfg.batch_size)
            logits_local, labels_local, loss = train_step(ddp, tokens, labels, cfg, d, autocast)
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            data_position += cfg.batch_size * d.dp_size
            timer.step()
            if cfg.compile and not compiled_said and d.rank == 0:
                # The graphs torch.compile built, once, after the first step: a model that does not
                # compile (a graph break left it eager) says so here.
                from torch._dynamo.utils import counters

                said = f"compiled: {counters['stats']['unique_graphs']} graph(s)"
                if pbar is not None:
                    pbar.write(said)
                else:
                    print(said, file=sys.stderr, flush=True)
                compiled_said = True

            if step % cfg.log_every == 0 or step == cfg.steps or step == 1:
                with torch.no_grad():
                    mask = labels_local != IGNORE_INDEX
                    correct = (logits_local.argmax(-1)[mask] == labels_local[mask]).sum()
                    stats = torch.stack([loss.detach().float(), correct.float(), mask.sum().float()])
                dist.all_reduce(stats)  # loss: the same on every cp rank, so the world mean is the dp mean
                # the copy-engine transport's workspace is outside the caching allocator's peak
                mem = torch.tensor([(torch.cuda.max_memory_allocated(d.device) + comm.workspace_bytes(d.device)) / 2**30
                                    if d.device.type == "cuda" else 0.0], device=d.device)
                dist.all_reduce(mem, op=dist.ReduceOp.MAX)
                steps_interval, elapsed = timer.interval()
                last_loss = stats[0].item() / d.world_size
                record = {
                    "step": step,
                    "loss": last_loss,
                    "acc": stats[1].item() / max(1.0, stats[2].item()),
                    "lr": lr,
                    "tokens_per_s": tokens_per_step * steps_interval / elapsed,
                    "tokens_per_s_per_rank": tokens_per_step * steps_interval / elapsed / d.world_size,
                    "step_s": elapsed / steps_interval,
                }
                if d.device.type == "cuda":
                    record["peak_mem_gib"] = mem.item()
                if metrics is not None:
                    metrics.write(json.dumps(record) + "\n")
                    metrics.flush()
                    pbar.write(
                        f"step {step}: loss {record['loss']:.4f} acc {record['acc']:.3f} lr {lr:.2e} "
                        f"{record['tokens_per_s']:,.0f} tok/s"
                        + (f" peak {record['peak_mem_gib']:.1f} GiB" if "peak_mem_gib" in record else "")
                    )
                timer.restart()
            if pbar is not None:
                pbar.update(1)
                if last_loss is not None:
                    pbar.set_postfix(loss=f"{last_loss:.3f}", refresh=False)

            # A signal may reach the ranks at different moments: agree on it before acting.
            stop_flag.fill_(stop.received or 0)
            dist.all_reduce(stop_flag, op=dist.ReduceOp.MAX)
            if stop_flag.item() > 0:
                checkpoint()
                signum = signal.Signals(int(stop_flag.item()))
                if d.rank == 0:
                    pbar.write(f"step {step}: stopped by {signum.name} after checkpointing; continue with --resume")
                return TrainResult(step, step >= cfg.steps, signum, last_loss)
            if cfg.ckpt_every and step % cfg.ckpt_every == 0 and step < cfg.steps:
                with timer.paused():  # tokens/s measures training, not saving
                    checkpoint()
        checkpoint()
        return TrainResult(step, True, None, last_loss)
    finally:
        if pbar is not None:
            pbar.close()
        if metrics is not None:
            metrics.close()
            if cfg.plot:
                png = plot_loss(metrics_path, out / "loss.png")
                if png is not None:
                    print(f"wrote {metrics_path} and {png}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    train(parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
