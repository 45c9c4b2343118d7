"""What the ordered dQ of the Hopper backward can cost: a schedule model of its dQ writer.

    python benchmarks/model_dq_writer.py --seqlens 8k 16k 32k 64k --latency 0.3 0.6 1.0 1.5 --out dq_writer.jsonl

The fused Hopper backward (``ringflash/kernels/_bwd_dkdv_hopper.py``) adds each step's dQ tile
into the float32 dQ from a writer warp. Unordered (``"atomic"``) the writer waits only until the
reduction has read its buffer; ordered (the default, bitwise repeatable) it waits until the
counter of the query tile says that every higher key tile has added, issues its reduction, waits
until it has *landed*, and counts itself in; and the grid runs each head's key tiles from the
last down (shortest first, so that a program reaches a query tile one step after the program
above it). This model replays that schedule on ``--sms`` program slots, one head after another
(B = 1, H = ``--heads``, causal, 64 queries a step, 128 keys a program, as at D = 128), in units
of one step's products (``T`` = 1; about 2.8 us at D = 128 on an H100):

* a program's consumers take ``T`` a step and hand the dQ tile to one of two buffers, waiting
  until the writer has released the one of two steps before;
* the writer takes the steps in order. Ordered: it waits for the counter (published ``--poll``
  after the previous addition into that tile landed), then the addition lands ``L`` later
  (``--latency``), and the buffer is released then. Unordered: the buffer is released
  ``L / 10`` after the issue (read, not landed), and nothing waits on a counter;
* a program holds its slot from its start (half of ``--epilogue`` of set-up) to its last
  step's release (the other half: dK, dV written); slots go to programs in grid order, to
  whichever frees first.

It prints the time of the whole grid for the ordered schedule, the unordered one in the same
(shortest-first) grid order and in the longest-first order the unordered kernel uses, and the
work per slot (every step's ``T`` over the slots). It leaves out everything but this order:
memory traffic, L2 hits of the dQ tiles, the spread of step times. Estimates for choosing what
to try on the GPU, not predictions of TFLOP/s.
"""

from __future__ import annotations

import argparse
import heapq
import json


def parse_len(s: str) -> int:
    return int(s[:-1]) * 1024 if s.lower().endswith("k") else int(s)


def simulate(seqlen: int, *, heads: int = 32, sms: int = 132, latency: float = 0.6, poll: float = 0.2,
             epilogue: float = 2.0, ordered: bool = True, shortest_first: bool = True, causal: bool = True,
             block_m: int = 64, block_n: int = 128, pipelined: bool = False) -> dict:
    """One grid's schedule: ``makespan`` (the last program's end), ``work`` (steps x T over the
    slots), ``waited`` (writer time spent waiting on counters, summed) and ``steps``."""
    n_k, n_q = -(-seqlen // block_n), -(-seqlen // block_m)
    first = [(n * block_n) // block_m if causal else 0 for n in range(n_k)]  # a key tile's first query tile
    landed: dict = {}  # (head, query tile) -> when the last addition into it is visible
    slots = [0.0] * sms
    makespan = waited = 0.0
    steps = 0
    for h in range(heads):
        for n in (range(n_k - 1, -1, -1) if shortest_first else range(n_k)):
            start = heapq.heappop(slots)
            consumer = start + epilogue / 2
            released = [start, start]  # when each of the two dQ buffers was last released
            writer = start
            for j, m in enumerate(range(first[n], n_q)):
                consumer = max(consumer + 1.0, released[j % 2])  # T, then a free buffer
                issue = max(consumer, writer)
                if ordered:
                    if n + 1 < n_k and first[n + 1] <= m:  # a higher key tile walks m (first[] increases)
                        ready = landed[(h, m)]
                        waited += max(0.0, ready - issue)
                        issue = max(issue, ready)
                    landed[(h, m)] = issue + latency + poll
                    # Pipelined: the next issue and the buffer wait only for the read; the count
                    # still goes in once this addition has landed.
                    writer = issue + (latency / 10 if pipelined else latency)
                else:
                    writer = issue + latency / 10
                released[j % 2] = writer
                steps += 1
            end = max(consumer, writer) + epilogue / 2
            makespan = max(makespan, end)
            heapq.heappush(slots, end)
    return dict(makespan=makespan, work=steps / sms, waited=waited, steps=steps)


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seqlens", nargs="+", default=["8k", "16k", "32k", "64k"])
    ap.add_argument("--latency", nargs="+", type=float, default=[0.3, 0.6, 1.0, 1.5],
                    help="an addition's time from issue to landed, in steps")
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--sms", type=int, default=132)
    ap.add_argument("--poll", type=float, default=0.2)
    ap.add_argument("--epilogue", type=float, default=2.0)
    ap.add_argument("--out", default="")
    a = ap.parse_args(argv)
    rows = []
    print(f"{'S':>6} {'L':>5} {'ordered':>9} {'waited':>8} {'pipelined':>9} {'unord. SPT':>10} {'unord. LPT':>10} "
          f"{'work':>8} {'ord/LPT':>8} {'pipe/LPT':>8} {'SPT/LPT':>8}")
    for S in map(parse_len, a.seqlens):
        for lat in a.latency:
            kw = dict(heads=a.heads, sms=a.sms, latency=lat, poll=a.poll, epilogue=a.epilogue)
            o = simulate(S, ordered=True, **kw)
            pipe = simulate(S, ordered=True, pipelined=True, **kw)
            spt = simulate(S, ordered=False, **kw)
            lpt = simulate(S, ordered=False, shortest_first=False, **kw)
            r = dict(S=S, latency=lat, heads=a.heads, sms=a.sms, poll=a.poll, epilogue=a.epilogue,
                     ordered=o["makespan"], waited=o["waited"], pipelined=pipe["makespan"],
                     pipelined_waited=pipe["waited"], unordered_spt=spt["makespan"],
                     unordered_lpt=lpt["makespan"], work=o["work"],
                     ordered_over_lpt=o["makespan"] / lpt["makespan"], pipelined_over_lpt=pipe["makespan"] / lpt["makespan"],
                     spt_over_lpt=spt["makespan"] / lpt["makespan"])
            rows.append(r)
            print(f"{S:6d} {lat:5.2f} {r['ordered']:9.0f} {r['waited']:8.0f} {r['pipelined']:9.0f} "
                  f"{r['unordered_spt']:10.0f} {r['unordered_lpt']:10.0f} {r['work']:8.0f} {r['ordered_over_lpt']:8.3f} "
                  f"{r['pipelined_over_lpt']:8.3f} {r['spt_over_lpt']:8.3f}", flush=True)
    if a.out:
        with open(a.out, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    return rows


if __name__ == "__main__":
    main()
