# 2 x H200, one device call, the code as committed at the kernel re-tune (D = 128 kernels as in
# kernels_h200_masked_first.jsonl of commit 78c7467). Table: python benchmarks/plot_ring.py ring_H200x2.jsonl --hkv 8 --out ring_h200x2_hkv8
B="benchmarks/bench_ring.py --seqlens 16k 64k --causal causal --kv-heads 8 32 --warmup 3 --iters 10"
torchrun --standalone --nproc-per-node 2 $B --out ring_H200x2.jsonl > bench.log 2>&1
torchrun --standalone --nproc-per-node 2 -m pytest tests/test_ring_gpu.py tests/test_nn_gpu.py -m multigpu -q -p no:cacheprovider -x > tests.log 2>&1
