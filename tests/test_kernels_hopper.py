"""The Hopper kernels (ringflash/kernels/_fwd_hopper.py, _bwd_dkdv_hopper.py, _bwd_dq_hopper.py,
in Gluon), compiled for sm_90 on the CPU.

Gluon kernels do not run under Triton's interpreter, so here each variant the launchers can ask
for (head dims, dtypes, mask classes, the fold, accumulation) is compiled to a cubin with the
launchers' own arguments, specialised as Triton's launcher specialises them, and the PTX must
hold FA3's pieces: wgmma, TMA loads, the producer's register hand-off (setmaxnreg). The SASS of
their walks over tiles (benchmarks/sass_loops.py) is checked too: spills, the forward's byte
permutes, the backward's mask code where a call has no mask. Their results are checked on a GPU
(tests/test_kernels_hopper_gpu.py).

The compiles run in a process of their own (this file as a script, which prints what the tests
check as JSON): once Triton's interpreter has run a kernel that calls a helper function, as
other test modules do, it leaves ``triton.language`` patched (Triton 3.9), and the compiler
then fails in that process.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import triton

pytest.importorskip("triton.experimental.gluon.language.nvidia.hopper")
pytest.importorskip("triton.experimental.gluon.nvidia.hopper")


from ringflash.kernels import attention as A  # noqa: E402
from ringflash.kernels._bwd_dkdv_hopper import _attn_bwd_dkdv_hopper  # noqa: E402
from ringflash.kernels._bwd_dq_hopper import _attn_bwd_dq_hopper  # noqa: E402
from ringflash.kernels._fwd_hopper import _attn_fwd_hopper  # noqa: E402

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
from sass_loops import compile_as_launched, key_loops, sass_of  # noqa: E402

SMEM_SM90 = 232448  # bytes of shared memory a block may take on H100/H200
SMS = 4  # the SM count the persistent grids are sized for here (fewer than the items: several each)


B, S, H, HKV = 2, 300, 4, 2


def _inputs(D, dtype, causal, window, docs, pos_dtype, head_attrs=False):
    """Inputs and mask arguments; ``head_attrs``: per-head composite positions and documents,
    as the sparse modes pass them (:mod:`ringflash.sparse`)."""
    q = torch.randn(B, S, H, D, dtype=dtype)
    k = torch.randn(B, S, HKV, D, dtype=dtype)
    v = torch.randn(B, S, HKV, D, dtype=dtype)
    pos = torch.arange(S, dtype=pos_dtype)
    doc = (torch.arange(S) // 100).to(torch.int32) if docs else None
    if head_attrs:
        def attrs(heads):
            cdoc = torch.arange(S).expand(B, heads, S) // 64
            return (cdoc << 31) | torch.arange(S), cdoc.to(torch.int32)

        (q_pos, q_doc), (k_pos, k_doc) = attrs(H), attrs(HKV)
        m = A._mask_args(q_pos, k_pos, causal, window, q_doc, k_doc, S, S, q.device, None, (B, H, HKV))
    else:
        m = A._mask_args(pos, pos, causal, window, doc, doc, S, S, q.device)
    return q, k, v, m, causal or bool(m.window) or m.docs


def _ranges(masked, tiles, rows=1):
    return torch.zeros(rows, tiles, 4, dtype=torch.int32) if masked else None


def _compile(kernel, launch):
    """The kernel compiled for sm_90a with the launcher's arguments, specialised as Triton's launcher
    specialises them (integers equal to 1 become constants; integers and addresses divisible by 16
    are marked so): benchmarks/sass_loops.compile_as_launched."""
    _grid, args, constexprs, _warps = launch
    names = list(kernel.arg_names)
    assert sorted(names[len(args):]) == sorted(constexprs), "the launcher's arguments and the kernel's parameters differ"
    return compile_as_launched(kernel, launch)


def compile_variant(D, dtype, *, causal=False, window=None, docs=False, fold=False, pos_dtype=torch.int64,
                    split=1, pingpong=False, persistent=False, out_dtype=torch.float32, head_attrs=False,
                    row_bounds=False, tiles=None):
    """Compile the forward kernel as forward() would launch it on these (CPU) inputs; ``tiles``: a
    launch config (block_m, block_n, warps, stages) in place of the table's; ``out_dtype``:
    O's dtype (float32, or the inputs' dtype, which the kernel stores directly); ``head_attrs``:
    per-head positions and documents (the sparse modes); ``row_bounds``: boundary tiles masked by
    each row's run of visible keys (HOPPER_FWD_ROW_BOUNDS)."""
    q, k, v, m, masked = _inputs(D, dtype, causal, window, docs, pos_dtype, head_attrs)
    out = torch.empty(B, S, H, D, dtype=out_dtype)
    lse = torch.empty(B, H, S, dtype=torch.float32)
    saved = A.HOPPER_FWD_SPLIT, A.HOPPER_FWD_PINGPONG, A.HOPPER_FWD_PERSISTENT, A._sm_count, A.HOPPER_FWD_CONFIGS[D]
    A.HOPPER_FWD_SPLIT, A.HOPPER_FWD_PINGPONG, A.HOPPER_FWD_PERSISTENT = split, pingpong, persistent
    A._sm_count = lambda device: SMS  # a CPU tensor has no SM count
    try:
        if tiles is not None:
            A.HOPPER_FWD_CONFIGS[D] = A.KernelConfig(*tiles)
        ranges = _ranges(masked, triton.cdiv(S, A.HOPPER_FWD_CONFIGS[D].block_m), B * H if head_attrs else 1)
        bounds = None
        if row_bounds and ranges is not None:  # (what _row_bounds makes; its values do not matter here)
            bounds = torch.zeros(B * H if head_attrs else 1, S, 2, dtype=torch.int32)
        launch = A._hopper_launch(q, k, v, m, causal, 0.125, out, lse, fold, ranges, bounds)
    finally:
        A.HOPPER_FWD_SPLIT, A.HOPPER_FWD_PINGPONG, A.HOPPER_FWD_PERSISTENT, A._sm_count, A.HOPPER_FWD_CONFIGS[D] = saved
    return _compile(_attn_fwd_hopper, launch)


def compile_backward(D, dtype, *, causal=False, window=None, docs=False, accumulate=False, pos_dtype=torch.int64,
                     smem_p=False, grad_dtype=torch.float32, dq_mode="kernel", row_bounds=False, dq_writers=1,
                     fresh=False, stats_smem=True):
    """Compile the dK/dV and dQ kernels as backward() would launch them: [(kernel, grid)] x 2 (x 1
    where the dK/dV kernel adds dQ, ``dq_mode`` "atomic" or "ordered"); ``grad_dtype``: dQ, dK and
    dV's dtype (float32, or without ``accumulate`` the inputs' dtype); ``row_bounds``: the dK/dV
    program's boundary tiles masked by each query row's run of visible keys (HOPPER_BWD_ROW_BOUNDS);
    ``dq_writers``: the writer warps adding dQ (HOPPER_BWD_DQ_WRITERS; one here, two by default);
    ``fresh``: ordered additions into a dQ that was not zeroed, the first into each tile a store;
    ``stats_smem``: LSE and delta rows loaded by the producer where FA3's routes serve the call
    (HOPPER_BWD_STATS_SMEM, the default; False: the consumers load them)."""
    assert grad_dtype == torch.float32 or not accumulate, "accumulation adds into float32 gradients"
    q, k, v, m, masked = _inputs(D, dtype, causal, window, docs, pos_dtype)
    lse = torch.empty(B, H, S, dtype=torch.float32)
    grads = [torch.empty(t.shape, dtype=grad_dtype) for t in (q, k, v)]
    saved = A.HOPPER_BWD_SMEM_P, A.HOPPER_BWD_DQ, A.HOPPER_BWD_DQ_WRITERS, A.HOPPER_BWD_STATS_SMEM
    A.HOPPER_BWD_SMEM_P, A.HOPPER_BWD_DQ, A.HOPPER_BWD_DQ_WRITERS = smem_p, dq_mode, str(dq_writers)
    A.HOPPER_BWD_STATS_SMEM = stats_smem
    try:
        c1, c2 = A._dkdv_config(D), A.HOPPER_BWD_DQ_CONFIGS[D]
        bounds = torch.zeros(1, S, 2, dtype=torch.int32) if row_bounds else None  # values do not matter here
        launches = A._hopper_bwd_launches(q, q, k, v, lse, lse, m, causal, 0.125, *grads, accumulate, accumulate,
                                          _ranges(masked, triton.cdiv(S, c1.block_n)),
                                          _ranges(masked, triton.cdiv(S, c2.block_m)), bounds, fresh=fresh)
    finally:
        A.HOPPER_BWD_SMEM_P, A.HOPPER_BWD_DQ, A.HOPPER_BWD_DQ_WRITERS, A.HOPPER_BWD_STATS_SMEM = saved
    return [_compile(kernel, launch) for kernel, launch in zip((_attn_bwd_dkdv_hopper, _attn_bwd_dq_hopper), launches)]


FOLD_128 = dict(D=128, dtype=torch.bfloat16, causal=True, fold=True)
VARIANTS = [
    dict(D=128, dtype=torch.bfloat16),
    FOLD_128,
    dict(D=128, dtype=torch.float16, causal=True),
    dict(D=128, dtype=torch.bfloat16, window=(64, 0), docs=True, fold=True, pos_dtype=torch.int32),
    dict(D=64, dtype=torch.bfloat16, causal=True, out_dtype=torch.bfloat16),  # O stored in the inputs' dtype
    dict(D=64, dtype=torch.bfloat16, window=(32, 16), docs=True),
    dict(D=128, dtype=torch.bfloat16, causal=True, fold=True, split=2),
    dict(D=64, dtype=torch.bfloat16, window=(32, 16), docs=True, split=2),
    dict(D=128, dtype=torch.bfloat16, causal=True, split=2, pingpong=True),
    # persistent programs drawing items from a counter (HOPPER_FWD_PERSISTENT)
    dict(D=128, dtype=torch.bfloat16, causal=True, fold=True, split=2, persistent=True),
    dict(D=128, dtype=torch.bfloat16, window=(64, 0), docs=True, pos_dtype=torch.int32, split=2, persistent=True),
    dict(D=64, dtype=torch.bfloat16, split=1, persistent=True),
    # per-head positions and documents (QK-dropping, hash buckets)
    dict(D=128, dtype=torch.bfloat16, causal=True, split=2, head_attrs=True),
    dict(D=64, dtype=torch.bfloat16, causal=True, window=(32, 0), fold=True, split=2, head_attrs=True),
    dict(D=128, dtype=torch.bfloat16, causal=True, split=2, persistent=True, head_attrs=True),
    # three consumer partitions of 64 rows (a config of 12 consumer warps: 192-row tiles)
    dict(D=64, dtype=torch.bfloat16, causal=True, split=2, out_dtype=torch.bfloat16, tiles=(192, 64, 12, 3)),
    dict(D=64, dtype=torch.bfloat16, window=(32, 0), split=2, persistent=True, tiles=(192, 128, 12, 2)),
]
# boundary tiles masked by each row's run of visible keys (HOPPER_FWD_ROW_BOUNDS)
ROW_BOUND_VARIANTS = [
    dict(D=128, dtype=torch.bfloat16, causal=True, split=2, out_dtype=torch.bfloat16, row_bounds=True),
    dict(D=128, dtype=torch.bfloat16, window=(64, 0), docs=True, fold=True, split=2, row_bounds=True),
    dict(D=128, dtype=torch.bfloat16, causal=True, docs=True, split=2, head_attrs=True, out_dtype=torch.bfloat16,
         row_bounds=True),
    dict(D=64, dtype=torch.float16, causal=True, window=(32, 16), docs=True, split=2, row_bounds=True),
    dict(D=128, dtype=torch.bfloat16, window=(64, 0), docs=True, split=2, persistent=True, row_bounds=True),
]
VARIANTS += ROW_BOUND_VARIANTS


BACKWARD_VARIANTS = [
    dict(D=128, dtype=torch.bfloat16, grad_dtype=torch.bfloat16),  # dQ, dK, dV stored in the inputs' dtype
    dict(D=128, dtype=torch.bfloat16, causal=True, accumulate=True),
    dict(D=128, dtype=torch.float16, window=(64, 0), docs=True, causal=True, pos_dtype=torch.int32),
    dict(D=64, dtype=torch.bfloat16, window=(32, 16), docs=True, accumulate=True),
    # FA3's operand routes in the dK/dV program (HOPPER_BWD_SMEM_P): 64 queries a step at D = 128
    dict(D=128, dtype=torch.bfloat16, smem_p=True),
    dict(D=128, dtype=torch.bfloat16, causal=True, accumulate=True, smem_p=True),
    dict(D=128, dtype=torch.float16, window=(64, 0), docs=True, causal=True, pos_dtype=torch.int32, smem_p=True),
    dict(D=64, dtype=torch.bfloat16, causal=True, smem_p=True),
    # dQ added by the dK/dV programs with bulk TMA reductions (HOPPER_BWD_DQ), no dQ kernel
    dict(D=128, dtype=torch.bfloat16, causal=True, dq_mode="atomic"),
    dict(D=128, dtype=torch.bfloat16, causal=True, accumulate=True, dq_mode="ordered"),
    dict(D=128, dtype=torch.float16, window=(64, 0), docs=True, causal=True, pos_dtype=torch.int32, dq_mode="ordered"),
    dict(D=64, dtype=torch.bfloat16, dq_mode="ordered"),
]
# the dK/dV program's boundary tiles by each query row's run of visible keys (HOPPER_BWD_ROW_BOUNDS)
BACKWARD_ROW_BOUND_VARIANTS = [
    dict(D=128, dtype=torch.bfloat16, causal=True, dq_mode="ordered", row_bounds=True),
    dict(D=128, dtype=torch.bfloat16, window=(64, 0), docs=True, causal=True, dq_mode="ordered", row_bounds=True),
    dict(D=64, dtype=torch.float16, window=(32, 16), docs=True, accumulate=True, smem_p=True, row_bounds=True),
]
BACKWARD_VARIANTS += BACKWARD_ROW_BOUND_VARIANTS
# two dQ writers, the even and the odd steps (HOPPER_BWD_DQ_WRITERS = 2, the module's default; the
# variants above have one)
BACKWARD_WRITER_VARIANTS = [
    dict(D=128, dtype=torch.bfloat16, causal=True, accumulate=True, dq_mode="ordered", dq_writers=2),
    dict(D=128, dtype=torch.bfloat16, window=(64, 0), docs=True, causal=True, dq_mode="ordered", row_bounds=True,
         dq_writers=2),
    dict(D=128, dtype=torch.bfloat16, dq_mode="atomic", dq_writers=2),
    # into a dQ that was not zeroed: the first addition into each query tile a store (DQ_MODE = 3,
    # what flash_attention's bf16 dQ takes)
    dict(D=128, dtype=torch.bfloat16, causal=True, dq_mode="ordered", dq_writers=2, fresh=True),
    dict(D=128, dtype=torch.float16, window=(64, 0), docs=True, causal=True, pos_dtype=torch.int32, dq_mode="ordered",
         dq_writers=2, fresh=True),
    # LSE and delta rows loaded by the consumers (HOPPER_BWD_STATS_SMEM off; what a length that is not
    # a multiple of 4 takes); the variants above have the producer load them with Q and dO
    dict(D=128, dtype=torch.bfloat16, causal=True, dq_mode="ordered", dq_writers=2, fresh=True, stats_smem=False),
    dict(D=128, dtype=torch.float16, window=(64, 0), docs=True, causal=True, pos_dtype=torch.int32, dq_mode="ordered",
         dq_writers=2, stats_smem=False),
]
BACKWARD_VARIANTS += BACKWARD_WRITER_VARIANTS


def _name(variant: dict) -> str:
    return "-".join(f"{k}={variant[k]}" for k in variant).replace("torch.", "")


def _facts(kernel, grid) -> dict:
    ptx = kernel.asm["ptx"]
    return dict(
        wgmma="wgmma.mma_async" in ptx,
        tma=bool(re.search(r"cp\.async\.bulk\.tensor\.4d\.shared::\w+\.global", ptx)),
        tma_rows=bool(re.search(r"cp\.async\.bulk\.tensor\.3d\.shared::\w+\.global", ptx)),  # LSE/delta rows
        setmaxnreg="setmaxnreg" in ptx,
        overlap="wgmma.wait_group.sync.aligned 1" in ptx,
        # results stored as 16-bit values: no global store of 32-bit pairs or quads (float32 results,
        # aligned as here, go out as st.global.v2.b32; 16-bit ones as b16 or packed pairs, b32)
        store16=not re.search(r"st\.global\.v[24]\.[bf]32", ptx),
        tma_reduce="cp.reduce.async.bulk.tensor.4d.global.shared::cta.add" in ptx,
        tma_reduces=len(re.findall(r"cp\.reduce\.async\.bulk\.tensor", ptx)),
        tma_stores=len(re.findall(r"cp\.async\.bulk\.tensor\.4d\.global\.shared::cta", ptx)),
        bulk_complete=bool(re.search(r"cp\.async\.bulk\.wait_group\s+0;", ptx)),  # not .read: writes landed
        release=bool(re.search(r"(atom|red)\.global\.gpu\.release\.add", ptx)),
        num_warps=kernel.metadata.num_warps,
        shared=kernel.metadata.shared,
        grid=list(grid),
    )


def _spills(kernel) -> list:
    """ptxas' own report of the kernel's spills: [(store bytes, load bytes)]."""
    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as f:
            f.write(kernel.asm["ptx"])
        report = subprocess.run([get_ptxas(90).path, "-v", "--gpu-name=sm_90a", path, "-o", path + ".cubin"],
                                capture_output=True, text=True, check=True)
    return [(int(a), int(b)) for a, b in
            re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report.stdout + report.stderr)]


def _report_one(job: tuple) -> dict:
    kind, v = job
    out = {}
    if kind == "fwd":
        kernel, grid = compile_variant(**v)
        out["fwd-" + _name(v)] = _facts(kernel, grid)
        if v == FOLD_128 or v.get("row_bounds"):
            out["spills-fwd-" + _name(v)] = _spills(kernel)
        sass = sass_of(kernel.asm["cubin"])  # None without nvdisasm
        out["loops-fwd-" + _name(v)] = None if sass is None else key_loops(sass)
        return out
    for kind, (kernel, grid) in zip(("dkdv", "dq"), compile_backward(**v)):  # no dq where dQ is fused
        out[f"{kind}-" + _name(v)] = _facts(kernel, grid)
        if v.get("window") is None or v.get("row_bounds"):  # what the register tests check
            out[f"spills-{kind}-" + _name(v)] = _spills(kernel)
        sass = sass_of(kernel.asm["cubin"])  # None without nvdisasm
        out[f"loops-{kind}-" + _name(v)] = None if sass is None else key_loops(sass)
    return out


def report() -> dict:
    """Every variant compiled (on every core: forked workers), and what the tests check of it."""
    import multiprocessing

    jobs = [("fwd", v) for v in VARIANTS] + [("bwd", v) for v in BACKWARD_VARIANTS]
    with multiprocessing.get_context("fork").Pool(max(1, min(4, os.cpu_count() or 1))) as pool:
        parts = pool.map(_report_one, jobs, chunksize=1)
    return {k: v for part in parts for k, v in part.items()}


@pytest.fixture(scope="module")
def compiled() -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, __file__], capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("variant", VARIANTS, ids=_name)
def test_compiles_for_sm90(variant, compiled):
    facts = compiled["fwd-" + _name(variant)]
    assert facts["wgmma"]
    assert facts["tma"], "no TMA load"
    assert facts["setmaxnreg"], "the producer's registers are not handed to the consumers"
    block_m, _, warps, _ = variant.get("tiles", A.HOPPER_FWD_CONFIGS[variant["D"]])
    assert facts["num_warps"] == warps + 4  # + the producer's warpgroup
    if variant.get("split", 1) == 1:
        assert facts["overlap"], "the softmax no longer overlaps the PV wgmma"
    assert facts["shared"] <= SMEM_SM90
    assert facts["store16"] == (variant.get("out_dtype", torch.float32) != torch.float32)
    items = triton.cdiv(S, block_m) * B * H
    if variant.get("persistent"):
        assert facts["grid"] == [min(items, SMS)]
    else:
        assert facts["grid"] == [triton.cdiv(S, block_m), B * H]


@pytest.mark.parametrize("variant", BACKWARD_VARIANTS, ids=_name)
def test_backward_compiles_for_sm90(variant, compiled):
    D = variant["D"]
    dq_mode = variant.get("dq_mode", "kernel")
    kinds = ("dkdv", "dq") if dq_mode == "kernel" else ("dkdv",)
    assert ("dq-" + _name(variant) in compiled) == (dq_mode == "kernel"), "a dQ kernel where the dK/dV one adds dQ"
    for kind in kinds:
        facts = compiled[f"{kind}-" + _name(variant)]
        assert facts["wgmma"] and facts["tma"] and facts["setmaxnreg"], (kind, facts)
        assert facts["shared"] <= SMEM_SM90
        assert facts["store16"] == (variant.get("grad_dtype", torch.float32) != torch.float32), kind
    dkdv = compiled["dkdv-" + _name(variant)]
    # dQ by bulk reductions; in the fixed order each program waits for its own to land, then counts itself in
    assert dkdv["tma_reduce"] == (dq_mode != "kernel")
    assert dkdv["bulk_complete"] == dkdv["release"] == (dq_mode == "ordered")
    messages = variant.get("dq_writers", 1) * D * 4 // 128
    if dq_mode != "kernel":  # each writer's reduction: 128-byte-wide messages (the swizzle's width) of float32 rows
        assert dkdv["tma_reduces"] == messages
    # into a dQ not zeroed first, each writer's first addition into a query tile stores it, in as many messages
    assert dkdv["tma_stores"] == (messages if variant.get("fresh") else 0)
    fa3_routes = variant.get("smem_p") or dq_mode != "kernel"
    assert dkdv["tma_rows"] == (variant.get("stats_smem", True) and fa3_routes)  # LSE and delta rows by TMA
    configs = A.HOPPER_BWD_DKDV_SMEM_P_CONFIGS if variant.get("smem_p") or dq_mode != "kernel" else A.HOPPER_BWD_DKDV_CONFIGS
    assert dkdv["grid"] == [triton.cdiv(S, configs[D].block_n), B * HKV]
    if dq_mode == "kernel":
        assert compiled["dq-" + _name(variant)]["grid"] == [triton.cdiv(S, A.HOPPER_BWD_DQ_CONFIGS[D].block_m), B * H]


def test_registers_fit(compiled):
    """ptxas' own report: the consumers fit their registers at D = 128 (a word or two of spill,
    as some ptxas versions report for the fold, costs nothing measurable), and the backward
    kernels spill nothing in their unmasked and causal variants; a dK/dV program that adds dQ
    holds the dQ tile beside dK and dV and spills a few words at D = 128 (under 128 bytes)."""
    spills = compiled["spills-fwd-" + _name(FOLD_128)]
    assert spills and all(st <= 16 and ld <= 16 for st, ld in spills), spills
    for v in BACKWARD_VARIANTS:
        if v.get("window") is None:
            if v.get("dq_mode", "kernel") == "kernel":
                for kind in ("dkdv", "dq"):
                    assert compiled[f"spills-{kind}-" + _name(v)] == [[0, 0]], (kind, v)
            else:
                assert all(st < 128 and ld < 128 for st, ld in compiled["spills-dkdv-" + _name(v)]), v


def _loops(compiled, key):
    loops = compiled["loops-" + key]
    if loops is None:
        pytest.skip("no nvdisasm beside ptxas")
    assert loops, "no loop issuing a wgmma found in the SASS"
    return loops


@pytest.mark.parametrize("variant", ROW_BOUND_VARIANTS, ids=_name)
def test_row_bounds_forward_fits_registers(variant, compiled):
    """With each row's run of visible keys, a boundary tile loads nothing per tile: the masked
    forwards, per-head attributes included, spill nothing inside their loops over key tiles on
    Triton 3.6, the GPU machines' (the per-tile loads spilled there). The loops over fully
    visible tiles spill nothing on any Triton; on newer ones (3.9) ptxas reloads up to 27 words
    a step in the boundary loops at D = 128, where P's float32 carry holds 32 more registers
    (_fwd_hopper._kv_step). Outside the loops ptxas may keep a few words that only the epilogue
    reads (output addresses) in local memory: stored and loaded once a query tile."""
    loops = sorted(_loops(compiled, "fwd-" + _name(variant)), key=lambda loop: loop["instructions"])
    visible, boundary = loops[:len(loops) // 2], loops[len(loops) // 2:]  # a boundary loop adds the mask
    assert visible and all(loop["spills"] == 0 for loop in visible), loops
    limit = 0 if triton.__version__.startswith("3.6") else 32
    assert all(loop["spills"] <= limit for loop in boundary), loops
    assert all(st <= 64 and ld <= 64 for st, ld in compiled["spills-fwd-" + _name(variant)])


@pytest.mark.parametrize("variant", VARIANTS, ids=_name)
def test_forward_p_goes_to_the_product_as_packed(variant, compiled):
    """P is the register operand of the PV wgmma: converted to 16 bits right before it, it goes
    there as the registers the conversion packed. Carried through the loop as 16-bit values
    instead, it cost a byte permute (PRMT) of every register twice a step (_fwd_hopper._kv_step)."""
    assert all(loop["prmt"] == 0 for loop in _loops(compiled, "fwd-" + _name(variant)))


@pytest.mark.parametrize("variant", [v for v in BACKWARD_VARIANTS if v.get("window") is None and not v.get("causal")
                                     and v.get("dq_mode", "kernel") != "kernel"], ids=_name)
def test_backward_without_mask_walks_without_mask_code(variant, compiled):
    """A backward call without a mask (the ring's off-diagonal steps) masks nothing per step: its
    walks over query tiles hold no per-element select (P is 64 x 128 a step, 32 elements a
    thread) and no spill. Under a runtime flag ptxas predicated the masking into every step."""
    loops = _loops(compiled, "dkdv-" + _name(variant))
    assert len(loops) == 2, loops  # keys past Sk masked at every step, or nothing masked
    assert all(loop["spills"] == 0 for loop in loops)
    assert min(loop["fsel"] for loop in loops) < 32


@pytest.mark.parametrize("variant", BACKWARD_ROW_BOUND_VARIANTS, ids=_name)
def test_row_bounds_backward_fits_registers(variant, compiled):
    """The dK/dV program with row bounds holds no key attributes: the masked variants, documents
    and windows included, spill no more than the unmasked ones (under 128 bytes where it adds dQ)."""
    for st, ld in compiled["spills-dkdv-" + _name(variant)]:
        assert st < 128 and ld < 128, variant


@pytest.mark.parametrize("causal, window, docs, setting, expected", [
    (True, (4096, 0), False, "auto", True),      # a causal window: short walks
    (False, (8000, 8000), True, "auto", True),   # two-sided, with documents, span 16000
    (False, (16384, 1), False, "auto", False),   # span past HOPPER_BWD_ROW_BOUNDS_SPAN
    (True, (32768, 0), False, "auto", False),    # a long causal window walks far
    (True, None, False, "auto", False),          # causal alone
    (True, None, True, "auto", False),           # documents of any length
    (False, (4096, -1), False, "auto", False),   # unbounded on the right
    (True, None, True, "1", True),
    (True, (64, 0), False, "0", False),
])
def test_backward_row_bounds_rule(causal, window, docs, setting, expected, monkeypatch):
    """HOPPER_BWD_ROW_BOUNDS: by default only a window bounded on both sides (causal bounds the
    right) of a span up to HOPPER_BWD_ROW_BOUNDS_SPAN keys takes row bounds in the backward."""
    S = 64
    pos = torch.arange(S)
    doc = (pos // 16).to(torch.int32) if docs else None
    m = A._mask_args(pos, pos, causal, window, doc, doc, S, S, pos.device)
    monkeypatch.setattr(A, "HOPPER_BWD_ROW_BOUNDS", setting)
    assert A._hopper_bwd_row_bounds(m, causal) == expected
    monkeypatch.setattr(A, "HOPPER_BWD_ROW_BOUNDS", "yes")
    with pytest.raises(ValueError, match="RINGFLASH_HOPPER_BWD_ROW_BOUNDS"):
        A._hopper_bwd_row_bounds(m, causal)


def test_dq_writers_setting(monkeypatch):
    """HOPPER_BWD_DQ_WRITERS: 2 (the default) or 1; anything else is refused by name."""
    if "RINGFLASH_HOPPER_BWD_DQ_WRITERS" not in os.environ:
        assert A._dq_writers() == 2
    monkeypatch.setattr(A, "HOPPER_BWD_DQ_WRITERS", "1")
    assert A._dq_writers() == 1
    monkeypatch.setattr(A, "HOPPER_BWD_DQ_WRITERS", "3")
    with pytest.raises(ValueError, match="RINGFLASH_HOPPER_BWD_DQ_WRITERS must be 1 or 2"):
        A._dq_writers()


def test_not_taken_where_it_cannot_run():
    """On the CPU (and under the interpreter) forward() keeps the Triton kernels."""
    q = torch.randn(1, 8, 2, 64, dtype=torch.float16)
    m = A._mask_args(None, None, True, None, None, None, 8, 8, q.device)
    saved = A.HOPPER_FORWARD
    try:
        A.HOPPER_FORWARD = True
        assert not A._hopper_serves(q, m, True)
    finally:
        A.HOPPER_FORWARD = saved


@pytest.mark.parametrize("env,forward,head_dims,backward,bwd_dims,dq", [
    ({}, True, (128,), True, (64, 128), "ordered"),
    ({"RINGFLASH_HOPPER_FORWARD": "1"}, True, (64, 128), True, (64, 128), "ordered"),
    ({"RINGFLASH_HOPPER_FORWARD": "0"}, False, None, True, (64, 128), "ordered"),
    ({"RINGFLASH_HOPPER_BACKWARD": "1"}, True, (128,), True, (64, 128), "ordered"),
    ({"RINGFLASH_HOPPER_BACKWARD": "0"}, True, (128,), False, None, "ordered"),
    ({"RINGFLASH_HOPPER_BWD_DQ": "atomic"}, True, (128,), True, (64, 128), "atomic"),
])
def test_defaults_and_environment(env, forward, head_dims, backward, bwd_dims, dq):
    """By default an sm_90 GPU gets the Hopper forward (split consumers) and the Hopper backward
    (dQ added by the dK/dV programs in a fixed order) at D = 64 and 128; RINGFLASH_HOPPER_FORWARD /
    _BACKWARD =1 widens each to every head dim it has, =0 turns it off; RINGFLASH_HOPPER_BWD_DQ
    picks where dQ is computed."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("RINGFLASH_HOPPER")}
    code = ("import json; from ringflash.kernels import attention as A; print(json.dumps("
            "[A.HOPPER_FORWARD, list(A.HOPPER_FWD_HEAD_DIMS), A.HOPPER_BACKWARD, list(A.HOPPER_BWD_HEAD_DIMS),"
            " A.HOPPER_BWD_DQ, A.HOPPER_FWD_SPLIT]))")
    out = subprocess.run([sys.executable, "-c", code], env={**clean, **env}, capture_output=True, text=True,
                         check=True, cwd=Path(__file__).resolve().parents[1])
    got_fwd, got_dims, got_bwd, got_bwd_dims, got_dq, split = json.loads(out.stdout)
    assert got_fwd == forward and got_bwd == backward and split == 2 and got_dq == dq
    if forward:
        assert tuple(got_dims) == head_dims
    if backward:
        assert tuple(got_bwd_dims) == bwd_dims


@pytest.mark.parametrize("setting,causal,window,docs,want", [
    (None, False, (64, 0), False, True),  # a window without documents
    (None, True, (64, 32), False, True),
    (None, True, None, False, False),  # dense causal
    (None, False, None, False, False),  # dense full
    (None, False, None, True, False),  # documents
    (None, True, (64, 0), True, False),  # documents and a window
    (True, False, None, False, True),  # forced on
    (True, True, None, True, True),
    (False, False, (64, 0), False, False),  # forced off
])
def test_persistent_forward_rule(setting, causal, window, docs, want):
    """HOPPER_FWD_PERSISTENT = None (the default) takes the persistent forward for windows without
    documents and the per-tile grid otherwise; True and False force it."""
    q, k, v, m, masked = _inputs(128, torch.bfloat16, causal, window, docs, torch.int64)
    out = torch.empty(B, S, H, 128, dtype=torch.float32)
    lse = torch.empty(B, H, S, dtype=torch.float32)
    ranges = _ranges(masked, triton.cdiv(S, A.HOPPER_FWD_CONFIGS[128].block_m))
    saved = A.HOPPER_FWD_SPLIT, A.HOPPER_FWD_PINGPONG, A.HOPPER_FWD_PERSISTENT, A._sm_count
    A.HOPPER_FWD_SPLIT, A.HOPPER_FWD_PINGPONG, A.HOPPER_FWD_PERSISTENT = 2, False, setting
    A._sm_count = lambda device: SMS  # a CPU tensor has no SM count
    try:
        grid, _args, constexprs, _warps = A._hopper_launch(q, k, v, m, causal, 0.125, out, lse, False, ranges)
    finally:
        A.HOPPER_FWD_SPLIT, A.HOPPER_FWD_PINGPONG, A.HOPPER_FWD_PERSISTENT, A._sm_count = saved
    assert constexprs["PERSISTENT"] is want
    assert len(grid) == (1 if want else 2)


def test_stats_smem_choice(monkeypatch):
    """HOPPER_BWD_STATS_SMEM serves FA3's routes with LSE and delta rows TMA can address: float32,
    contiguous, a length that is a multiple of 4 (16-byte rows); other calls load them as before."""
    if "RINGFLASH_HOPPER_BWD_STATS_SMEM" not in os.environ:
        assert A.HOPPER_BWD_STATS_SMEM  # on by default
    lse = torch.empty(2, 4, 1024)
    monkeypatch.setattr(A, "HOPPER_BWD_DQ", "ordered")
    monkeypatch.setattr(A, "HOPPER_BWD_STATS_SMEM", False)
    assert not A._stats_smem(lse, lse)
    monkeypatch.setattr(A, "HOPPER_BWD_STATS_SMEM", True)
    assert A._stats_smem(lse, lse)
    odd = torch.empty(2, 4, 1023)
    assert not A._stats_smem(odd, odd)
    assert not A._stats_smem(lse, torch.empty(2, 4, 1025)[..., 1:])  # not contiguous
    monkeypatch.setattr(A, "HOPPER_BWD_DQ", "kernel")  # the transposed routes: not served
    assert not A._stats_smem(lse, lse)


@pytest.mark.parametrize("tiles,split", [((128, 128, 12, 2), 2), ((256, 128, 16, 2), 2), ((192, 64, 12, 3), 1),
                                         ((64, 128, 4, 2), 2)])
def test_forward_config_must_suit_the_partitions(tiles, split):
    """A forward launch config whose rows do not come to 64 a consumer warpgroup, or that has more
    warpgroups than the consumer partitions serve, is refused with a clear error before any launch."""
    with pytest.raises(ValueError, match="64 query rows"):
        compile_variant(64, torch.bfloat16, causal=True, split=split, tiles=tiles)


if __name__ == "__main__":
    print(json.dumps(report()))
