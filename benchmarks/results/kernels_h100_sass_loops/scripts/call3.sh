#!/usr/bin/env bash
# call 3: the kernel table at 32k (D = 128) beside cuDNN and SDPA flash; ncu of the Hopper forward, 8k causal
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
timeout 200 python3 benchmarks/bench_kernels.py --seqlens 32k --head-dims 128 --causal both --modes fwd bwd fwdbwd \
  --impls ringflash_default sdpa_cudnn sdpa_flash --out $OUT/kernels_32k.jsonl > $OUT/bench_kernels_32k.log 2>&1
echo "32k exit $?"; grep -v Warn $OUT/bench_kernels_32k.log | grep -v block_mask | head -12
mkdir -p /tmp/w && cd /tmp/w
timeout 100 ncu --kernel-name regex:_attn_fwd_hopper --launch-skip 2 --launch-count 1 --set full \
  -o fwd8k python3 $OLDPWD/benchmarks/results/kernels_h100_spt_dq/ncu_bwd.py 8192 causal > ncu_fwd.log 2>&1; echo "ncu fwd exit $?"
ncu -i fwd8k.ncu-rep > $OUT/ncu_fwd_8k_causal.txt 2>&1
grep -h "Duration\|Registers Per\|Compute (SM) Throughput\|Issue Slots Busy\|Local Memory Spill\|Memory Throughput\|Achieved Occ\|Theoretical Occ" $OUT/ncu_fwd_8k_causal.txt
