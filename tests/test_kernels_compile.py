"""The Triton kernels (ringflash/kernels/_fwd.py, _bwd.py) compiled for sm_90 on the CPU.

The other kernel tests run them under Triton's interpreter, which accepts some programs the
compiler rejects. Here the forward and both backward program kinds are compiled to a cubin with
the launchers' own arguments (``attention._launch`` captured instead of launching) for each mask
class: causal, documents with a window (boundary tiles by row bounds, ``ROW_BOUNDS``, and by
per-tile loads), per-head attributes as the sparse modes pass them, and a block pattern.

The compiles run in a process of their own, without ``TRITON_INTERPRET`` (under it ``triton.jit``
gives interpreted functions, which do not compile): this file as a script prints, as JSON, each
variant's kernels and whether they compiled.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

VARIANTS = {
    "causal": dict(D=64, dtype=torch.bfloat16, causal=True),
    "docs_window_row_bounds": dict(D=128, dtype=torch.bfloat16, causal=True, docs=True, window=(50, 0), hkv=2),
    "docs_window_tile_loads": dict(D=128, dtype=torch.bfloat16, causal=True, docs=True, window=(50, 0), hkv=2,
                                   row_bounds=False),
    "two_sided_window_row_bounds": dict(D=64, dtype=torch.float16, causal=False, window=(40, 9)),
    "per_head_row_bounds": dict(D=64, dtype=torch.float16, causal=True, per_head=True, hkv=2),
    "block_pattern": dict(D=64, dtype=torch.bfloat16, causal=True, blocks=True),
}
S, H = 300, 4


def _variant_launches(D, dtype, causal, docs=False, window=None, hkv=H, per_head=False, blocks=False,
                      row_bounds=True):
    """[(kernel, args, constexprs, warps, stages)] that forward() and backward() launch for the variant."""
    from ringflash import sparse
    from ringflash.kernels import attention as A

    captured = []
    A._launch = lambda kernel, grid, *args, num_warps, num_stages, **c: captured.append(
        (kernel, args, c, num_warps, num_stages))
    A.check_inputs = lambda *a, **k: None  # CPU tensors: nothing runs
    A._hopper_serves = lambda *a, **k: False
    A.ROW_BOUNDS = row_bounds
    # the derived tables (ranges, bounds, tile lists) as tensors of the right kind; values unread
    A._derived = lambda m, key, make: torch.zeros(1, 4096, 4, dtype=torch.int32)
    A._lists = lambda *a, **k: (torch.zeros(64, dtype=torch.int32), torch.zeros(64, dtype=torch.int32))
    q = torch.randn(1, S, H, D, dtype=dtype)
    k, v = (torch.randn(1, S, hkv, D, dtype=dtype) for _ in range(2))
    pos = torch.arange(S)
    kw = dict(causal=causal, window=window)
    if docs:
        kw.update(q_doc=(pos // 70).int(), k_doc=(pos // 70).int())
    if per_head:
        qb, kb = torch.randint(0, 3, (1, S, H), dtype=torch.int32), torch.randint(0, 3, (1, S, hkv), dtype=torch.int32)
        qc, qcd, kc, kcd = sparse.composite(sparse.HashSparse(qb, kb, 3), pos, pos, None, None, 1)
        kw.update(q_pos=qc, q_doc=qcd, k_pos=kc, k_doc=kcd)
    if blocks:
        kw.update(blocks=sparse.block_pattern(S, 60, local=2, global_=1))  # blocks tile the 300 tokens
    out, lse = A.forward(q, k, v, **kw)
    A.backward(q, q, k, v, lse, lse, **kw)
    return captured


def report() -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import mangle_type

    facts = {}
    for name, variant in VARIANTS.items():
        kinds = []
        for kernel, args, constexprs, num_warps, num_stages in _variant_launches(**variant):
            names = list(kernel.arg_names)
            signature = {n: mangle_type(a) for n, a in zip(names, args)}
            signature.update({n: "constexpr" for n in names[len(args):]})
            constexprs = dict(constexprs, **{n: a for n, a in zip(names, args) if signature[n] == "constexpr"})
            compiled = triton.compile(ASTSource(kernel, signature, constexprs=constexprs),
                                      target=GPUTarget("cuda", 90, 32),
                                      options=dict(num_warps=num_warps, num_stages=num_stages))
            kind = kernel.fn.__name__ + {None: "", True: ":dkdv", False: ":dq"}[constexprs.get("DO_DKDV")]
            kinds.append(dict(kind=kind, rowb=bool(constexprs.get("ROWB")), ptx=len(compiled.asm["ptx"]) > 0))
        facts[name] = kinds
    return facts


@pytest.fixture(scope="module")
def compiled() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, __file__], capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", list(VARIANTS))
def test_triton_kernels_compile_for_sm90(name, compiled):
    """The forward and the dK/dV and dQ programs compile; row bounds where the launchers take
    them (windows and documents, per-head attributes; not causal alone or block patterns)."""
    kinds = compiled[name]
    assert [k["kind"] for k in kinds] == ["_attn_fwd", "_attn_bwd:dkdv", "_attn_bwd:dq"]
    assert all(k["ptx"] for k in kinds)
    variant = VARIANTS[name]
    want = variant.get("row_bounds", True) and not variant.get("blocks") and bool(
        variant.get("docs") or variant.get("window") or variant.get("per_head"))
    assert all(k["rowb"] == want for k in kinds), kinds


if __name__ == "__main__":
    print(json.dumps(report()))
