#!/usr/bin/env bash
# 2 x H200: the 512k rows (full attention: one layout, the work is the same in each).
export PYTHONPATH=.
R=$OUT/ring_H200x2_512k_all.jsonl
timeout 290 torchrun --standalone --nproc-per-node 2 benchmarks/bench_ring.py --seqlens 512k --kv-heads 32 8 --causal causal \
  --modes fwd fwdbwd --layouts contiguous striped zigzag --impls ringflash torch_cp_cudnn --engines triton \
  --warmup 1 --iters 1 --out $R > $OUT/c1.log 2>&1
echo C1 rc=$?
timeout 290 torchrun --standalone --nproc-per-node 2 benchmarks/bench_ring.py --seqlens 512k --kv-heads 32 8 --causal full \
  --modes fwd fwdbwd --layouts striped --impls ringflash torch_cp_cudnn --engines triton \
  --warmup 1 --iters 1 --out $R > $OUT/c2.log 2>&1
echo C2 rc=$?
python benchmarks/plot_ring.py $R --hkv 32 --out $OUT/ring_h200x2_512k > $OUT/table_512k.md 2>$OUT/plot.err
cat $OUT/table_512k.md
