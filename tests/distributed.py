"""Run one function on N spawned processes of a gloo group, with a timeout.

A hang fails the test (the processes are killed) instead of stalling the run. Each rank's
return value comes back to the parent; an exception on any rank is re-raised there with the
rank's traceback.

The processes fork from a server that imported torch and ringflash once (multiprocessing's
"forkserver"), instead of each importing them afresh: on two cores that import took about a
second and a half of CPU per rank, 12 s for a group of 8. Each rank takes the parent's
environment of the moment.
"""

from __future__ import annotations

import os
import queue
import tempfile
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


# Imported once by the fork server (a module that fails to import is skipped). Not
# ringflash.kernels: Triton's interpreter is chosen when the kernels are defined, from the
# environment, which a rank may still change before it imports them.
PRELOAD = ["torch", "torch.distributed", "ringflash", "ringflash.sparse", "ringflash.ulysses", "ringflash.hf",
           "pytest", "numpy"]


def _context():
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    return ctx


def _worker(rank, world_size, init_file, fn, args, results, environ):
    os.environ.clear()
    os.environ.update(environ)
    torch.set_num_threads(1)
    try:
        dist.init_process_group(
            "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size
        )
        try:
            value = fn(rank, world_size, *args)
        finally:
            dist.destroy_process_group()
        results.put((rank, "ok", value))
    except BaseException:  # noqa: BLE001 - report everything to the parent
        results.put((rank, "error", traceback.format_exc()))


def spawn(fn, world_size: int, *args, timeout: float = 240.0) -> list:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks; return each rank's result."""
    ctx = _context()
    results = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "rendezvous")
        procs = [
            ctx.Process(target=_worker, args=(r, world_size, init_file, fn, args, results, dict(os.environ)), daemon=True)
            for r in range(world_size)
        ]
        for p in procs:
            p.start()
        out, errors = {}, []
        try:
            for _ in range(world_size):
                rank, status, value = results.get(timeout=timeout)
                if status == "ok":
                    out[rank] = value
                else:
                    errors.append(f"rank {rank}:\n{value}")
                    break  # the other ranks may be stuck waiting on this one
        except queue.Empty:
            errors.append(f"timed out after {timeout:.0f}s: a rank hung (results from ranks {sorted(out)})")
        finally:
            for p in procs:
                p.join(timeout=5 if not errors else 0.1)
                if p.is_alive():
                    p.kill()
                    p.join()
        if errors:
            raise RuntimeError("\n".join(errors))
    return [out[r] for r in range(world_size)]
