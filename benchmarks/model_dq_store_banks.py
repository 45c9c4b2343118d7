"""Shared-memory wavefronts of the Hopper backward's dQ tile stores, from Triton's own layouts (CPU).

    python benchmarks/model_dq_store_banks.py [--json out.json]

The dK/dV program's consumers store each step's float32 dQ tile (BLOCK_M = 64 queries x D = 128)
from the wgmma accumulator layout into the shared-memory tile that the dQ writers reduce from
(``_bwd_dkdv_hopper._consumer_smem_p``). Triton's linear layouts give, for every (register,
lane, warp), the element a thread holds, and for every shared-memory offset, the element stored
there; this inverts the second and counts, for each 64-bit store instruction (two registers of
consecutive columns), the wavefronts each half-warp needs: the largest number of distinct
32-bit words any one of the 32 banks is asked for. For each swizzle of the tile (the default
128 bytes, and 64 and 32) it prints wavefronts per instruction against the ideal (one per
half-warp). An ncu profile of the default (128 bytes) measured 4 where 2 suffice
(benchmarks/results/kernels_h100_dq_store/).

Needs a Triton whose Gluon builder converts shared layouts to linear layouts (3.9 does; 3.6
aborts on it).
"""

from __future__ import annotations

import argparse
import itertools
import json


def layouts(swizzle: int, rows: int = 64, head_dim: int = 128, warps: int = 8):
    """(distributed bases, shared offset bases) of the accumulator of dQ = dS K (warps split the
    rows by 4 and the head dim by 2, as the kernel's ``dq_layout``) and of the dQ tile."""
    from triton._C.libtriton import gluon_ir, ir
    from triton.experimental.gluon import language as gl

    ctx = ir.context()
    ir.load_dialects(ctx)
    builder = gluon_ir.GluonOpBuilder(ctx)
    acc = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[warps // 2, 2], instr_shape=[16, head_dim // 2, 16])
    shared = gl.NVMMASharedLayout(swizzle_byte_width=swizzle, element_bitwidth=32, rank=2)
    dist = builder.to_linear_layout(acc._to_ir(builder), [rows, head_dim])
    smem = builder.to_linear_layout(shared._to_ir(builder), [rows, head_dim])
    return dist, smem


def combine(bases, index: int) -> tuple[int, int]:
    """The (row, column) of ``index`` under a linear layout's bases (XOR of the set bits' bases)."""
    r = c = 0
    for bit, (br, bc) in enumerate(bases):
        if index >> bit & 1:
            r ^= br
            c ^= bc
    return r, c


def wavefronts(swizzle: int) -> dict:
    dist, smem = layouts(swizzle)
    offset_of = {combine(smem.offset_bases, o): o for o in range(1 << len(smem.offset_bases))}
    assert dist.reg_bases[0] == [0, 1], "two consecutive columns a thread: 64-bit stores"
    n_instr = 1 << (len(dist.reg_bases) - 1)
    per_instr = []
    for warp, instr in itertools.product(range(1 << len(dist.warp_bases)), range(n_instr)):
        reg = instr << 1  # the first register of the pair
        total = 0
        for half in (range(16), range(16, 32)):
            words_by_bank: dict = {}
            for lane in half:
                r, c = combine(dist.reg_bases, reg)
                lr, lc = combine(dist.lane_bases, lane)
                wr, wc = combine(dist.warp_bases, warp)
                byte = offset_of[(r ^ lr ^ wr, c ^ lc ^ wc)] * 4
                for word in (byte // 4, byte // 4 + 1):  # 8 bytes: two 32-bit words
                    words_by_bank.setdefault(word % 32, set()).add(word)
            total += max(len(w) for w in words_by_bank.values())
        per_instr.append(total)
    return dict(swizzle=swizzle, instructions=n_instr, wavefronts_per_instruction=max(per_instr),
                min_wavefronts=min(per_instr), ideal=2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    rows = [wavefronts(sw) for sw in (128, 64, 32)]
    print("swizzle  64-bit stores a thread  wavefronts each (ideal 2)")
    for r in rows:
        print(f"{r['swizzle']:5d} B  {r['instructions']:22d}  {r['wavefronts_per_instruction']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
