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

The job's other files, one job each (this one is the entry point, one step and the loop):

    config.py      the flags (TrainConfig) and their checks
    mesh.py        process group, device, the dp x cp mesh
    data.py        full-length training sequences, deterministic from (seed, index)
    model.py       the GPT, its optimizer and learning-rate schedule
    checkpoint.py  save and resume, and the stop signals
    metrics.py     metrics.jsonl, the progress bar, loss.png
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

if __package__ in (None, ""):  # run as a script (torchrun launch/train.py): make launch/ importable
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.path.insert(1, str(Path(__file__).resolve().parent.parent))
    from checkpoint import StopSignals, find_checkpoint, load_checkpoint, save_checkpoint
    from config import TrainConfig, config_problems, parse_args
    from data import make_dataset
    from mesh import Dist, setup_distributed, world_from_env
    from metrics import RunLog, StepTimer, log_record, trim_metrics
    from model import build_model, build_optimizer, lr_at
else:
    from .checkpoint import StopSignals, find_checkpoint, load_checkpoint, save_checkpoint
    from .config import TrainConfig, config_problems, parse_args
    from .data import make_dataset
    from .mesh import Dist, setup_distributed, world_from_env
    from .metrics import RunLog, StepTimer, log_record, trim_metrics
    from .model import build_model, build_optimizer, lr_at

from ringflash.batch import shard_batch

# -- one step ---------------------------------------------------------------------------------


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
        trim_metrics(metrics_path, step)
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
    log = RunLog(metrics_path, enabled=d.rank == 0, steps=cfg.steps, step=step)

    def checkpoint():
        path = save_checkpoint(out, cfg, d, model, optimizer, step, data_position)
        log.say(f"step {step}: checkpoint {path}")

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

                log.say(f"compiled: {counters['stats']['unique_graphs']} graph(s)")
                compiled_said = True

            if step % cfg.log_every == 0 or step == cfg.steps or step == 1:
                record = log_record(step=step, lr=lr, loss=loss, logits_local=logits_local, labels_local=labels_local,
                                    d=d, timer=timer, tokens_per_step=tokens_per_step)
                last_loss = record["loss"]
                log.write(record)
                timer.restart()
            log.advance(last_loss)

            signum = stop.agreed(d.device)
            if signum is not None:
                checkpoint()
                log.say(f"step {step}: stopped by {signum.name} after checkpointing; continue with --resume")
                return TrainResult(step, step >= cfg.steps, signum, last_loss)
            if cfg.ckpt_every and step % cfg.ckpt_every == 0 and step < cfg.steps:
                with timer.paused():  # tokens/s measures training, not saving
                    checkpoint()
        checkpoint()
        return TrainResult(step, True, None, last_loss)
    finally:
        log.close(plot=cfg.plot)


def main(argv: list[str] | None = None) -> int:
    train(parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
