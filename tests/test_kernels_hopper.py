"""The Hopper forward (ringflash/kernels/_fwd_hopper.py, Gluon), compiled for sm_90 on the CPU.

Gluon kernels do not run under Triton's interpreter, so here each variant the launcher can ask
for (head dims, dtypes, mask classes, the fold) is compiled to a cubin with the launcher's own
arguments, and the PTX must hold FA3's pieces: wgmma, TMA loads, the producer's register
hand-off (setmaxnreg). Its results are checked on a GPU (tests/test_kernels_gpu.py).
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile

import pytest
import torch
import triton

pytest.importorskip("triton.experimental.gluon.language.nvidia.hopper")
pytest.importorskip("triton.experimental.gluon.nvidia.hopper")

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.experimental.gluon._runtime import GluonASTSource  # noqa: E402
from triton.runtime.jit import mangle_type  # noqa: E402

from ringflash.kernels import attention as A  # noqa: E402
from ringflash.kernels._fwd_hopper import _attn_fwd_hopper  # noqa: E402

SM90 = GPUTarget("cuda", 90, 32)
SMEM_SM90 = 232448  # bytes of shared memory a block may take on H100/H200


def compile_variant(D, dtype, *, causal=False, window=None, docs=False, fold=False, pos_dtype=torch.int64):
    """Compile the kernel as forward() would launch it on these (CPU) inputs."""
    B, S, H, Hkv = 2, 300, 4, 2
    q = torch.randn(B, S, H, D, dtype=dtype)
    k = torch.randn(B, S, Hkv, D, dtype=dtype)
    v = torch.randn(B, S, Hkv, D, dtype=dtype)
    pos = torch.arange(S, dtype=pos_dtype)
    doc = (torch.arange(S) // 100).to(torch.int32) if docs else None
    m = A._mask_args(pos, pos, causal, window, doc, doc, S, S, q.device)
    out = torch.empty(B, S, H, D, dtype=torch.float32)
    lse = torch.empty(B, H, S, dtype=torch.float32)
    cfg = A.HOPPER_FWD_CONFIGS[D]
    masked = causal or bool(m.window) or m.docs
    ranges = torch.zeros(1, triton.cdiv(S, cfg.block_m), 4, dtype=torch.int32) if masked else None
    grid, args, constexprs, num_warps = A._hopper_launch(q, k, v, m, causal, 0.125, out, lse, fold, ranges)
    names = list(_attn_fwd_hopper.arg_names)
    signature = {name: mangle_type(a) for name, a in zip(names, args)}
    signature.update({name: "constexpr" for name in constexprs})
    assert list(signature) == names, "the launcher's arguments and the kernel's parameters differ"
    src = GluonASTSource(_attn_fwd_hopper, signature, constexprs=constexprs)
    return triton.compile(src, target=SM90, options=dict(num_warps=num_warps)), grid


VARIANTS = [
    dict(D=128, dtype=torch.bfloat16),
    dict(D=128, dtype=torch.bfloat16, causal=True),
    dict(D=128, dtype=torch.float16, causal=True, fold=True),
    dict(D=128, dtype=torch.bfloat16, window=(64, 0), docs=True, fold=True, pos_dtype=torch.int32),
    dict(D=64, dtype=torch.bfloat16, causal=True),
    dict(D=64, dtype=torch.bfloat16, window=(32, 16), docs=True),
]


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(f"{k}={v[k]}" for k in v).replace("torch.", ""))
def test_compiles_for_sm90(variant):
    kernel, grid = compile_variant(**variant)
    ptx = kernel.asm["ptx"]
    assert "wgmma.mma_async" in ptx
    assert re.search(r"cp\.async\.bulk\.tensor\.4d\.shared::\w+\.global", ptx), "no TMA load"
    assert "setmaxnreg" in ptx, "the producer's registers are not handed to the consumers"
    assert "wgmma.wait_group.sync.aligned 1" in ptx, "the softmax no longer overlaps the PV wgmma"
    assert kernel.metadata.num_warps == A.HOPPER_FWD_CONFIGS[variant["D"]].num_warps + 4  # + the producer's warpgroup
    assert kernel.metadata.shared <= SMEM_SM90
    assert grid == (triton.cdiv(300, 128), 2 * 4)


def test_registers_fit_at_head_dim_128():
    """ptxas' own report: the consumers fit their registers at the widest tile (a word or two
    of spill, as some ptxas versions report for the fold, costs nothing measurable)."""
    from triton.backends.nvidia.compiler import get_ptxas

    kernel, _ = compile_variant(128, torch.bfloat16, causal=True, fold=True)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as f:
            f.write(kernel.asm["ptx"])
        report = subprocess.run([get_ptxas(90).path, "-v", "--gpu-name=sm_90a", path, "-o", path + ".cubin"],
                                capture_output=True, text=True, check=True)
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report.stdout + report.stderr)
    assert spills and all(int(st) <= 16 and int(ld) <= 16 for st, ld in spills), report.stdout + report.stderr


def test_not_taken_where_it_cannot_run():
    """On the CPU (and under the interpreter) forward() keeps the Triton kernels."""
    q = torch.randn(1, 8, 2, 64, dtype=torch.float16)
    m = A._mask_args(None, None, True, None, None, None, 8, 8, q.device)
    saved = A.HOPPER_FORWARD
    try:
        A.HOPPER_FORWARD = True
        assert not A._hopper_serves(q, m)
    finally:
        A.HOPPER_FORWARD = saved
