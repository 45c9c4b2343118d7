#!/usr/bin/env bash
# 2 x H200: torch CP's peak memory with the corrected accounting, both of its K/V exchanges,
# beside the ringflash ring, with the host lead (128k, causal, striped; Hkv 32 and 8).
set -u
export PYTHONPATH=. PYTHONUNBUFFERED=1
A="--seqlens 128k --causal causal --kv-heads 32 8 --layouts striped --warmup 2 --iters 5"
timeout 150 torchrun --standalone --nproc-per-node 2 benchmarks/bench_ring.py $A --impls ringflash torch_cp_cudnn --out $OUT/cp_mem.jsonl > $OUT/cp_mem.log 2>&1; echo "allgather rc=$?"
grep -v '^{' $OUT/cp_mem.log | grep -E "ringflash|torch_cp"
timeout 90 torchrun --standalone --nproc-per-node 2 benchmarks/bench_ring.py $A --impls torch_cp_cudnn --cp-rotate alltoall --out $OUT/cp_mem_alltoall.jsonl > $OUT/cp_mem_alltoall.log 2>&1; echo "alltoall rc=$?"
grep -v '^{' $OUT/cp_mem_alltoall.log | grep -E "torch_cp"
