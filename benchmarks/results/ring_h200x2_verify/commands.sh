#!/usr/bin/env bash
# One 2 x H200 call: the workspace accounting in launch/train.py and bench_ring.py on a GPU, and the
# forward at 8k tokens per GPU over NCCL and the copy engine beside the single-GPU kernel.
set -u
export PYTHONPATH=.
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
A="--cp-size 2 --layout striped --batch-size 1 --dim 1024 --layers 8 --heads 16 --kv-heads 4 --seq-len 65536 --steps 8 --log-every 4 --ckpt-every 0 --no-plot --backend triton"
for t in nccl copy_engine; do
  timeout 150 torchrun --standalone --nproc-per-node 2 launch/train.py $A --transport $t --out /tmp/train_$t > $OUT/train_64k_$t.log 2>&1; echo "train $t rc=$?"
  cp /tmp/train_$t/metrics.jsonl $OUT/train_64k_$t.jsonl; tail -2 $OUT/train_64k_$t.jsonl
done
timeout 300 torchrun --standalone --nproc-per-node 2 benchmarks/bench_ring.py --seqlens 16k 64k --causal causal --kv-heads 32 8 --layouts striped zigzag --impls ringflash single_gpu --engines triton --transports nccl copy_engine --warmup 3 --iters 10 --out $OUT/ring_verify.jsonl > $OUT/bench.log 2>&1; echo "bench rc=$?"
tail -45 $OUT/bench.log
