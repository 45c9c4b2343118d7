"""Train a small long-context GPT with context parallelism (ringflash) x data parallelism.

On a machine without GPUs (gloo, reference attention), about a minute and a half on 2 cores:

    torchrun --standalone --nproc-per-node 2 launch/train.py --out runs/cpu

Packed documents: a corpus (documents separated by blank lines, or a .jsonl file with a "text"
field per line) packed into sequences with their boundaries, each token attending only inside
its document; ``--no-doc-mask`` trains on the same sequences and targets without it, to compare.
``--task packed-recall`` is a synthetic corpus whose answers need the document mask:

    torchrun --standalone --nproc-per-node 2 launch/train.py --out runs/docs \
        --data corpus.jsonl --seq-len 1024 --batch-size 8 --steps 300
    torchrun --standalone --nproc-per-node 2 launch/train.py --out runs/packed \
        --task packed-recall --seq-len 64 --dim 64 --steps 240   # ~0.01; --no-doc-mask: ~2.1

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

Masks. Attention is causal; ``--window N`` restricts each token to itself and the N tokens
before it (GPTConfig.window). Packed documents (``--data``, ``--task packed-recall``) come with
each row's boundaries (``cu_seqlens``), and with document masking (the default) tokens attend
only inside their document and rotary positions restart at each one. ringflash takes one set of
boundaries per call, the same for every row of the batch, so a batch whose rows differ runs as
micro-steps: one forward and backward per group of rows that share boundaries, each group's
loss weighted by its share of the batch's targets (``train_step``). The loss is still the mean
over every target of the batch and the gradient exactly its gradient. A corpus's rows rarely
share boundaries (a row each); packed-recall's rows share them in blocks of 8. The targets do
not depend on the mask: the last token of every document has none. ``--sparsity`` adds sparse
attention (``hash:BUCKETS``, ``qkdrop:FRACTION``, ``block:PATTERN``: GPTConfig.sparsity,
ringflash.sparse), under Ulysses x ring too. Every metrics record, and the loss plot's title, names the
mask (``causal``, ``causal+documents``, ``causal+window=N``, ``causal+sparsity=hash:8``...).

Checkpoints (model, optimizer, every rank's RNG states, data position, step) go to
``OUT/ckpt`` every ``--ckpt-every`` steps and when SIGTERM or SIGUSR2 arrives: the handler
only sets a flag, all ranks agree on it at the next step boundary, save, and exit cleanly.
``--resume`` continues from ``OUT/ckpt`` (or starts fresh when there is none), with the same
losses an uninterrupted run would have had (bit-identical on the CPU).

The job's other files, one job each (this one is the entry point, one step and the loop):

    config.py      the flags (TrainConfig) and their checks
    mesh.py        process group, device, the dp x cp mesh
    data.py        full-length training sequences (and document boundaries), deterministic from (seed, index)
    model.py       the GPT, its optimizer and learning-rate schedule
    checkpoint.py  save and resume, and the stop signals
    metrics.py     metrics.jsonl, the progress bar, loss.png
"""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

if __package__ in (None, ""):  # run as a script (torchrun launch/train.py): make launch/ importable
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.path.insert(1, str(Path(__file__).resolve().parent.parent))
    from checkpoint import StopSignals, find_checkpoint, load_checkpoint, save_checkpoint
    from config import TrainConfig, config_problems, parse_args, resolve_ulysses
    from data import IGNORE_INDEX, make_dataset
    from mesh import Dist, setup_distributed, world_from_env
    from metrics import RunLog, StepTimer, log_record, trim_metrics
    from model import build_model, build_optimizer, lr_at, shard_model
else:
    from .checkpoint import StopSignals, find_checkpoint, load_checkpoint, save_checkpoint
    from .config import TrainConfig, config_problems, parse_args, resolve_ulysses
    from .data import IGNORE_INDEX, make_dataset
    from .mesh import Dist, setup_distributed, world_from_env
    from .metrics import RunLog, StepTimer, log_record, trim_metrics
    from .model import build_model, build_optimizer, lr_at, shard_model

from ringflash.batch import shard_batch

# -- one step ---------------------------------------------------------------------------------


def shard(tokens: torch.Tensor, labels: torch.Tensor, cfg: TrainConfig, d: Dist, cu_seqlens=None, *,
          check: bool = False):
    """This rank's shard of full sequences ``(B, S)`` -> ``(B, S / cp)``, ids and labels alike, on its device.

    The labels are already the targets of the full sequences (launch/data.py). ``cu_seqlens``:
    the rows' common document boundaries, or None. With ``check`` the cp ranks first compare
    their sequence length and boundaries (one all-gather, on the device so that NCCL carries it).
    """
    ids_local, labels_local, *_ = shard_batch(
        tokens.to(d.device, non_blocking=True), labels.to(d.device, non_blocking=True), layout=cfg.layout,
        group=d.cp_group, shift=False, cu_seqlens=cu_seqlens, check=check,
    )
    return ids_local, labels_local


def row_groups(cu_seqlens: list[tuple[int, ...]] | None, batch_size: int) -> list[tuple[list[int], tuple | None]]:
    """The rows of a batch that share document boundaries, ``[(rows, cu_seqlens)]`` in order of
    first appearance; one group of every row (boundaries None) without them."""
    if cu_seqlens is None:
        return [(list(range(batch_size)), None)]
    groups: dict[tuple, list[int]] = {}
    for row, cu in enumerate(cu_seqlens):
        groups.setdefault(tuple(cu), []).append(row)
    return [(rows, cu) for cu, rows in groups.items()]


@contextlib.contextmanager
def _no_sync(model):
    """No gradient reduction in the block: DDP's ``no_sync``, or FSDP2's gradient-sync switch."""
    if hasattr(model, "no_sync"):
        with model.no_sync():
            yield
        return
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def train_step(ddp, tokens: torch.Tensor, labels: torch.Tensor, cfg: TrainConfig, d: Dist, autocast,
               cu_seqlens: list[tuple[int, ...]] | None = None, *, check: bool = False):
    """Forward and backward of this rank's shard of full sequences ``(B, S)``; gradients averaged.

    ``cu_seqlens``: each row's document boundaries (packed documents), or None. ringflash takes
    one set of boundaries per call, the same for every row, so with document masking the rows
    run in groups that share their boundaries, one forward and backward per group (micro-steps:
    a row each when every row differs; DDP all-reduces after the last). Group ``g``'s loss is
    the mean over its ``n_g`` targets; weighted by ``n_g / N``, the groups' losses add up to the
    mean over all ``N`` targets of the batch and their accumulated gradients to its gradient:
    what one forward of the whole batch would give. Without document masking (``--no-doc-mask``,
    or a source without documents) the batch is one group, one call, as before.
    ``check``: the cp ranks compare their batches' lengths and boundaries first (the first step).

    Returns this rank's logits ``(B, S / cp, 256)``, labels ``(B, S / cp)`` (rows in group order)
    and the loss (the mean over the cp group's sequences). After it, every rank's ``.grad`` is the
    gradient of the mean loss over the dp replicas (module docstring).
    """
    groups = row_groups(cu_seqlens if cfg.doc_mask else None, tokens.shape[0])
    counts = (labels != IGNORE_INDEX).sum(dim=1).tolist()  # targets per row, whole sequences
    total = max(1, sum(counts))
    logits_parts, labels_parts, losses = [], [], []
    for i, (rows, cu) in enumerate(groups):
        if len(groups) > 1:
            index = torch.tensor(rows)
            ids_local, labels_local = shard(tokens[index], labels[index], cfg, d, cu, check=check)
        else:
            ids_local, labels_local = shard(tokens, labels, cfg, d, cu, check=check)
        # Under torch.compile boundaries as a tensor: as Python ints they would specialise the graph.
        kw = {} if cu is None else {"cu_seqlens": torch.tensor(cu) if cfg.compile else cu}
        last = i == len(groups) - 1
        with contextlib.nullcontext() if last else _no_sync(ddp):  # gradients reduced once, after the last
            with autocast:
                logits_local, loss = ddp(ids_local, labels_local, **kw)  # (B_g, S/cp, 256), scalar
            if len(groups) > 1:
                loss = loss * (sum(counts[r] for r in rows) / total)
            loss.backward()
        logits_parts.append(logits_local.detach())
        labels_parts.append(labels_local)
        losses.append(loss.detach())
    if len(groups) == 1:
        return logits_local, labels_local, loss
    return torch.cat(logits_parts), torch.cat(labels_parts), torch.stack(losses).sum()


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
    # One write (print would write the newline apart, and two ranks' lines could interleave).
    sys.stderr.write("".join(f"{tag}train.py: error: {p}\n" for p in problems))
    sys.stderr.flush()
    raise SystemExit(2)


def train(cfg: TrainConfig) -> TrainResult:
    rank, world_size, local_rank = world_from_env()
    cfg = resolve_ulysses(cfg.resolved(), world_size, int(os.environ.get("LOCAL_WORLD_SIZE", world_size)))
    problems = config_problems(cfg, world_size)
    if problems:
        fail(rank, world_size, problems)
    try:  # every rank reads the same file: the same verdict, before any communication
        dataset = make_dataset(data=cfg.data or None, seq_len=cfg.seq_len, seed=cfg.seed,
                               recall_pairs=cfg.recall_pairs, task=cfg.task)
    except ValueError as e:
        fail(rank, world_size, [str(e)])

    d = setup_distributed(cfg, rank, world_size, local_rank)
    try:
        with StopSignals() as stop:
            return _train(cfg, d, stop, dataset)
    finally:
        dist.destroy_process_group()


def _train(cfg: TrainConfig, d: Dist, stop: StopSignals, dataset=None) -> TrainResult:
    out = Path(cfg.out)
    metrics_path = out / "metrics.jsonl"
    if d.rank == 0:
        out.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    if dataset is None:
        dataset = make_dataset(data=cfg.data or None, seq_len=cfg.seq_len, seed=cfg.seed,
                               recall_pairs=cfg.recall_pairs, task=cfg.task)
    model = build_model(cfg, d.cp_group).to(d.device)
    if cfg.fsdp:
        shard_model(model, d.device, compile=cfg.compile)
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
            f"world {d.world_size} = dp {d.dp_size} x cp {d.cp_size} ({cfg.layout}"
            f"{f', ring {d.cp_size // cfg.ulysses_size} x ulysses {cfg.ulysses_size}' if cfg.ulysses_size > 1 else ''}), "
            f"{cfg.seq_len} tokens "
            f"per sequence ({cfg.seq_len // d.cp_size} per rank), {cfg.batch_size * d.dp_size} sequences "
            f"per step, {d.device.type}/{cfg.dist_backend}/{cfg.backend}/{cfg.dtype}, attention {cfg.mask}",
            file=sys.stderr, flush=True,
        )

    # Checkpoints hold the plain model's state; DDP wraps the compiled one (same parameters).
    # Under --fsdp the sharded model itself reduces its gradients.
    ddp = model if cfg.fsdp else torch.nn.parallel.DistributedDataParallel(
        torch.compile(model) if cfg.compile else model, device_ids=[d.device.index] if d.device.type == "cuda" else None
    )
    autocast = torch.autocast(d.device.type, dtype=getattr(torch, cfg.dtype), enabled=cfg.dtype != "float32")
    tokens_per_step = cfg.batch_size * d.dp_size * cfg.seq_len
    log = RunLog(metrics_path, enabled=d.rank == 0, steps=cfg.steps, step=step)

    def checkpoint():
        path = save_checkpoint(out, cfg, d, model, optimizer, step, data_position)
        log.say(f"step {step}: checkpoint {path}")

    last_loss = None
    first_step = step
    timer = StepTimer()
    compiled_said = False
    if d.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(d.device)
    try:
        while step < cfg.steps:
            lr = lr_at(cfg, step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            # Sequences data_position + dp_rank*B ... : full length, targets in place, then sharded.
            tokens, labels, cu_seqlens = dataset.batch(data_position + d.dp_rank * cfg.batch_size, cfg.batch_size)
            # The cp ranks compare their batches once (lengths, boundaries): a data file that
            # differs between nodes would otherwise give silently wrong attention.
            logits_local, labels_local, loss = train_step(ddp, tokens, labels, cfg, d, autocast, cu_seqlens,
                                                          check=step == first_step)
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
                                    d=d, timer=timer, tokens_per_step=tokens_per_step, mask=cfg.mask)
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
