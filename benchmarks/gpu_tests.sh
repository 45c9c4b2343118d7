#!/usr/bin/env bash
# GPU test files in N pytest processes at once on one machine: the GPU suites spend most of their
# time compiling kernel variants, one after the other within a process, and the GPU machines have
# many cores. Each process takes every N-th test (RINGFLASH_TEST_SHARD, tests/conftest.py).
#   OUT=dir N=4 bash benchmarks/gpu_tests.sh tests/test_kernels_hopper_gpu.py [more files, pytest args]
# Writes tests_shard<i>.log under $OUT; exits non-zero if any shard failed or timed out.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}." PYTHONUNBUFFERED=1  # a PYTHONPATH given first: another tree's package
OUT=${OUT:-/tmp/ringflash-out}; mkdir -p "$OUT"
N=${N:-4}
[ $# -gt 0 ] || { echo "usage: [OUT=dir] [N=4] bash benchmarks/gpu_tests.sh TEST_FILE... [pytest args]" >&2; exit 2; }
pids=()
for i in $(seq 0 $((N - 1))); do
  RINGFLASH_TEST_SHARD=$i/$N timeout "${TEST_TIMEOUT:-500}" python3 -m pytest -m gpu -q -p no:cacheprovider "$@" \
    > "$OUT/tests_shard$i.log" 2>&1 &
  pids+=($!)
done
rc=0
for i in "${!pids[@]}"; do
  wait "${pids[$i]}"; code=$?
  [ $code = 0 ] || rc=1
  echo "shard $i/$N (exit $code; 124: timed out): $(tail -1 "$OUT/tests_shard$i.log")"
done
grep -h "^FAILED\|^ERROR" "$OUT"/tests_shard*.log | head -40
exit $rc
