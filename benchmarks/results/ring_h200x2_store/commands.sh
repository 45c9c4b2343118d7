# 2 x H200, one device call (the table: python benchmarks/plot_ring.py ring_H200x2_store.jsonl --hkv 32 --out ...)
B="benchmarks/bench_ring.py --seqlens 64k 16k --layouts striped --causal causal --kv-heads 32 8 --warmup 3 --iters 10"
NCCL_DEBUG=INFO NCCL_DEBUG_SUBSYS=INIT torchrun --standalone --nproc-per-node 2 $B \
  --impls ringflash ringflash_local single_gpu --engines triton triton_zero_fill --out ring_H200x2_store.jsonl
for e in NCCL_MAX_P2P_NCHANNELS=8 NCCL_MAX_P2P_NCHANNELS=2 NCCL_CTA_POLICY=1; do
  env $e torchrun --standalone --nproc-per-node 2 $B --impls ringflash --out ring_H200x2_store.jsonl
done
# tests.log: the multi-GPU tests with the dK/dV store
torchrun --standalone --nproc-per-node 2 -m pytest tests/test_ring_gpu.py tests/test_nn_gpu.py -m multigpu -q -p no:cacheprovider -x
