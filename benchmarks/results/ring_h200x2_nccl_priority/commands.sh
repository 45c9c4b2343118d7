#!/usr/bin/env bash
# 2 x H200, the SDPA engines beside the Triton engine and torch CP cuDNN, with high-priority NCCL
# streams (TORCH_NCCL_HIGH_PRIORITY=1, which the benchmarks set unless it is set already).
# ring_H200x2.jsonl (the command the README gave for it); plots from benchmarks/plot_ring.py.
torchrun --nproc-per-node 2 benchmarks/bench_ring.py --seqlens 32k 128k --causal causal --engines cudnn triton \
    --layouts striped zigzag --impls ringflash torch_cp_cudnn single_gpu --kv-heads 32 8 --out ring_H200x2.jsonl
# profile_priority{0,1}.jsonl and the traces: S = 32k, Hkv = 32, striped, with the priority off and on.
# (profile_ring.py writes profile.jsonl into --out; renamed here per setting.)
for p in 0 1; do
  TORCH_NCCL_HIGH_PRIORITY=$p torchrun --nproc-per-node 2 benchmarks/profile_ring.py --seqlen 32k --kv-heads 32 \
      --layouts striped --engines triton cudnn --out prof$p && mv prof$p/profile.jsonl profile_priority$p.jsonl
done
