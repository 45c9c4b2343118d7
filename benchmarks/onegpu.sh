#!/usr/bin/env bash
# One call on a one-GPU machine (H100/H200): the Hopper kernels' checks, then the kernel and mask
# benchmarks with them beside the Triton kernels, SDPA and FlexAttention, in the same run.
#   OUT=results_dir bash benchmarks/onegpu.sh [seqlens...]
# Writes smoke.log, tests.log (and tests_shard*.log), kernels.jsonl, bench_kernels.log, masks.jsonl, bench_masks.log under
# $OUT. A smoke call of each Hopper kernel runs first under a short timeout: a wrong barrier phase
# hangs rather than fails. TESTS=0 skips the GPU tests; MASKS=0 the mask benchmark; SPARSE=1 adds
# the sparse modes' kernel benchmark (sparse.jsonl) and, with PAPER_DIR=dir holding the paper's
# hsparse_attn.py and qksparse_attn.py, the comparison with its kernels (sparse_paper.jsonl).
# PROGRAM_COST=1 adds bench_program_cost.py (program_cost.jsonl): masked calls' per-tile rate and
# fixed cost, with the persistent Hopper forward when its smoke check passed. PREV=dir times another
# tree's kernels package beside this tree's in both benchmarks (ringflash_prev against
# ringflash_default; e.g. `git archive <rev> ringflash/kernels | tar -x -C .old`, then
# PREV=.old/ringflash/kernels: an untracked folder travels with the working tree).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/ringflash-out}; mkdir -p "$OUT"
SEQLENS=${*:-8k 16k}
echo "== $(python3 -c 'import torch; print(torch.cuda.get_device_name())'); torch $(python3 -c 'import torch; print(torch.__version__)'), triton $(python3 -c 'import triton; print(triton.__version__)')"

echo "== smoke: each Hopper kernel variant, each in its own process under a timeout"
: > "$OUT/smoke.log"
OK=""
for variant in fwd fwd_split fwd_pingpong fwd_persistent bwd bwd_smem_p bwd_atomic_dq bwd_ordered_dq bwd_ordered_dq_2w; do
  if timeout ${SMOKE_TIMEOUT:-60} python3 benchmarks/hopper_smoke.py $variant --case causal >> "$OUT/smoke.log" 2>&1; then
    OK="$OK $variant"
    for case in full masks gqa; do
      timeout ${SMOKE_TIMEOUT:-60} python3 benchmarks/hopper_smoke.py $variant --case $case >> "$OUT/smoke.log" 2>&1 \
        || { echo "$variant $case: FAILED OR HUNG (exit $?; 124: timed out)" >> "$OUT/smoke.log"; break; }
    done
  else
    echo "$variant causal: FAILED OR HUNG (exit $?; 124: timed out)" >> "$OUT/smoke.log"
  fi
done
grep -v "^\s" "$OUT/smoke.log" | grep -i "err\|fail\|error" | tail -40
passed() { case "$OK " in *" $1 "*) return 0;; esac; return 1; }  # that variant's smoke check passed (exact name)
HOPPER_IMPLS=""
passed fwd && HOPPER_IMPLS="ringflash_hopper"
passed fwd_split && HOPPER_IMPLS="$HOPPER_IMPLS ringflash_hopper_split"
passed fwd_pingpong && HOPPER_IMPLS="$HOPPER_IMPLS ringflash_hopper_pingpong"
passed fwd_persistent && HOPPER_IMPLS="$HOPPER_IMPLS ringflash_hopper_persistent"
passed bwd_smem_p && HOPPER_IMPLS="$HOPPER_IMPLS ringflash_hopper_smem_p"
# the Hopper backward with one dQ writer (in key-tile order, and unordered) beside the Triton backward;
# "ringflash" is the default (two writers)
passed bwd_ordered_dq && HOPPER_IMPLS="$HOPPER_IMPLS ringflash_hopper_ordered_dq ringflash_triton_bwd"
passed bwd_atomic_dq && HOPPER_IMPLS="$HOPPER_IMPLS ringflash_hopper_atomic_dq"
# two dQ writers (HOPPER_BWD_DQ_WRITERS = 2), ordered and unordered, where their smoke check passed
passed bwd_ordered_dq_2w && HOPPER_IMPLS="$HOPPER_IMPLS ringflash_hopper_ordered_dq_2w ringflash_hopper_atomic_dq_2w"
MASK_IMPLS="ringflash flex"
passed fwd && MASK_IMPLS="ringflash ringflash_triton ringflash_hopper flex"
passed fwd_persistent && MASK_IMPLS="$MASK_IMPLS ringflash_hopper_persistent"
passed bwd_ordered_dq && MASK_IMPLS="$MASK_IMPLS ringflash_hopper_ordered_dq ringflash_one_dq_writer"
passed bwd_atomic_dq && MASK_IMPLS="$MASK_IMPLS ringflash_hopper_atomic_dq"
# A hang would eat every later timeout: the GPU tests run only when every variant came back.
MODES="fwd bwd fwdbwd"
case "$OK" in *bwd*) ;; *) TESTS=0 MODES="fwd";; esac

if [ "${TESTS:-1}" = 1 ]; then
  echo "== GPU tests of the Hopper kernels"
  # In 4 processes: the suite compiles many variants and took over 330 s in one.
  OUT="$OUT" N=${TEST_SHARDS:-4} TEST_TIMEOUT=${TEST_TIMEOUT:-360} bash benchmarks/gpu_tests.sh tests/test_kernels_hopper_gpu.py \
    --maxfail=10 > "$OUT/tests.log" 2>&1
  echo "exit $?" >> "$OUT/tests.log"; tail -15 "$OUT/tests.log"
fi

PREV_ARGS=""
PREV_IMPLS=""
[ -n "${PREV:-}" ] && { PREV_ARGS="--prev $PREV"; PREV_IMPLS="ringflash_default ringflash_prev"; }
echo "== kernels: $SEQLENS"
timeout ${BENCH_TIMEOUT:-300} python3 benchmarks/bench_kernels.py --seqlens $SEQLENS --head-dims 128 64 \
  --impls $PREV_IMPLS ringflash $HOPPER_IMPLS sdpa_flash sdpa_cudnn --modes $MODES $PREV_ARGS \
  --out "$OUT/kernels.jsonl" > "$OUT/bench_kernels.log" 2>&1
tail -30 "$OUT/bench_kernels.log"

if [ "${MASKS:-1}" = 1 ]; then
  echo "== masks at 32k: documents and a window, beside FlexAttention"
  timeout ${MASKS_TIMEOUT:-300} python3 benchmarks/bench_masks.py --seqlens 32k --impls $MASK_IMPLS $PREV_ARGS \
    --out "$OUT/masks.jsonl" > "$OUT/bench_masks.log" 2>&1
  tail -20 "$OUT/bench_masks.log"
fi

if [ "${PROGRAM_COST:-0}" = 1 ]; then
  echo "== masked calls' fixed cost per program (windows, equal documents), with the persistent Hopper forward"
  PERSIST=""
  passed fwd_persistent && PERSIST="--persistent"
  timeout ${PROGRAM_COST_TIMEOUT:-300} python3 benchmarks/bench_program_cost.py $PERSIST --out "$OUT" \
    > "$OUT/bench_program_cost.log" 2>&1
  tail -40 "$OUT/bench_program_cost.log"
fi

if [ "${SPARSE:-0}" = 1 ]; then
  echo "== sparse modes against dense causal"
  timeout ${SPARSE_TIMEOUT:-300} python3 benchmarks/bench_sparse.py --layouts --out "$OUT/sparse.jsonl" \
    > "$OUT/bench_sparse.log" 2>&1
  tail -30 "$OUT/bench_sparse.log"
  if [ -n "${PAPER_DIR:-}" ]; then
    timeout ${SPARSE_TIMEOUT:-300} python3 benchmarks/bench_sparse_paper.py --paper-dir "$PAPER_DIR" \
      --out "$OUT/sparse_paper.jsonl" > "$OUT/bench_sparse_paper.log" 2>&1
    tail -20 "$OUT/bench_sparse_paper.log"
  fi
fi
