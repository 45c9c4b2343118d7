"""The per-head token sort of QK-dropping and hash calls on one GPU: the counting sort
(``ringflash.kernels.tokens.sort_tokens``, two launches) against PyTorch's path (composite
positions, two ``torch.sort``, the inverse permutations, the documents).

    PYTHONPATH=. python benchmarks/bench_token_sort.py --out sort.jsonl

B = 1, H = Hkv = ``--heads``, random bucket ids (keep flags at 0.5 for QK-dropping). For each
(S, mode): whether both give the same eight tensors bitwise (``same``), GPU time
(``triton.testing.do_bench``, median) and host time per call (the host loop of 200 calls
without synchronising), as a table and one JSON line each.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from ringflash import sparse as sp
from ringflash.sparse import POS_BITS


def parse_len(s: str) -> int:
    return int(s[:-1]) * 1024 if s.endswith("k") else int(s)


def host_us(fn, n: int = 200) -> float:
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t0) / n * 1e6


def pytorch_sort(mode, pos):
    """What ``sparse.run_sorted`` does without the counting sort."""
    q_c, k_c = sp.composite_positions(mode, pos, pos, None, None, 1)
    q_c, q_o = torch.sort(q_c, -1)
    k_c, k_o = torch.sort(k_c, -1)
    return (q_o, sp._inverse(q_o), q_c, (q_c >> POS_BITS).to(torch.int32),
            k_o, sp._inverse(k_o), k_c, (k_c >> POS_BITS).to(torch.int32))


def main() -> None:
    import triton

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seqlens", nargs="+", default=["8k", "32k", "128k"])
    ap.add_argument("--buckets", nargs="+", type=int, default=[8, 16, 32], help="hash bucket counts")
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    dev, H = "cuda", a.heads
    g = torch.Generator(device=dev).manual_seed(0)
    rows = []
    for S in map(parse_len, a.seqlens):
        pos = torch.arange(S, device=dev)
        modes = [("qkdrop:0.5", sp.QKDrop(torch.rand(1, S, H, generator=g, device=dev) > 0.5,
                                          torch.rand(1, S, H, generator=g, device=dev) > 0.5))]
        for nb in a.buckets:
            ids = [torch.randint(0, nb, (1, S, H), generator=g, device=dev, dtype=torch.int32) for _ in range(2)]
            modes.append((f"hash:{nb}", sp.HashSparse(*ids, nb, checked=True)))
        for name, mode in modes:
            ours = lambda: sp._sort_on_device(mode, pos, pos, None, None, 1)  # noqa: E731
            theirs = lambda: pytorch_sort(mode, pos)  # noqa: E731
            same = all(torch.equal(x, y) for x, y in zip(ours(), theirs()))
            r = dict(gpu=torch.cuda.get_device_name(), S=S, H=H, mode=name, same=same,
                     counting_gpu_us=triton.testing.do_bench(ours) * 1e3,
                     pytorch_gpu_us=triton.testing.do_bench(theirs) * 1e3,
                     counting_host_us=host_us(ours), pytorch_host_us=host_us(theirs))
            rows.append(r)
            print(f"S={S:7d} {name:11s} same={same}  GPU {r['counting_gpu_us']:8.1f} vs {r['pytorch_gpu_us']:8.1f} us"
                  f"  host {r['counting_host_us']:7.1f} vs {r['pytorch_host_us']:7.1f} us (counting sort vs PyTorch)",
                  flush=True)
    if a.out:
        with open(a.out, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)


if __name__ == "__main__":
    main()
