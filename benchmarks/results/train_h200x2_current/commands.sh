#!/usr/bin/env bash
# The README's 2 x H200 training table, re-measured with the current code (one device call).
set -u
export PYTHONPATH=.
A="--cp-size 2 --layout striped --batch-size 1 --dim 1024 --layers 8 --heads 16 --kv-heads 4 --steps 16 --log-every 4 --ckpt-every 0 --no-plot"
for S in 65536 131072; do
  for v in triton tritoncompile cudnn cudnncompile; do
    case $v in triton) X="--backend triton";; tritoncompile) X="--backend triton --compile";;
      cudnn) X="--backend cudnn";; cudnncompile) X="--backend cudnn --compile";; esac
    timeout 170 torchrun --standalone --nproc-per-node 2 launch/train.py $A --seq-len $S $X --out $OUT/train_${S}_$v > $OUT/train_${S}_$v.log 2>&1; echo "$S $v rc=$?"
    cp $OUT/train_${S}_$v/metrics.jsonl $OUT/train_${S}_$v.jsonl 2>/dev/null
    python -c "
import json,sys
r=[json.loads(l) for l in open('$OUT/train_${S}_$v.jsonl')]
last=r[-4:]; print('$S $v', 'steps', [x['step'] for x in last], 'tok/s %.1fk' % (sum(x['tokens_per_s'] for x in last)/len(last)/1e3), 'peak %.1f GiB' % max(x['peak_mem_gib'] for x in r))
" 2>&1 | tail -1
  done
done
