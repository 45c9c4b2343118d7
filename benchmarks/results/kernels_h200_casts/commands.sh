#!/usr/bin/env bash
# One H200 call: the local-kernel table with ringflash's casts to bf16 timed (README kernel
# table), then the merge-pass bandwidth with medians.
set -u
export PYTHONPATH=. PYTHONUNBUFFERED=1
L=$OUT/all.log
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee $L
timeout 420 python benchmarks/bench_kernels.py --seqlens 8k 16k 32k 64k --head-dims 128 \
  --time-budget 300 --plot --out $OUT/kernels_h200_casts.jsonl 2>&1 | grep -v Warning | tee -a $L
timeout 90 python benchmarks/bench_merge.py --out $OUT/merge_h200.jsonl 2>&1 | tail -12 | tee -a $L
