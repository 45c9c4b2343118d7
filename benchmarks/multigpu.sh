#!/usr/bin/env bash
# One call on a multi-GPU machine: the multi-GPU tests, then the ring benchmark.
#   OUT=results_dir bash benchmarks/multigpu.sh [seqlens...]
# Writes ring_errors.jsonl, tests.log, ring_<gpu>x<n>.jsonl and bench.log under $OUT.
# Optional: TRAIN_ARGS="..." runs launch/train.py with those flags on all GPUs; LONG=2m times
# one causal fwd+bwd at that length (striped, Triton, Hkv 32; ring_<gpu>x<n>_long.jsonl).
# TESTS=0 skips the tests (a benchmark-only call when device time is short). BENCH_ARGS="..." adds
# flags to the ring benchmark, e.g. "--engines triton cudnn --transports nccl copy_engine", or
# "--ulysses 1 2 4 --ulysses-chunks 1 2 --layouts zigzag --causal causal --modes fwdbwd" (Ulysses x ring splits).
# MASKS="128k 512k" runs benchmarks/bench_ring_masks.py at those lengths (packed documents and a
# window beside dense causal and torch CP on a BlockMask; ring_masks_<gpu>x<n>.jsonl); BENCH=0
# skips the dense ring benchmark. SPARSE="128k" runs benchmarks/bench_ring_sparse.py at those lengths
# (hash buckets, QK-dropping and a block pattern beside dense causal per layout;
# ring_sparse_<gpu>x<n>.jsonl; SPARSE_ARGS="..." adds flags).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/ringflash-out}; mkdir -p "$OUT"
N=$(python3 -c 'import torch; print(torch.cuda.device_count())')
GPU=$(python3 -c 'import torch; print(torch.cuda.get_device_name().replace("NVIDIA ","").replace(" ","_"))')
SEQLENS=${*:-32k 128k}
echo "== $N x $GPU; torch $(python3 -c 'import torch; print(torch.__version__)'), triton $(python3 -c 'import triton; print(triton.__version__)')"

for n in 2 $N; do
  [ "${TESTS:-1}" = 1 ] && [ "$n" -le "$N" ] || continue
  echo "== multi-GPU tests on $n GPUs"
  RINGFLASH_REPORT=$OUT/ring_errors.jsonl timeout ${TEST_TIMEOUT:-300} torchrun --standalone --nproc-per-node $n \
    -m pytest tests/test_ring_gpu.py -m multigpu -q -x -p no:cacheprovider 2>&1 | tee -a $OUT/tests.log | tail -15
  [ "$n" -eq "$N" ] && break
done

if [ "${TESTS:-1}" = 1 ]; then
  echo "== module tests on $N GPUs"
  timeout ${TEST_TIMEOUT:-300} torchrun --standalone --nproc-per-node $N -m pytest tests/test_nn_gpu.py -m multigpu -q -x -p no:cacheprovider 2>&1 | tee -a $OUT/tests.log | tail -15
fi

if [ -n "${TRAIN_ARGS:-}" ]; then
  echo "== training job on $N GPUs: $TRAIN_ARGS"
  timeout ${TRAIN_TIMEOUT:-200} torchrun --standalone --nproc-per-node $N launch/train.py --out /tmp/train $TRAIN_ARGS 2>&1 | tail -3
  cp /tmp/train/metrics.jsonl $OUT/train_metrics.jsonl 2>/dev/null
fi

if [ "${BENCH:-1}" = 1 ]; then
  echo "== ring benchmark on $N GPUs: $SEQLENS"
  timeout ${BENCH_TIMEOUT:-270} torchrun --standalone --nproc-per-node $N benchmarks/bench_ring.py \
    --seqlens $SEQLENS --out $OUT/ring_${GPU}x${N}.jsonl ${BENCH_ARGS:-} 2>&1 | tee $OUT/bench.log | grep -v '^{'
fi

# ring_bench NAME SEQLENS TIMEOUT EXTRA_ARGS: benchmarks/bench_ring_NAME.py on every GPU.
ring_bench() {
  echo "== $1 ring benchmark on $N GPUs: $2"
  timeout "$3" torchrun --standalone --nproc-per-node $N benchmarks/bench_ring_$1.py \
    --seqlens $2 --out $OUT/ring_$1_${GPU}x${N}.jsonl $4 2>&1 | tee $OUT/bench_$1.log | grep -v '^{'
}
[ -z "${MASKS:-}" ] || ring_bench masks "$MASKS" "${MASKS_TIMEOUT:-400}" "${MASKS_ARGS:-}"
[ -z "${SPARSE:-}" ] || ring_bench sparse "$SPARSE" "${SPARSE_TIMEOUT:-400}" "${SPARSE_ARGS:-}"

if [ -n "${LONG:-}" ]; then
  echo "== one causal layer at $LONG tokens on $N GPUs"
  timeout ${LONG_TIMEOUT:-400} torchrun --standalone --nproc-per-node $N benchmarks/bench_ring.py \
    --seqlens $LONG --impls ringflash --layouts striped --kv-heads 32 --causal causal --modes fwdbwd \
    --warmup 1 --iters 1 --out $OUT/ring_${GPU}x${N}_long.jsonl 2>&1 | grep -v '^{' | tail -3
fi
