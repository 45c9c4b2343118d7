#!/usr/bin/env bash
# call 1: the kernel table with the kernels of 2f1618c beside this tree's, then the Hopper GPU suite
set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
nvidia-smi -L; python3 -c 'import torch, triton; print(torch.__version__, triton.__version__)'
timeout 280 python3 benchmarks/bench_kernels.py --seqlens 8k 16k --head-dims 128 64 --causal both \
  --modes fwd bwd fwdbwd --impls ringflash_prev ringflash_default sdpa_cudnn sdpa_flash flex \
  --prev .old/ringflash/kernels --time-budget 200 --out $OUT/kernels.jsonl > $OUT/bench_kernels.log 2>&1
echo "bench exit $?"; tail -50 $OUT/bench_kernels.log
OUT=$OUT N=8 TEST_TIMEOUT=250 bash benchmarks/gpu_tests.sh tests/test_kernels_hopper_gpu.py > $OUT/tests.log 2>&1
echo "tests exit $?"; cat $OUT/tests.log
