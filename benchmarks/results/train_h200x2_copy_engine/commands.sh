#!/usr/bin/env bash
# launch/train.py on 2 x H200 with each transport (one device call; outputs under $OUT, the logged
# lines copied here as log_*.txt, the copy-engine runs' metrics.jsonl as metrics_*.jsonl).
set -u
export PYTHONPATH=.
A="--cp-size 2 --layout striped --batch-size 1 --dim 1024 --layers 8 --heads 16 --kv-heads 4 --seq-len 65536 --steps 24 --log-every 4 --ckpt-every 0 --no-plot"
for t in nccl copy_engine; do
  timeout 150 torchrun --standalone --nproc-per-node 2 launch/train.py $A --transport $t --out $OUT/train_$t > $OUT/train_$t.log 2>&1; echo "$t rc=$?"
done
timeout 150 torchrun --standalone --nproc-per-node 2 launch/train.py $A --transport copy_engine --checkpoint-activations --out $OUT/train_copy_engine_ckpt > $OUT/train_copy_engine_ckpt.log 2>&1; echo "ckpt rc=$?"
for t in nccl copy_engine copy_engine_ckpt; do echo "== $t"; tail -3 $OUT/train_$t/metrics.jsonl 2>/dev/null || tail -5 $OUT/train_$t.log; done
