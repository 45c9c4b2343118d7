"""What a training run reports: metrics records, the progress bar and its lines, the loss plot.

Every ``--log-every`` steps all ranks measure the step together (:func:`log_record`: loss,
accuracy, learning rate, throughput, peak GPU memory) and rank 0 appends the record to
``OUT/metrics.jsonl`` and prints a line (:class:`RunLog`). The records are the run's outputs
that tests and plots read: one JSON object per line, keyed by ``step``; a resumed run first
drops the records after its checkpoint's step (:func:`trim_metrics`) and logs those steps again.
At the end rank 0 draws ``OUT/loss.png`` from them (:func:`plot_loss`), the attention mask in
its title.

Lines go to stdout above the bar (``tqdm.write``); the bar and the start-up line go to stderr.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

if __package__:  # imported as launch.metrics
    from .data import IGNORE_INDEX
else:  # launch/ is on sys.path (launch/train.py run as a script, the tests)
    from data import IGNORE_INDEX

from ringflash import comm

if TYPE_CHECKING:  # annotations only
    from mesh import Dist

__all__ = ["RunLog", "StepTimer", "log_record", "plot_loss", "plot_title", "trim_metrics"]


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


def log_record(*, step: int, lr: float, loss: torch.Tensor, logits_local: torch.Tensor,
               labels_local: torch.Tensor, d: Dist, timer: StepTimer, tokens_per_step: int,
               mask: str = "causal") -> dict:
    """The metrics record of ``step``, the same on every rank; every rank calls it (all-reduces).

    ``logits_local`` ``(B, S / cp, 256)`` and ``labels_local`` ``(B, S / cp)`` are this rank's
    shard of the step's batch; ``loss`` its whole-sequence loss (the same on every cp rank);
    ``mask`` the attention mask's name (``TrainConfig.mask``: ``causal``, ``causal+documents``,
    ``causal+window=N``, ...), kept in every record so that runs under different masks can be
    told apart and compared.
    """
    with torch.no_grad():
        targets = labels_local != IGNORE_INDEX
        correct = (logits_local.argmax(-1)[targets] == labels_local[targets]).sum()
        stats = torch.stack([loss.detach().float(), correct.float(), targets.sum().float()])
    dist.all_reduce(stats)  # loss: the same on every cp rank, so the world mean is the dp mean
    # the copy-engine transport's workspace is outside the caching allocator's peak
    mem = torch.tensor([(torch.cuda.max_memory_allocated(d.device) + comm.workspace_bytes(d.device)) / 2**30
                        if d.device.type == "cuda" else 0.0], device=d.device)
    dist.all_reduce(mem, op=dist.ReduceOp.MAX)
    steps_interval, elapsed = timer.interval()
    record = {
        "step": step,
        "loss": stats[0].item() / d.world_size,
        "acc": stats[1].item() / max(1.0, stats[2].item()),
        "lr": lr,
        "tokens_per_s": tokens_per_step * steps_interval / elapsed,
        "tokens_per_s_per_rank": tokens_per_step * steps_interval / elapsed / d.world_size,
        "step_s": elapsed / steps_interval,
        "mask": mask,
    }
    if d.device.type == "cuda":
        record["peak_mem_gib"] = mem.item()
    return record


class RunLog:
    """Rank 0's outputs: ``metrics.jsonl``, the progress bar, and lines printed above it.

    On the other ranks (``enabled=False``) every method does nothing.
    """

    def __init__(self, path: Path, *, enabled: bool, steps: int, step: int):
        self.path = path
        self.file = open(path, "a") if enabled else None
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=steps, initial=step, desc="train", unit="step", dynamic_ncols=True, file=sys.stderr)

    def say(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line)

    def write(self, record: dict) -> None:
        """Append ``record`` to metrics.jsonl (flushed: a killed run keeps it) and print its line."""
        if self.file is None:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        self.say(
            f"step {record['step']}: loss {record['loss']:.4f} acc {record['acc']:.3f} lr {record['lr']:.2e} "
            f"{record['tokens_per_s']:,.0f} tok/s"
            + (f" peak {record['peak_mem_gib']:.1f} GiB" if "peak_mem_gib" in record else "")
        )

    def advance(self, last_loss: float | None) -> None:
        """One step done; the bar shows the last logged loss."""
        if self.bar is not None:
            self.bar.update(1)
            if last_loss is not None:
                self.bar.set_postfix(loss=f"{last_loss:.3f}", refresh=False)

    def close(self, *, plot: bool) -> None:
        """Close the bar and the file; with ``plot``, draw loss.png next to metrics.jsonl."""
        if self.bar is not None:
            self.bar.close()
        if self.file is not None:
            self.file.close()
            if plot:
                png = plot_loss(self.path, self.path.parent / "loss.png")
                if png is not None:
                    print(f"wrote {self.path} and {png}", file=sys.stderr)


def trim_metrics(path: Path, last_step: int) -> None:
    """Drop records after ``last_step``: a resumed run logs those steps again."""
    if not path.is_file():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= last_step]
    path.write_text("".join(line + "\n" for line in keep))


def plot_title(name: str, records: list[dict]) -> str:
    """The loss plot's title: the run's name and its attention mask(s) (a resumed run may change
    it; records from before the ``mask`` field were causal)."""
    masks = list(dict.fromkeys(r.get("mask", "causal") for r in records))
    return f"{name}: training loss ({', '.join(masks)})"


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
    ax.set_title(plot_title(png.parent.name, records))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return png
