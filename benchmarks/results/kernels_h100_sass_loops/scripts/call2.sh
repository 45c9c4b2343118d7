#!/usr/bin/env bash
# call 2: masks at 32k with the kernels of 2f1618c beside this tree's; ncu of the new default backward and forward
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nvidia-smi -L
timeout 150 python3 benchmarks/bench_kernels.py --seqlens 16k 8k --head-dims 128 --causal both --modes bwd fwdbwd \
  --impls ringflash_default ringflash_prev sdpa_cudnn --prev .old/ringflash/kernels --out $OUT/kernels_again.jsonl > $OUT/bench_kernels_again.log 2>&1
echo "again exit $?"; grep -v Warn $OUT/bench_kernels_again.log | grep -v block_mask | head -20
timeout 170 python3 benchmarks/bench_masks.py --seqlens 32k --impls ringflash ringflash_triton flex \
  --prev .old/ringflash/kernels --out $OUT/masks.jsonl > $OUT/bench_masks.log 2>&1
echo "masks exit $?"; tail -40 $OUT/bench_masks.log
cd $OUT
for c in causal; do
  timeout 120 ncu --kernel-name regex:_attn_bwd_dkdv_hopper --launch-skip 2 --launch-count 1 --set full --import-source yes \
    -o bwd8k_$c python3 $OLDPWD/benchmarks/results/kernels_h100_spt_dq/ncu_bwd.py 8192 $c > ncu_bwd_$c.log 2>&1; echo "ncu bwd $c exit $?"
  ncu -i bwd8k_$c.ncu-rep > ncu_bwd_8k_$c.txt 2>&1
  ncu -i bwd8k_$c.ncu-rep --page source --csv --print-source sass > ncu_bwd_source_$c.csv 2>&1
  python3 $OLDPWD/benchmarks/results/kernels_h100_dq_store/scripts/ncu_summary.py ncu_bwd_source_$c.csv > ncu_bwd_source_top_$c.txt 2>&1
  gzip -f ncu_bwd_source_$c.csv; rm -f bwd8k_$c.ncu-rep
done
timeout 100 ncu --kernel-name regex:_attn_fwd --launch-skip 2 --launch-count 1 --set full \
  -o fwd8k python3 $OLDPWD/benchmarks/results/kernels_h100_spt_dq/ncu_bwd.py 8192 causal > ncu_fwd.log 2>&1; echo "ncu fwd exit $?"
ncu -i fwd8k.ncu-rep > ncu_fwd_8k_causal.txt 2>&1; rm -f fwd8k.ncu-rep
grep -h "Duration\|Registers Per\|Compute (SM) Throughput\|Issue Slots Busy\|Local Memory Spill" ncu_*_8k_*.txt
