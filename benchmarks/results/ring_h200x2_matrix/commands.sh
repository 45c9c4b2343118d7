#!/usr/bin/env bash
# 2 x H200, call A: the multi-GPU tests at this commit, the 32k matrix (Triton ring, every layout,
# causal and full, beside the single GPU and torch CP), and the cuDNN engine at 32k and 128k.
set -u
export PYTHONPATH=. PYTHONUNBUFFERED=1
git log --oneline -1 2>/dev/null || true
RINGFLASH_REPORT=$OUT/ring_errors.jsonl timeout 280 torchrun --standalone --nproc-per-node 2 -m pytest tests/test_ring_gpu.py tests/test_nn_gpu.py -m multigpu -q -p no:cacheprovider > $OUT/tests.log 2>&1; echo "tests rc=$?"; tail -3 $OUT/tests.log
timeout 150 torchrun --standalone --nproc-per-node 2 benchmarks/bench_ring.py --seqlens 32k --warmup 3 --iters 10 --out $OUT/ring_H200x2_32k.jsonl > $OUT/bench_32k.log 2>&1; echo "bench 32k rc=$?"
grep -v '^{' $OUT/bench_32k.log | tail -50
timeout 140 torchrun --standalone --nproc-per-node 2 benchmarks/bench_ring.py --seqlens 32k 128k --causal causal --engines cudnn --layouts striped zigzag --impls ringflash single_gpu --warmup 3 --iters 8 --out $OUT/ring_H200x2_cudnn.jsonl > $OUT/bench_cudnn.log 2>&1; echo "bench cudnn rc=$?"
grep -v '^{' $OUT/bench_cudnn.log | tail -20
#!/usr/bin/env bash
# 2 x H200, call B: the 128k matrix (Triton ring, every layout, causal and full, beside the single
# GPU and torch CP).
set -u
export PYTHONPATH=. PYTHONUNBUFFERED=1
timeout 560 torchrun --standalone --nproc-per-node 2 benchmarks/bench_ring.py --seqlens 128k --warmup 2 --iters 8 --out $OUT/ring_H200x2_128k.jsonl > $OUT/bench_128k.log 2>&1; echo "bench 128k rc=$?"
grep -v '^{' $OUT/bench_128k.log | tail -60
