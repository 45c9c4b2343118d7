"""What ptxas makes of the Hopper kernels' walks over tiles: each loop's instructions a step, from
the SASS, on the CPU (no GPU: Triton compiles for sm_90a with its own ptxas).

    python benchmarks/sass_loops.py [--root TREE] [--out loops.json]

The default forward and backward variants (below) are compiled as the launchers would call them
on the benchmarks' shape (B = 1, S = 8k, H = 32, bf16; ``--kv-heads`` for grouped queries), with
the launch helpers of ``TREE/tests/test_kernels_hopper.py`` and ``TREE``'s package (default: this
tree; another tree, e.g. ``git archive <rev> | tar -x -C /tmp/old``, gives the numbers before a
change) and the specialisation Triton's launcher applies (integers equal to 1 become constants;
integers and addresses divisible by 16 are marked so). Each is disassembled (``nvdisasm``, shipped
with Triton), and for every innermost loop that issues a wgmma the table gives its instructions a
step, its local loads and stores (spills), its byte permutes (PRMT) and its selects (FSEL).
Counts, not times: what a step costs on the GPU also depends on latencies, the tensor cores and
the other warps.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def sass_of(cubin: bytes) -> str | None:
    """The SASS of a cubin (nvdisasm beside Triton's ptxas), or None where there is no nvdisasm."""
    from triton.backends.nvidia.compiler import get_ptxas

    nvdisasm = os.path.join(os.path.dirname(get_ptxas(90).path), "nvdisasm")
    if not os.path.exists(nvdisasm):
        return None
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        return subprocess.run([nvdisasm, "-c", path], capture_output=True, text=True, check=True).stdout


def key_loops(sass: str) -> list:
    """The innermost loops of the SASS that issue a wgmma (a kernel's walks over tiles), in code
    order, each as {"instructions", "spills" (local loads and stores), "prmt", "fsel"}. A loop is
    a backward branch to a label; the branch back from a barrier wait's retry loop (placed after
    the code, right behind that retry) is not one."""
    ins, at, label = [], {}, None
    for line in sass.splitlines():
        m = re.match(r"\s*\.(L_x_\d+):", line)
        if m:
            label = m.group(1)
            continue
        m = re.match(r"\s*/\*([0-9a-f]+)\*/\s+(.*?)\s*;", line)
        if m:
            ins.append((int(m.group(1), 16), m.group(2)))
            if label:
                at[label], label = ins[-1][0], None
    branch = re.compile(r"(@!?U?P\w+\s+)?BRA\s+`?\(?\.?(L_x_\d+)")
    loops = []
    for i, (a, text) in enumerate(ins):
        m = branch.match(text)
        if not m or at.get(m.group(2), a) >= a:
            continue
        retry = branch.match(ins[i - 1][1]) if i else None
        if (not m.group(1) and retry and retry.group(1)
                and ins[max(i - 4, 0)][0] <= at.get(retry.group(2), -1) <= ins[i - 1][0]):
            continue
        body = [t for b, t in ins if at[m.group(2)] <= b <= a]
        if any(t.startswith("HGMMA") for t in body):
            loops.append((at[m.group(2)], a, body))
    inner = [body for lo, hi, body in loops
             if not any(lo <= l2 and h2 <= hi and (l2, h2) != (lo, hi) for l2, h2, _ in loops)]
    ops = [[re.sub(r"^@!?U?P\w+\s+", "", t).split(".")[0].split()[0] for t in body] for body in inner]
    return [dict(instructions=len(o), spills=sum(x in ("STL", "LDL") for x in o), prmt=o.count("PRMT"),
                 fsel=o.count("FSEL")) for o in ops]


def compile_as_launched(kernel, launch):
    """``kernel`` compiled for sm_90a with the launcher's arguments ``launch`` (grid, args,
    constexprs, num_warps) specialised as ``kernel[grid](*args, ...)`` would specialise them."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.runtime.jit import native_specialize_impl

    grid, args, constexprs, num_warps = launch
    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    names = list(kernel.arg_names)
    signature, attrs, constants = {}, {}, dict(constexprs)
    for i, (name, arg) in enumerate(zip(names, args)):
        param = kernel.params[i]
        kind, attr = native_specialize_impl(backend, arg, False, not param.do_not_specialize,
                                            not param.do_not_specialize_on_alignment)
        signature[name] = kind
        if kind == "constexpr":
            constants[name] = arg
        elif isinstance(attr, str):
            attrs[(i,)] = backend.parse_attr(attr)
    signature.update({name: "constexpr" for name in names[len(args):]})
    src = GluonASTSource(kernel, signature, constexprs=constants, attrs=attrs)
    return triton.compile(src, target=target, options=dict(num_warps=num_warps, enable_fp_fusion=True)), grid


def variants(torch):
    """(name, kind, keyword arguments of the compile helper): the defaults of the launchers at
    D = 128 (and the forward at 64), bf16."""
    bf16 = torch.bfloat16
    fwd = dict(dtype=bf16, split=2, out_dtype=bf16)
    bwd = dict(dtype=bf16, dq_mode="ordered", dq_writers=2, fresh=True)
    return [
        ("fwd D=128 full", "fwd", dict(D=128, **fwd)),
        ("fwd D=128 causal", "fwd", dict(D=128, causal=True, row_bounds=True, **fwd)),
        ("fwd D=128 window+documents", "fwd", dict(D=128, causal=True, window=(64, 0), docs=True, row_bounds=True,
                                                   **fwd)),
        ("fwd D=64 causal", "fwd", dict(D=64, causal=True, row_bounds=True, **fwd)),
        ("bwd D=128 full", "bwd", dict(D=128, **bwd)),
        ("bwd D=128 causal", "bwd", dict(D=128, causal=True, **bwd)),
        ("bwd D=128 window+documents", "bwd", dict(D=128, causal=True, window=(64, 0), docs=True, row_bounds=True,
                                                   **bwd)),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", default=ROOT, help="the tree whose package and compile helpers are used")
    ap.add_argument("--out", default=None, help="JSON file of the rows")
    ap.add_argument("--seqlen", type=int, default=8192)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=None, help="default: --heads")
    args = ap.parse_args()
    root = os.path.abspath(args.root)
    sys.path[:0] = [root, os.path.join(root, "tests")]
    import torch
    import triton

    import test_kernels_hopper as helpers

    # the helpers' inputs at the benchmarks' shape, compiled as launched
    helpers.B, helpers.S, helpers.H, helpers.HKV = 1, args.seqlen, args.heads, args.kv_heads or args.heads
    helpers._compile = compile_as_launched
    rows = []
    print(f"Triton {triton.__version__}, tree {root}, B = 1, S = {helpers.S}, H = {helpers.H}, Hkv = {helpers.HKV}")
    print(f"{'variant':30s} {'loop':>4s} {'instructions':>12s} {'spills':>6s} {'PRMT':>5s} {'FSEL':>5s}")
    for name, kind, kw in variants(torch):
        if kind == "fwd":
            kernels = [helpers.compile_variant(**kw)[0]]
        else:
            kernels = [k for k, _grid in helpers.compile_backward(**kw)][:1]  # the dK/dV program
        sass = sass_of(kernels[0].asm["cubin"])
        if sass is None:
            sys.exit("no nvdisasm beside Triton's ptxas")
        for i, loop in enumerate(key_loops(sass)):
            rows.append(dict(variant=name, loop=i, triton=triton.__version__, root=root, S=helpers.S, H=helpers.H,
                             Hkv=helpers.HKV, **loop))
            print(f"{name:30s} {i:4d} {loop['instructions']:12d} {loop['spills']:6d} {loop['prmt']:5d} "
                  f"{loop['fsel']:5d}", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
