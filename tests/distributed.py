"""Run one function on N spawned processes of a gloo group, with a timeout.

A hang fails the test (the processes are killed) instead of stalling the run. Each rank's
return value comes back to the parent; an exception on any rank is re-raised there with the
rank's traceback.
"""

from __future__ import annotations

import os
import queue
import tempfile
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _worker(rank, world_size, init_file, fn, args, results):
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
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "rendezvous")
        procs = [
            ctx.Process(target=_worker, args=(r, world_size, init_file, fn, args, results), daemon=True)
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
