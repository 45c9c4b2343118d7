"""The training job's ranks: the process group, this rank's device, and the dp x cp mesh.

The world of ``dp x cp`` ranks is a row-major 2-D device mesh: each context-parallel group is
``cp`` consecutive ranks (on one node when ``cp`` divides the GPUs per node, where the ring's
point-to-point traffic stays on NVLink), and each data-parallel group takes one rank of every
cp group. With ``--ulysses-size U`` the cp dimension is itself (ring, ulysses): groups of ``U``
consecutive ranks exchange heads for tokens with an all-to-all and the ring runs across them (a
:class:`ringflash.HybridGroup`). :class:`Dist` is what the rest of the job needs to know about it.
"""

from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from ringflash import HybridGroup

if TYPE_CHECKING:  # annotations only (launch/ on sys.path)
    from config import TrainConfig

__all__ = ["Dist", "setup_distributed", "world_from_env"]


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
    cp_group: object  # this rank's context-parallel ranks: a ProcessGroup, or a HybridGroup (--ulysses-size)


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
    if cfg.ulysses_size > 1:
        # Row-major (dp, ring, ulysses) mesh: each Ulysses group is ulysses_size consecutive
        # ranks (a node's GPUs, for the all-to-all), each cp group ring x ulysses of them.
        u = cfg.ulysses_size
        mesh = init_device_mesh(device.type, (dp, cp // u, u), mesh_dim_names=("dp", "ring", "ulysses"))
        cp_group = HybridGroup.from_mesh(mesh["ring", "ulysses"], chunks=cfg.ulysses_chunks)
        cp_rank = cp_group.rank
    else:
        # Row-major (dp, cp) mesh: each cp group is cp consecutive ranks.
        mesh = init_device_mesh(device.type, (dp, cp), mesh_dim_names=("dp", "cp"))
        cp_group, cp_rank = mesh.get_group("cp"), mesh.get_local_rank("cp")
    return Dist(
        rank=rank, world_size=world_size, local_rank=local_rank,
        dp_rank=mesh.get_local_rank("dp"), dp_size=dp,
        cp_rank=cp_rank, cp_size=cp,
        device=device, cp_group=cp_group,
    )
