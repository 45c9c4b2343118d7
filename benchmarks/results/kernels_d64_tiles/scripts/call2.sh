#!/bin/bash
# call 2: the D = 64 forward tiles timed (8k-32k), then the last variant checked against float64
set -x
R=benchmarks/results/kernels_d64_tiles
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv
timeout 400 python3 $R/fwd_tiles.py --seqlens 8k 16k 32k --check "192x64 s4" --out $OUT/fwd_tiles_time.jsonl 2>&1 | tee $OUT/fwd_tiles_time.log
