#!/usr/bin/env bash
# 2 x H200, call C: the README's 2-GPU training table at 64k (files kept this time), and the cost
# of the opt-in cross-rank check (RINGFLASH_CHECK_CONSISTENCY=1) on the ring.
set -u
export PYTHONPATH=.
A="--cp-size 2 --layout striped --batch-size 1 --dim 1024 --layers 8 --heads 16 --kv-heads 4 --steps 16 --log-every 4 --ckpt-every 0 --no-plot"
S=65536
for v in triton tritoncompile cudnn cudnncompile; do
  case $v in triton) X="--backend triton";; tritoncompile) X="--backend triton --compile";;
    cudnn) X="--backend cudnn";; cudnncompile) X="--backend cudnn --compile";; esac
  timeout 170 torchrun --standalone --nproc-per-node 2 launch/train.py $A --seq-len $S $X --out /tmp/train_${S}_$v > $OUT/train_${S}_$v.log 2>&1; echo "$S $v rc=$?"
  cp /tmp/train_${S}_$v/metrics.jsonl $OUT/train_${S}_$v.jsonl 2>/dev/null
  python -c "
import json
r=[json.loads(l) for l in open('$OUT/train_${S}_$v.jsonl')]
last=r[-4:]; print('$S $v', 'steps', [x['step'] for x in last], 'tok/s %.1fk' % (sum(x['tokens_per_s'] for x in last)/len(last)/1e3), 'peak %.1f GiB' % max(x['peak_mem_gib'] for x in r))
" 2>&1 | tail -1
done
for c in 0 1; do
  RINGFLASH_CHECK_CONSISTENCY=$c timeout 120 torchrun --standalone --nproc-per-node 2 benchmarks/bench_ring.py --seqlens 16k 64k --causal causal --kv-heads 8 --layouts striped --impls ringflash --warmup 3 --iters 20 --out $OUT/ring_check_$c.jsonl > $OUT/bench_check_$c.log 2>&1; echo "check=$c rc=$?"
  grep -v '^{' $OUT/bench_check_$c.log | grep ringflash
done
