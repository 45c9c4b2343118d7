#!/usr/bin/env bash
# One call on a one-GPU machine (H100/H200): the Hopper kernels' checks, then the kernel and mask
# benchmarks with them beside the Triton kernels, SDPA and FlexAttention, in the same run.
#   OUT=results_dir bash benchmarks/onegpu.sh [seqlens...]
# Writes smoke.log, tests.log, kernels.jsonl, bench_kernels.log, masks.jsonl, bench_masks.log under
# $OUT. A smoke call of each Hopper kernel runs first under a short timeout: a wrong barrier phase
# hangs rather than fails. TESTS=0 skips the GPU tests; MASKS=0 the mask benchmark.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/ringflash-out}; mkdir -p "$OUT"
SEQLENS=${*:-8k 16k}
echo "== $(python3 -c 'import torch; print(torch.cuda.get_device_name())'); torch $(python3 -c 'import torch; print(torch.__version__)'), triton $(python3 -c 'import triton; print(triton.__version__)')"

echo "== smoke: each Hopper kernel once"
timeout ${SMOKE_TIMEOUT:-120} python3 - <<'PY' 2>&1 | tee "$OUT/smoke.log" | tail -8
import torch
from ringflash import kernels, reference
from ringflash.kernels import attention as A

A.HOPPER_FORWARD = A.HOPPER_BACKWARD = True
q, k, v, do = (torch.randn(2, 1000, 4, 128, device="cuda", dtype=torch.bfloat16) for _ in range(4))
ref, ref_lse = reference.forward(q.double(), k.double(), v.double(), causal=True)
for split, pingpong in ((1, False), (2, False), (2, True)):
    A.HOPPER_FWD_SPLIT, A.HOPPER_FWD_PINGPONG = split, pingpong
    o, l = kernels.forward(q, k, v, causal=True)
    torch.cuda.synchronize()
    print(f"forward (split {split}, ping-pong {pingpong}): max |O - ref| {(o - ref).abs().max().item():.3e}", flush=True)
delta = reference.backward_delta(ref, do.double())
g = kernels.backward(do, q, k, v, ref_lse.float(), delta.float(), causal=True)
torch.cuda.synchronize()
want = reference.backward(do.double(), q.double(), k.double(), v.double(), ref_lse, delta, causal=True)
for name, x, w in zip(("dq", "dk", "dv"), g, want):
    print(f"backward {name}: rel err {((x.double() - w).norm() / w.norm()).item():.3e}", flush=True)
PY
rc=${PIPESTATUS[0]}
HOPPER_IMPLS="ringflash_hopper ringflash_hopper_split ringflash_hopper_pingpong"
MASK_IMPLS="ringflash ringflash_hopper flex"
if [ "$rc" != 0 ]; then
  # A hang would eat every later timeout: leave the Hopper kernels out of the rest.
  echo "SMOKE FAILED OR HUNG (exit $rc; 124: timed out): see $OUT/smoke.log; the rest runs without them"
  TESTS=0 HOPPER_IMPLS="" MASK_IMPLS="ringflash flex"
fi

if [ "${TESTS:-1}" = 1 ]; then
  echo "== GPU tests of the Hopper kernels"
  timeout ${TEST_TIMEOUT:-360} python3 -m pytest -m gpu tests/test_kernels_hopper_gpu.py -q -x -p no:cacheprovider \
    > "$OUT/tests.log" 2>&1
  echo "exit $?" >> "$OUT/tests.log"; tail -15 "$OUT/tests.log"
fi

echo "== kernels: $SEQLENS"
timeout ${BENCH_TIMEOUT:-300} python3 benchmarks/bench_kernels.py --seqlens $SEQLENS --head-dims 128 64 \
  --impls ringflash $HOPPER_IMPLS sdpa_flash sdpa_cudnn \
  --out "$OUT/kernels.jsonl" > "$OUT/bench_kernels.log" 2>&1
tail -30 "$OUT/bench_kernels.log"

if [ "${MASKS:-1}" = 1 ]; then
  echo "== masks at 32k: documents and a window, beside FlexAttention"
  timeout ${MASKS_TIMEOUT:-300} python3 benchmarks/bench_masks.py --seqlens 32k --impls $MASK_IMPLS \
    --out "$OUT/masks.jsonl" > "$OUT/bench_masks.log" 2>&1
  tail -20 "$OUT/bench_masks.log"
fi
