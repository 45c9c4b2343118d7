"""The ring: send to rank+1 and receive from rank-1 of a process group, asynchronously.

Two transports, chosen by :data:`TRANSPORT` (or the ``RINGFLASH_TRANSPORT`` environment variable):

``"nccl"`` (default)
    ``torch.distributed.batch_isend_irecv``: on NCCL the send and the receive of a step are one
    grouped launch on NCCL's stream, and the compute stream waits only where the received data
    is used (``Exchange.wait`` makes the current stream wait, it does not block the host). Works
    with any backend and across nodes. NCCL's kernels take SMs from the attention kernels they
    run beside.

``"copy_engine"``
    GPUs of one node only (NVLink or PCIe peer access). Each rank writes its message straight
    into the next rank's receive buffer with the GPU's copy engine (``cudaMemcpyAsync`` through
    PyTorch's symmetric memory), so no SM is spent moving bytes. Flags in the symmetric signal
    pads say when a receive buffer is free and when a message has landed (see
    :data:`COPY_ENGINE_SIGNALS` for how they are written and awaited). Receive buffers live in a
    per-group workspace that is allocated once, grown to the largest call, and kept: it costs
    that much GPU memory for the life of the process (``free_workspaces()`` releases it).

A world of one rank needs no transfer.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

__all__ = ["Ring", "CopyEngineRing", "Exchange", "make_ring", "resolve_group", "check_group_device",
           "TRANSPORTS", "free_workspaces", "workspace_bytes", "HybridGroup", "all_gather_tensor",
           "all_reduce_sum"]

TRANSPORTS = ("nccl", "copy_engine")
# How ring transfers move (see the module docstring); read at every ring call.
TRANSPORT = os.environ.get("RINGFLASH_TRANSPORT", "nccl")
# The copy-engine transport's signal kernels stop the process with a device-side error after
# waiting this long for a peer (one that died, or that never reached the same ring call),
# instead of hanging; raise it for jobs in which ranks stall longer (a slow checkpoint).
COPY_ENGINE_TIMEOUT_S = float(os.environ.get("RINGFLASH_COPY_ENGINE_TIMEOUT_S", 1800))
# How the copy-engine transport's sender waits for "buffer free" and says "message landed":
# "stream": CUDA stream memory operations (cuStreamWaitValue32 / cuStreamWriteValue32), which
#   take no SM, so a transfer starts on time even beside kernels that fill every SM;
# "kernel": one-thread signal kernels, which need an SM slot to start.
# Either way the receiver waits for "landed" with a signal kernel that times out (above).
COPY_ENGINE_SIGNALS = os.environ.get("RINGFLASH_COPY_ENGINE_SIGNALS", "kernel")


class HybridGroup:
    """A two-level context-parallel group: Ulysses (all-to-all over heads) inside, a ring outside.

    ``ring`` and ``ulysses`` are process groups (or 1-D DeviceMeshes) that split the ``R * U``
    ranks sharing one sequence into ``R`` ring positions of ``U`` Ulysses ranks each, typically
    a node's GPUs: ``HybridGroup.from_mesh(mesh["ring", "ulysses"])``. This rank's place in the
    whole context-parallel group is ``rank = r * U + u`` (``r``: its rank in ``ring``; ``u``: in
    ``ulysses``), and a layout cuts the sequence over those ``R * U`` ranks as it would over a
    plain group of that size, so :func:`ringflash.shard_batch`, the modules and the models take
    a ``HybridGroup`` wherever they take a group. Attention gathers the ``U`` shards of a
    Ulysses group for ``1/U`` of the heads (one all-to-all), runs the ring over ``ring`` on
    those ``U``-times longer shards, and scatters the result back (one all-to-all).

    Args:
        ring: the ranks with the same Ulysses rank, one per ring position (across nodes).
        ulysses: the ranks of this ring position (inside a node).
        chunks: split each rank's heads into this many chunks and pipeline them: the
            all-to-all of chunk ``i + 1`` (on the Ulysses group) runs while the ring (on the
            ring group) computes chunk ``i``, and the result of chunk ``i`` travels back while
            chunk ``i + 1`` is computed; the backward likewise. An upper bound: a call uses the
            largest count that divides both its query and K/V heads per rank (1: no pipeline,
            one all-to-all each way).

    Raises:
        ValueError: a mesh of more than one dimension; this rank outside either group;
            torch.distributed not initialised; ``chunks`` not an int of at least 1.
    """

    def __init__(self, ring, ulysses, *, chunks: int = 1):
        if not _distributed():
            raise ValueError("a HybridGroup needs an initialised torch.distributed process group")
        if isinstance(chunks, bool) or not isinstance(chunks, int) or chunks < 1:
            raise ValueError(f"chunks must be an int >= 1 (1: no pipelining of the heads); got {chunks!r}")
        self.ring = resolve_group(ring)
        self.ulysses = resolve_group(ulysses)
        self.ring_size, self.ring_rank = world_and_rank(self.ring)
        self.ulysses_size, self.ulysses_rank = world_and_rank(self.ulysses)
        self.chunks = chunks

    @classmethod
    def from_mesh(cls, mesh, *, chunks: int = 1) -> "HybridGroup":
        """From a 2-D DeviceMesh whose dimensions are (ring, ulysses), e.g. ``mesh["ring", "ulysses"]``."""
        if getattr(mesh, "ndim", None) != 2:
            raise ValueError(
                f"HybridGroup.from_mesh takes a 2-D DeviceMesh (ring, ulysses); got "
                f"{getattr(mesh, 'ndim', type(mesh).__name__)} dimensions"
            )
        return cls(mesh.get_group(0), mesh.get_group(1), chunks=chunks)

    @property
    def size(self) -> int:
        """The number of ranks sharing one sequence, ``R * U``."""
        return self.ring_size * self.ulysses_size

    @property
    def rank(self) -> int:
        """This rank's place among them, ``r * U + u``."""
        return self.ring_rank * self.ulysses_size + self.ulysses_rank

    def __repr__(self) -> str:
        chunks = f", chunks={self.chunks}" if self.chunks > 1 else ""
        return f"HybridGroup(ring={self.ring_size}, ulysses={self.ulysses_size}{chunks})"


def all_gather_tensor(t: torch.Tensor, group) -> torch.Tensor:
    """Every rank's ``t``, stacked in the group's rank order (dim 0), on ``t``'s device.

    ``group`` is a ProcessGroup, None, or a :class:`HybridGroup` (gathered over its Ulysses
    group, then its ring: rank ``r * U + u`` lands at index ``r * U + u``). A CPU tensor in an
    NCCL group travels through this rank's GPU.
    """
    if isinstance(group, HybridGroup):
        inner = all_gather_tensor(t, group.ulysses)  # (U, ...)
        return all_gather_tensor(inner, group.ring).flatten(0, 1)  # (R, U, ...) -> (R * U, ...)
    world_size, _ = world_and_rank(group)
    if world_size == 1:
        return t.unsqueeze(0)
    moved = _collective_device(t, group)
    every = [torch.empty_like(moved) for _ in range(world_size)]
    dist.all_gather(every, moved.contiguous(), group=group)
    return torch.stack(every).to(t.device)


def all_reduce_sum(t: torch.Tensor, group, *, inplace: bool = False) -> torch.Tensor:
    """The sum of ``t`` over ``group`` (a ProcessGroup, None or a :class:`HybridGroup`)."""
    if not inplace:
        t = t.clone()
    for g in (group.ulysses, group.ring) if isinstance(group, HybridGroup) else (group,):
        if world_and_rank(g)[0] > 1:
            dist.all_reduce(t, group=g)
    return t


def _collective_device(t: torch.Tensor, group) -> torch.Tensor:
    if t.device.type == "cpu" and "gloo" not in str(dist.get_backend(group)).lower() and torch.cuda.is_available():
        return t.to(torch.device("cuda", torch.cuda.current_device()))  # an NCCL group moves CUDA tensors only
    return t


def resolve_group(group):
    """A ProcessGroup (or None for the default group) from a ProcessGroup or a 1-D DeviceMesh.

    A :class:`HybridGroup` is returned as it is. Raises ``ValueError`` if this rank is not a
    member of the group (see :func:`_check_member`).
    """
    if isinstance(group, HybridGroup):
        return group
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
        group = group.get_group()
    _check_member(group)
    return group


def _check_member(group) -> None:
    """Raise ``ValueError`` if this rank is not a member of ``group`` (a resolved ProcessGroup or None).

    ``torch.distributed.new_group`` must be called on every rank, and hands the ranks outside
    its ``ranks`` a placeholder (``GroupMember.NON_GROUP_MEMBER``) instead of a group: such a
    rank has no place in the group's ring or all-reduce. Local: no communication.
    """
    if group is None or not _distributed():
        return
    if dist.get_rank(group) < 0:  # -1 for a non-member, from the local group table
        raise ValueError(
            f"this rank (global rank {dist.get_rank()}) is not a member of the process group passed "
            f"as group= (torch.distributed.new_group(ranks) gives ranks outside `ranks` a placeholder "
            f"instead of a group); pass the group this rank belongs to, e.g. the cp sub-group of its "
            f"mesh (mesh['cp'])"
        )


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_and_rank(group) -> tuple[int, int]:
    """(world size, rank) within ``group``; (1, 0) when torch.distributed is not initialised.

    Raises ``ValueError`` if this rank is not a member of ``group`` (see :func:`_check_member`).
    """
    if isinstance(group, HybridGroup):
        return group.size, group.rank
    if not _distributed():
        if group is not None:
            raise ValueError("a process group was given but torch.distributed is not initialised")
        return 1, 0
    _check_member(group)
    return dist.get_world_size(group), dist.get_rank(group)


def check_group_device(group, device: torch.device) -> None:
    """Raise ``ValueError`` if the group's backend cannot move tensors on ``device``."""
    if isinstance(group, HybridGroup):
        check_group_device(group.ring, device)
        check_group_device(group.ulysses, device)
        return
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

    def empty(self, shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A buffer that ``exchange`` may receive into."""
        return torch.empty(shape, dtype=dtype, device=device)

    def owns(self, t: torch.Tensor) -> bool:
        """Whether ``t`` is one of the ring's own buffers (reused by the next call)."""
        return False

    # Whether exchange() takes hops > 1 (a message straight to a rank further along the ring).
    any_hop = True

    def exchange(self, send: list[torch.Tensor], recv: list[torch.Tensor], hops: int = 1) -> Exchange:
        """Post sends of ``send`` to the next rank and receives into ``recv`` from the previous one
        (with ``hops``: to rank ``+ hops`` and from rank ``- hops``, modulo the world size).

        The tensors in ``send`` must not be written, nor those in ``recv`` read, before
        ``wait()`` on the returned handle. Every rank makes the same calls in the same order,
        with the same shapes.
        """
        assert self.world_size > 1, "no ring exchange in a world of one rank"
        dst, src = self.next, self.prev
        if hops % self.world_size != 1:
            dst, src = self._peer(self.rank + hops), self._peer(self.rank - hops)
        ops = [dist.P2POp(dist.isend, t, dst, self.group) for t in send]
        ops += [dist.P2POp(dist.irecv, t, src, self.group) for t in recv]
        return Exchange(dist.batch_isend_irecv(ops))

    def _peer(self, group_rank: int) -> int:
        """The rank to address for ``group_rank`` (modulo the world size) of this ring's group."""
        group_rank %= self.world_size
        return group_rank if self.group is None else dist.get_global_rank(self.group, group_rank)


def check_transport(transport: str, group, device: torch.device) -> None:
    """Raise ``ValueError`` if ``transport`` cannot serve ``group`` on ``device`` (local checks)."""
    if transport not in TRANSPORTS:
        raise ValueError(f"unknown ring transport {transport!r}; choose one of {TRANSPORTS}")
    if transport == "copy_engine" and COPY_ENGINE_SIGNALS not in ("stream", "kernel"):
        raise ValueError(
            f"ringflash.comm.COPY_ENGINE_SIGNALS (RINGFLASH_COPY_ENGINE_SIGNALS) must be 'stream' or "
            f"'kernel'; got {COPY_ENGINE_SIGNALS!r}"
        )
    if transport == "copy_engine" and _distributed() and dist.get_world_size(group) > 1:
        # Launchers (torchrun, Slurm) number the ranks of a node consecutively.
        ranks = dist.get_process_group_ranks(group) if group is not None else list(range(dist.get_world_size()))
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE", dist.get_world_size()))
        nodes = sorted({g // per_node for g in ranks})
        if len(nodes) > 1:
            raise ValueError(
                f"the copy_engine transport needs every rank of the group on one node; global ranks "
                f"{ranks} span {len(nodes)} nodes of {per_node} ranks (LOCAL_WORLD_SIZE); use the "
                f"nccl transport across nodes (ringflash.comm.TRANSPORT = 'nccl')"
            )
        if device.type != "cuda":
            raise ValueError(
                f"the copy_engine transport moves CUDA tensors between GPUs of one node; got "
                f"{device.type} tensors (use the nccl transport, ringflash.comm.TRANSPORT = 'nccl')"
            )
        # Symmetric memory maps every rank's GPU into every process of the group by device
        # index: a process that sees fewer GPUs than the group has ranks (CUDA_VISIBLE_DEVICES
        # set per process, as Slurm's per-task GPU binding does) cannot map them.
        visible = torch.cuda.device_count()
        if visible < len(ranks):
            raise ValueError(
                f"the copy_engine transport needs every process to see all GPUs of its group: this "
                f"process sees {visible} GPU(s) for a group of {len(ranks)} ranks (CUDA_VISIBLE_DEVICES="
                f"{os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')}); launch with all of the node's GPUs "
                f"visible to each process (torchrun does) or use the nccl transport "
                f"(ringflash.comm.TRANSPORT = 'nccl')"
            )


def make_ring(group, device: torch.device, recv_bytes: int = 0) -> Ring:
    """The ring of ``group`` over the transport :data:`TRANSPORT`; ``recv_bytes``: an upper
    bound on the bytes of receive buffers (``Ring.empty``) this call will hold at once."""
    if TRANSPORT == "copy_engine" and world_and_rank(resolve_group(group))[0] > 1:
        return CopyEngineRing(group, device, recv_bytes)
    return Ring(group)


# -- copy-engine transport -------------------------------------------------------------------

_ALIGN = 256  # bytes; every receive buffer starts on this boundary
_WORKSPACES: dict = {}  # (group name, device index) -> _Workspace
_COPY_STREAMS: dict = {}  # device index -> side stream of the copies


def free_workspaces() -> None:
    """Release the copy-engine transport's receive workspaces (they are made again on demand).
    Call it on every rank, with no ring call in flight."""
    if _WORKSPACES:
        torch.cuda.synchronize()
    _WORKSPACES.clear()


def workspace_bytes(device: torch.device | int | None = None) -> int:
    """Bytes held by this process's copy-engine receive workspaces (on ``device``, or on every
    device). PyTorch's symmetric memory is outside the caching allocator: add this to
    ``torch.cuda.max_memory_allocated`` for the peak memory of a run over that transport."""
    index = torch.device(device).index if isinstance(device, (str, torch.device)) else device
    return sum(w.buf.numel() for (_, dev), w in _WORKSPACES.items() if index is None or dev == index)


class _Workspace:
    """A group's receive workspace, its symmetric-memory handle (whose signal pads start at
    zero), and how many "buffer free" counts this rank has sent through those pads."""

    def __init__(self, buf: torch.Tensor, handle):
        self.buf, self.handle, self.frees = buf, handle, 0


def _workspace(group, device: torch.device, nbytes: int) -> _Workspace:
    import torch.distributed._symmetric_memory as symm_mem

    group = group if group is not None else dist.group.WORLD
    key = (group.group_name, device.index)
    have = _WORKSPACES.get(key)
    if have is None or have.buf.numel() < nbytes:
        # Every rank of the group reaches this point with the same sizes: a collective.
        if have is not None:
            torch.cuda.synchronize(device)  # nothing queued may still use the old buffers
            del _WORKSPACES[key]
        size = max(nbytes, 2 * have.buf.numel() if have is not None else 0)
        buf = symm_mem.empty(size, dtype=torch.uint8, device=device)
        _WORKSPACES[key] = _Workspace(buf, symm_mem.rendezvous(buf, group))
    return _WORKSPACES[key]


_CU_STREAM_WAIT_VALUE_GEQ = 0  # cyclic: (int32)(*addr - value) >= 0
_DRIVER: dict = {}


def _driver_fn(name: str):
    """A CUDA driver stream memory operation (``cuStreamWaitValue32``, ``cuStreamWriteValue32``)."""
    if name not in _DRIVER:
        import ctypes

        lib = ctypes.CDLL("libcuda.so.1")
        fn = getattr(lib, name + "_v2", None) or getattr(lib, name)
        fn.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_uint]
        fn.restype = ctypes.c_int
        _DRIVER[name] = fn
    return _DRIVER[name]


def _stream_op(name: str, stream: torch.cuda.Stream, addr: int, value: int, flags: int = 0) -> None:
    rc = _driver_fn(name)(stream.cuda_stream, addr, value & 0xFFFFFFFF, flags)
    if rc != 0:
        raise RuntimeError(f"{name} failed (CUresult {rc}); set ringflash.comm.COPY_ENGINE_SIGNALS = 'kernel'")


def _timeout_ms() -> int:
    return max(1, int(COPY_ENGINE_TIMEOUT_S * 1000))


class _CopyWork:
    """One message in flight: ``wait`` makes the current stream wait for its arrival signal
    (and for the copy's end, which frees the sent tensor)."""

    def __init__(self, handle, src_rank: int, channel: int, done: torch.cuda.Event):
        self.handle, self.src_rank, self.channel, self.done = handle, src_rank, channel, done

    def wait(self) -> None:
        self.handle.wait_signal(self.src_rank, self.channel, _timeout_ms())
        torch.cuda.current_stream().wait_event(self.done)


class CopyEngineRing(Ring):
    """The ring over the copy-engine transport (module docstring). Receive buffers come from
    :meth:`empty`, a bump allocator over the group's workspace: every rank allocates the same
    sizes in the same order, so a buffer sits at the same offset on every rank, and a sender
    writes into ``workspace[next] + offset``."""

    def __init__(self, group, device: torch.device, recv_bytes: int):
        super().__init__(group)
        self.space = _workspace(self.group, device, recv_bytes + 16 * _ALIGN)
        self.workspace, self.handle = self.space.buf, self.space.handle
        self.offset = 0
        me = self.handle.rank
        self.next_rank, self.prev_rank = (me + 1) % self.world_size, (me - 1) % self.world_size
        # A signal pad holds `channels` uint32 slots per source rank. Channel 0 is left to
        # barriers; with kernel signals each message takes a pair (buffer free, message
        # landed); with stream signals "landed" takes one channel of the pairs and "buffer
        # free" is a running count in the pad's last channel.
        channels = int(self.handle.signal_pad_size) // (4 * self.world_size)
        self.pairs = (channels - 2) // 2
        self.free_channel = channels - 1
        assert self.pairs >= 4, f"symmetric-memory signal pad too small ({channels} channels)"
        self.count = 0
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index not in _COPY_STREAMS:
            _COPY_STREAMS[index] = torch.cuda.Stream(device=device)
        self.stream = _COPY_STREAMS[index]

    def empty(self, shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        numel = 1
        for n in shape:
            numel *= int(n)
        itemsize = torch.empty((), dtype=dtype).element_size()
        start = -(-self.offset // _ALIGN) * _ALIGN
        end = start + numel * itemsize
        assert end <= self.workspace.numel(), "ring receive buffers exceed the reserved workspace"
        self.offset = end
        return self.workspace[start:end].view(dtype).view(tuple(shape))

    def owns(self, t: torch.Tensor) -> bool:
        base = self.workspace.data_ptr()
        return base <= t.data_ptr() < base + self.workspace.numel()

    def _peer_view(self, t: torch.Tensor) -> torch.Tensor:
        assert self.owns(t) and t.is_contiguous(), "copy_engine receive buffers come from Ring.empty"
        offset = t.data_ptr() - self.workspace.data_ptr()
        assert offset % t.element_size() == 0
        return self.handle.get_buffer(self.next_rank, tuple(t.shape), t.dtype, offset // t.element_size())

    def _slot(self, owner: int, channel: int, src: int) -> int:
        """Device address of ``owner``'s signal-pad slot for ``channel`` from ``src`` (PyTorch's
        layout: ``pad[owner][channel * world + src]``, uint32)."""
        return int(self.handle.signal_pad_ptrs[owner]) + 4 * (channel * self.world_size + src)

    # Signals and peer buffers pair each rank with its ring neighbours only.
    any_hop = False

    def exchange(self, send: list[torch.Tensor], recv: list[torch.Tensor], hops: int = 1) -> Exchange:
        assert hops % self.world_size == 1, "the copy-engine ring moves messages one hop at a time"
        assert len(send) == len(recv)
        c = 1 + 2 * (self.count % self.pairs)
        self.count += 1
        free, landed = c, c + 1
        me, compute = self.handle.rank, torch.cuda.current_stream()
        self.stream.wait_stream(compute)  # the sent tensors are ready
        stream_signals = COPY_ENGINE_SIGNALS == "stream"
        # Our receive buffers are free once the work queued so far is done: tell the sender.
        if stream_signals:
            self.space.frees += 1
            n = self.space.frees  # every rank of the group counts the same exchanges
            _stream_op("cuStreamWriteValue32", compute, self._slot(self.prev_rank, self.free_channel, me), n)
        else:
            self.handle.put_signal(self.prev_rank, free, _timeout_ms())
        with torch.cuda.stream(self.stream):
            # Wait until the next rank's buffers are free, write into them, say so.
            if stream_signals:
                _stream_op("cuStreamWaitValue32", self.stream, self._slot(me, self.free_channel, self.next_rank), n,
                           _CU_STREAM_WAIT_VALUE_GEQ)
            else:
                self.handle.wait_signal(self.next_rank, free, _timeout_ms())
            for s, r in zip(send, recv):
                assert s.shape == r.shape and s.dtype == r.dtype
                self._peer_view(r).copy_(s)  # our recv buffer's twin on the next rank
            if stream_signals:  # a system-scope fence orders it after the copies
                _stream_op("cuStreamWriteValue32", self.stream, self._slot(self.next_rank, landed, me), 1)
            else:
                self.handle.put_signal(self.next_rank, landed, _timeout_ms())
            done = torch.cuda.Event()
            done.record(self.stream)
        for s in send:
            if not self.owns(s):  # workspace memory is not the caching allocator's
                s.record_stream(self.stream)
        return Exchange([_CopyWork(self.handle, self.prev_rank, landed, done)])
