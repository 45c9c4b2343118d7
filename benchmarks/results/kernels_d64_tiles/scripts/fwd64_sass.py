"""The D = 64 forward's walks over tiles in SASS (sm_90a, compiled on the CPU) for each launch
config of fwd_tiles.py: instructions a step and local loads/stores (spills) a step, by loop, in
code order: a pair a consumer partition (three for 12 warps, two for 8), the boundary walk then the
unmasked one. With three partitions one pair differs from the other two: that partition has the
registers the other two leave (HOPPER_CONSUMER_REGS), not its own budget.

    PYTHONPATH=. python benchmarks/results/kernels_d64_tiles/scripts/fwd64_sass.py
"""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.join(HERE, "..", "..", "..", "..")
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests"), os.path.join(ROOT, "benchmarks"), os.path.join(HERE, "..")]
import torch  # noqa: E402
import triton  # noqa: E402

import sass_loops as SL  # noqa: E402
import test_kernels_hopper as helpers  # noqa: E402
from fwd_tiles import VARIANTS, use  # noqa: E402

helpers.B, helpers.S, helpers.H, helpers.HKV = 1, 8192, 32, 32
helpers._compile = SL.compile_as_launched
print(f"Triton {triton.__version__}, B = 1, S = 8k, H = 32, D = 64, bf16, O in bf16; per loop: instructions/spills a step")
for name, cfg, regs in VARIANTS:
    use(cfg, regs)
    for causal in (False, True):
        kernel = helpers.compile_variant(D=64, dtype=torch.bfloat16, split=2, out_dtype=torch.bfloat16, causal=causal,
                                         row_bounds=causal)[0]
        loops = SL.key_loops(SL.sass_of(kernel.asm["cubin"]))
        print(f"{name:18s} {'causal' if causal else 'full  '} shared {kernel.metadata.shared:6d} B  "
              + "  ".join(f"{x['instructions']}/{x['spills']}" for x in loops), flush=True)
