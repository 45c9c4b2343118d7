#!/usr/bin/env bash
# One H200, torch 2.11, Triton 3.6, bf16, causal, 32 query heads over 32, 8 or 1 K/V heads:
# the backward with a query-head group split over several dK/dV programs (split2, the default
# DKDV_PROGRAMS_PER_SM = 2) and without (split0).
A="--seqlens 4k 8k 16k --head-dims 128 64 --heads 32 --kv-heads 32 8 1 --causal true --modes bwd fwdbwd --impls ringflash sdpa_flash"
python benchmarks/bench_kernels.py $A --dkdv-programs-per-sm 0 --out kernels_h200_split0.jsonl
python benchmarks/bench_kernels.py $A --dkdv-programs-per-sm 2 --out kernels_h200_split2.jsonl
