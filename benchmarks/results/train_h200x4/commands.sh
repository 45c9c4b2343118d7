#!/usr/bin/env bash
# 4 x H200: the README's 128k training command for 40 steps, once per engine
# (triton/ and cudnn/: metrics.jsonl and loss.png).
A="--cp-size 4 --layout striped --seq-len 131072 --batch-size 1 --dim 1024 --layers 8 --heads 16 --kv-heads 4 \
   --rope-base 1000000 --steps 40 --warmup-steps 10 --lr 1e-3 --log-every 5 --ckpt-every 0"
torchrun --standalone --nproc-per-node 4 launch/train.py $A --out triton
torchrun --standalone --nproc-per-node 4 launch/train.py $A --backend cudnn --out cudnn
