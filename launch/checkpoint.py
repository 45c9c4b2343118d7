"""Checkpoints of a training run, and the signals that ask for one before the job is stopped.

A checkpoint is the directory ``OUT/ckpt``:

* ``state.pt``: model, optimizer, step and data position, and the attention layers' counts of
  ``--sparsity qkdrop`` draws (written by rank 0);
* ``rng_rank{r}.pt``: every rank's RNG states (so a resumed run draws what it would have);
* ``meta.json``: the config, step and world size, readable without torch.

It is written as ``OUT/ckpt.tmp`` and renamed only once whole; the previous one waits as
``OUT/ckpt.old`` meanwhile, so a job killed mid-save still leaves a complete checkpoint
(:func:`find_checkpoint` takes either). A run that resumes from it has the same losses an
uninterrupted run would have had (bit-identical on the CPU).

SIGTERM (scancel, preemption, torchrun stopping its ranks) and SIGUSR2 (Slurm's warning before
the time limit) only set a flag (:class:`StopSignals`): the ranks agree on it at the next step
boundary, checkpoint together, and exit cleanly.
"""

from __future__ import annotations

import dataclasses
import json
import random
import shutil
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

if TYPE_CHECKING:  # annotations only (launch/ on sys.path)
    from config import TrainConfig
    from mesh import Dist

__all__ = ["STATE_FILE", "META_FILE", "STOP_SIGNALS", "StopSignals", "find_checkpoint",
           "load_checkpoint", "save_checkpoint"]

STATE_FILE = "state.pt"  # model, optimizer, step, data position (written by rank 0)
META_FILE = "meta.json"  # the config and step, readable without torch
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR2)


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
    model_state, optim_state = _full_state(model, optimizer)  # a collective under FSDP
    if d.rank == 0:
        torch.save(
            {"model": model_state, "optimizer": optim_state, "step": step, "data_position": data_position,
             "sparsity_draws": _draw_counts(model)},
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


def _sharded(model) -> bool:
    """Whether ``model`` holds FSDP2-sharded parameters (DTensors)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def _full_state(model, optimizer) -> tuple[dict, dict]:
    """The whole model and optimizer state, as one process would hold it (rank 0; others may get
    empty dicts). Under FSDP the shards are gathered, with the optimizer state in the plain
    optimizer's layout, so checkpoints of ``--fsdp`` and DDP runs are the same files."""
    if not _sharded(model):
        return model.state_dict(), optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state, optim_state = get_state_dict(model, optimizer, options=opts)
    return model_state, _to_param_ids(optim_state, model, optimizer)


def _param_names(model, optimizer) -> list[str]:
    """The name of every parameter in the order the plain optimizer numbers them (its groups)."""
    name = {id(p): n for n, p in model.named_parameters()}
    return [name[id(p)] for g in optimizer.param_groups for p in g["params"]]


def _to_param_ids(optim_state: dict, model, optimizer) -> dict:
    """Distributed checkpoint's optimizer state (keyed by parameter names) keyed as the plain
    optimizer keys it (by the parameters' numbers in its groups)."""
    if not optim_state:
        return optim_state
    index = {n: i for i, n in enumerate(_param_names(model, optimizer))}
    groups = [dict(g, params=[index[n] for n in g["params"]]) for g in optim_state["param_groups"]]
    return {"state": {index[n]: v for n, v in optim_state["state"].items()}, "param_groups": groups}


def _to_param_names(optim_state: dict, model, optimizer) -> dict:
    """The inverse of :func:`_to_param_ids`."""
    names = _param_names(model, optimizer)
    groups = [dict(g, params=[names[i] for i in g["params"]]) for g in optim_state["param_groups"]]
    return {"state": {names[i]: v for i, v in optim_state["state"].items()}, "param_groups": groups}


def _draw_counts(model) -> dict[str, int]:
    """Each attention layer's count of --sparsity qkdrop draws so far (a module attribute, not in
    the state dict): its next training forward draws keep flags from the count, so a resumed run
    must continue it to draw what an uninterrupted run would have."""
    return {name: m._draws for name, m in model.named_modules() if isinstance(getattr(m, "_draws", None), int)}


def _set_draw_counts(model, counts: dict[str, int]) -> None:
    """Restore :func:`_draw_counts` (layers absent from an older checkpoint keep theirs)."""
    for name, m in model.named_modules():
        if name in counts and isinstance(getattr(m, "_draws", None), int):
            m._draws = int(counts[name])


def load_checkpoint(ckpt: Path, d: Dist, model, optimizer) -> tuple[int, int]:
    """Restore model, optimizer, the draw counts and this rank's RNG state; return (step, data position)."""
    state = torch.load(ckpt / STATE_FILE, map_location="cpu", weights_only=True)
    if _sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        set_state_dict(model, optimizer, model_state_dict=state["model"],
                       optim_state_dict=_to_param_names(state["optimizer"], model, optimizer),
                       options=StateDictOptions(full_state_dict=True))
    else:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
    _set_draw_counts(model, state.get("sparsity_draws", {}))
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
        self._flag: torch.Tensor | None = None  # kept for agreed()'s all-reduce

    def _handle(self, signum, frame):
        self.received = signum

    def __enter__(self):
        for s in STOP_SIGNALS:
            self.previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def agreed(self, device: torch.device) -> signal.Signals | None:
        """The signal that any rank received, or None: the same answer on every rank.

        A collective (every rank calls it at the same step boundary): a signal may reach the
        ranks at different moments, and they must agree on it before acting.
        """
        if self._flag is None:
            self._flag = torch.zeros(1, device=device)
        self._flag.fill_(self.received or 0)
        dist.all_reduce(self._flag, op=dist.ReduceOp.MAX)
        return signal.Signals(int(self._flag.item())) if self._flag.item() > 0 else None
