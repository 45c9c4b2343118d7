# 2 x H200, four device calls, the code as committed with the copy-engine transport.
# ce_micro.jsonl (the micro-benchmark; written under $OUT):
torchrun --standalone --nproc-per-node 2 benchmarks/results/ring_h200x2_copy_engine/ce_micro.py
# ce_tests.log, then ring_H200x2_ce.jsonl / bench.log:
torchrun --standalone --nproc-per-node 2 -m pytest tests/test_ring_gpu.py -m multigpu -k copy_engine -q -p no:cacheprovider
torchrun --standalone --nproc-per-node 2 benchmarks/bench_ring.py --seqlens 16k 64k --causal causal --kv-heads 32 8 \
  --layouts striped zigzag --impls ringflash single_gpu --engines triton cudnn --transports nccl copy_engine \
  --warmup 3 --iters 10 --out ring_H200x2_ce.jsonl
# tests.log: the whole multi-GPU suite
torchrun --standalone --nproc-per-node 2 -m pytest tests/test_ring_gpu.py tests/test_nn_gpu.py -m multigpu -q -p no:cacheprovider
# the fourth call: ce_tests_timeout_arg.log, ce_timeout.log, ring_H200x2_ce_small.jsonl / bench_small.log
torchrun --standalone --nproc-per-node 2 -m pytest tests/test_ring_gpu.py -m multigpu -k copy_engine -q -p no:cacheprovider
torchrun --standalone --nproc-per-node 2 benchmarks/results/ring_h200x2_copy_engine/ce_timeout.py
torchrun --standalone --nproc-per-node 2 benchmarks/bench_ring.py --seqlens 8k 16k --kv-heads 32 --causal causal \
  --layouts striped --impls ringflash single_gpu --engines triton cudnn --transports nccl copy_engine \
  --head-start-us 0 20 --warmup 5 --iters 20 --out ring_H200x2_ce_small.jsonl
