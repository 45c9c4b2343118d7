#!/usr/bin/env bash
# One H200, torch 2.11, Triton 3.6, bf16, S = 16k, 16 query heads over 16 or 4 K/V heads.
# kernels_h200_headdims_gqa.jsonl: head dims 32-256, B = 2, ringflash beside SDPA flash
# (its D = 256 rows predate the D = 256 tiles below).
python benchmarks/bench_kernels.py --seqlens 16k --head-dims 32 64 96 128 256 --heads 16 --kv-heads 16 4 \
    --batch 2 --impls ringflash sdpa_flash --out kernels_h200_headdims_gqa.jsonl
# kernels_h200_d256.jsonl: D = 256 again, B = 1, with the backward tiles in use since
# (dK/dV 64 x 64, dQ 128 x 32).
python benchmarks/bench_kernels.py --seqlens 16k --head-dims 256 --heads 16 --kv-heads 16 4 \
    --impls ringflash sdpa_flash --out kernels_h200_d256.jsonl
# kernels_h200_d256_sweep.jsonl: the backward tile sweep behind those tiles, one row per launch
# config: part (dkdv or dq), cfg = (BLOCK_M, BLOCK_N, num_warps, num_stages), bwd_tflops
# (S = 16k, D = 256, H = 16; the sweep script itself is not kept).
