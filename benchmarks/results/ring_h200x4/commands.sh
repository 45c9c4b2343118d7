#!/usr/bin/env bash
# 4 x H200 (NVLink), torch 2.11, Triton 3.6, commits e7c8dbb to 1b08c82. The rows record no command
# line: these are the flags that produce them. Tables: table_*.md from
# benchmarks/plot_ring.py, which also draws the PNGs.
R="torchrun --standalone --nproc-per-node 4 benchmarks/bench_ring.py"
# tests.log, ring_errors.jsonl, ring_H200x4.jsonl: the multi-GPU tests (65 per rank), then the Triton
# ring over every layout, causal and full, Hkv 32 and 8, beside torch CP flash/cuDNN and one GPU.
OUT=. bash benchmarks/multigpu.sh 32k 128k
# ring_H200x4_512k.jsonl: causal fwd+bwd at 512k, Hkv = 8.
$R --seqlens 512k --causal causal --modes fwdbwd --kv-heads 8 --engines triton cudnn \
    --impls ringflash torch_cp_cudnn --warmup 1 --iters 1 --out ring_H200x4_512k.jsonl
# ring_H200x4_2m.jsonl: one causal fwd+bwd at 2M tokens, striped, Hkv = 32, both engines.
$R --seqlens 2m --impls ringflash --layouts striped --kv-heads 32 --causal causal --modes fwdbwd \
    --engines triton cudnn --warmup 1 --iters 1 --out ring_H200x4_2m.jsonl
# ring_H200x4_engines.jsonl: both engines beside torch CP cuDNN and one GPU, last step in 1 or 4 parts.
$R --seqlens 32k 128k --causal causal --engines cudnn triton --layouts striped zigzag \
    --impls ringflash torch_cp_cudnn single_gpu --kv-heads 32 8 --last-hop-parts 1 4 --out ring_H200x4_engines.jsonl
# ring_H200x4_head_start.jsonl: the cuDNN engine with and without the 20 us head start.
$R --seqlens 32k 128k --causal causal --engines cudnn --layouts zigzag striped --impls ringflash torch_cp_cudnn \
    --kv-heads 32 8 --head-start-us 0 20 --warmup 3 --iters 10 --out ring_H200x4_head_start.jsonl
# ring_H200x4_triton_head_start.jsonl: the same head start on the Triton engine (off there).
$R --seqlens 32k 128k --causal causal --engines triton triton_head_start --layouts striped zigzag \
    --impls ringflash single_gpu --kv-heads 32 --out ring_H200x4_triton_head_start.jsonl
# profile_*.jsonl: benchmarks/profile_ring.py at 32k (cuDNN, zigzag, Hkv 32 and 8, head start 0 or 20 us)
# and at 128k (Triton, striped, Hkv 32).
# (profile_ring.py writes profile.jsonl into --out; each was renamed after its run.)
P="torchrun --standalone --nproc-per-node 4 benchmarks/profile_ring.py"
$P --seqlen 32k --kv-heads 32 --layouts zigzag --engines cudnn --head-start-us 0 --out p && mv p/profile.jsonl profile_32k_hkv32.jsonl
$P --seqlen 32k --kv-heads 32 --layouts zigzag --engines cudnn --head-start-us 20 --out p && mv p/profile.jsonl profile_32k_hkv32_head_start20.jsonl
$P --seqlen 32k --kv-heads 8 --layouts zigzag --engines cudnn --head-start-us 0 --out p && mv p/profile.jsonl profile_32k_hkv8.jsonl
$P --seqlen 128k --kv-heads 32 --layouts striped --engines triton triton_head_start --out p && mv p/profile.jsonl profile_128k_hkv32_triton.jsonl
