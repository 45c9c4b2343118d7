#!/usr/bin/env bash
# One H200, torch 2.11, Triton 3.6, bf16, causal, 16 query heads over 16 or 4 K/V heads.
# kernels_h200_gqa_d64.jsonl (and .png): with the 64 x 64 grouped dK/dV tiles.
python benchmarks/bench_kernels.py --seqlens 8k 32k --head-dims 64 128 --heads 16 --kv-heads 16 4 \
    --causal true --out kernels_h200_gqa_d64.jsonl --plot
# kernels_h200_gqa_d64_sweep.jsonl: the grouped dK/dV tile sweep at S = 32k, D = 64, 4 K/V heads,
# one row per cfg = (BLOCK_M, BLOCK_N, num_warps, num_stages) with its backward TFLOP/s
# (the sweep script itself is not kept).
