#!/bin/bash
# call 1: the D = 64 forward tiles (three consumer warpgroups), then grouped queries at D = 64
set -x
R=benchmarks/results/kernels_d64_tiles
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv
python3 -c "import torch, triton; print(torch.__version__, triton.__version__)"
timeout 330 python3 $R/fwd_tiles.py --out $OUT/fwd_tiles.jsonl 2>&1 | tee $OUT/fwd_tiles.log
timeout 200 python3 benchmarks/bench_kernels.py --seqlens 8k 16k --head-dims 64 --kv-heads 8 --causal both \
  --modes bwd fwdbwd --impls ringflash ringflash_default sdpa_cudnn --out $OUT/gqa_d64.jsonl 2>&1 | tee $OUT/gqa_d64.log
