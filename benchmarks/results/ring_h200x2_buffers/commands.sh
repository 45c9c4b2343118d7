#!/usr/bin/env bash
# 2 x H200, the backward with two float32 dK/dV buffers (commit 98ee0cd; the rows record no
# command line, these are the flags that produce them).
# ring_H200x2.jsonl: zigzag, Hkv = 32, causal fwd+bwd at 32k and 128k, both engines beside torch CP cuDNN.
torchrun --standalone --nproc-per-node 2 benchmarks/bench_ring.py --seqlens 32k 128k --causal causal \
    --modes fwdbwd --layouts zigzag --kv-heads 32 --engines triton cudnn --impls ringflash torch_cp_cudnn \
    --out ring_H200x2.jsonl
# ring_H200x2_1m.jsonl: one causal fwd+bwd at 1M tokens (512k per GPU), striped, Triton.
torchrun --standalone --nproc-per-node 2 benchmarks/bench_ring.py --seqlens 1m --impls ringflash \
    --layouts striped --kv-heads 32 --causal causal --modes fwdbwd --warmup 1 --iters 1 --out ring_H200x2_1m.jsonl
# ring_errors.jsonl: the multi-GPU tests' errors against float64.
RINGFLASH_REPORT=ring_errors.jsonl torchrun --standalone --nproc-per-node 2 -m pytest tests/test_ring_gpu.py -m multigpu -q
