"""The ring: send to rank+1 and receive from rank-1 of a process group, asynchronously.

Transfers use ``torch.distributed.batch_isend_irecv``, so on NCCL the send and the receive
of a step are one grouped launch on NCCL's stream and the compute stream waits only where
the received data is used (``Exchange.wait`` makes the current stream wait, it does not
block the host). A world of one rank needs no transfer: the short-circuit returns the
tensor it was given.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["Ring", "Exchange", "resolve_group", "check_group_device"]


def resolve_group(group):
    """A ProcessGroup (or None for the default group) from a ProcessGroup or a 1-D DeviceMesh."""
    try:
        from torch.distributed.device_mesh import DeviceMesh
    except ImportError:  # pragma: no cover - very old torch
        DeviceMesh = ()
    if DeviceMesh and isinstance(group, DeviceMesh):
        if group.ndim != 1:
            raise ValueError(
                f"a DeviceMesh given as the context-parallel group must be 1-D; got a "
                f"{group.ndim}-D mesh {group.mesh_dim_names}: pass mesh['cp'] (one dimension)"
            )
        return group.get_group()
    return group


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_and_rank(group) -> tuple[int, int]:
    """(world size, rank) within ``group``; (1, 0) when torch.distributed is not initialised."""
    if not _distributed():
        if group is not None:
            raise ValueError("a process group was given but torch.distributed is not initialised")
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


def check_group_device(group, device: torch.device) -> None:
    """Raise ``ValueError`` if the group's backend cannot move tensors on ``device``."""
    if not _distributed() or dist.get_world_size(group) == 1:
        return
    backend = str(dist.get_backend(group)).lower()
    if ":" in backend:  # e.g. "cpu:gloo,cuda:nccl"
        served = {part.split(":")[0] for part in backend.split(",")}
    elif backend == "nccl":
        served = {"cuda"}
    elif backend == "gloo":
        served = {"cpu"}
    else:
        return
    if device.type not in served:
        hint = "move the tensors to this rank's GPU" if "cuda" in served else "use a gloo group for CPU tensors"
        raise ValueError(
            f"the process group's backend ({backend}) cannot send {device.type} tensors; {hint} "
            f"(or initialise torch.distributed with a backend for {device.type})"
        )


class Exchange:
    """Pending transfers of one ring step."""

    def __init__(self, works):
        self.works = list(works)

    def wait(self) -> None:
        for w in self.works:
            w.wait()
        self.works = []


class Ring:
    """Point-to-point ring over ``group``: each rank sends to ``rank + 1``, receives from ``rank - 1``."""

    def __init__(self, group=None):
        self.group = resolve_group(group)
        self.world_size, self.rank = world_and_rank(self.group)
        if self.world_size > 1:
            nxt, prv = (self.rank + 1) % self.world_size, (self.rank - 1) % self.world_size
            if self.group is None:
                self.next, self.prev = nxt, prv
            else:
                self.next = dist.get_global_rank(self.group, nxt)
                self.prev = dist.get_global_rank(self.group, prv)

    def exchange(self, send: list[torch.Tensor], recv: list[torch.Tensor]) -> Exchange:
        """Post sends of ``send`` to the next rank and receives into ``recv`` from the previous one.

        The tensors in ``send`` must not be written, nor those in ``recv`` read, before
        ``wait()`` on the returned handle.
        """
        assert self.world_size > 1, "no ring exchange in a world of one rank"
        ops = [dist.P2POp(dist.isend, t, self.next, self.group) for t in send]
        ops += [dist.P2POp(dist.irecv, t, self.prev, self.group) for t in recv]
        return Exchange(dist.batch_isend_irecv(ops))
