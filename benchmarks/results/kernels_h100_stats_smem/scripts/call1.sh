#!/usr/bin/env bash
export PYTHONUNBUFFERED=1 PYTHONPATH=.
T0=$(date +%s)
left() { echo $(( 330 - ($(date +%s) - T0) )); }
timeout 150 python -m pytest -q -m gpu tests/test_kernels_hopper_gpu.py -k "backward_settings_bitwise" > $OUT/tests.log 2>&1
echo "tests rc=$? left=$(left)"; tail -3 $OUT/tests.log
nvidia-smi --query-gpu=timestamp,clocks.sm,power.draw,temperature.gpu,clocks_event_reasons.active --format=csv -lms 200 > $OUT/smi.csv 2>&1 &
SMI=$!
timeout $(( $(left) - 40 )) python benchmarks/bench_kernels.py --head-dims 128 --seqlens 8k 16k --causal both --modes bwd fwdbwd \
  --impls ringflash_default ringflash_dq_swizzle32 ringflash_stats_smem ringflash_dq_swizzle32_stats_smem sdpa_cudnn --out $OUT/kernels.jsonl > $OUT/bench_kernels.log 2>&1
echo "bench rc=$? left=$(left)"
kill $SMI
grep -v "^configs" $OUT/bench_kernels.log | tail -30
for r in 1; do
timeout $(( $(left) - 5 )) python benchmarks/profile_kernels.py --seqlens 8k 16k --causal both --modes bwd --calls 8 \
  --impls ringflash_default ringflash_dq_swizzle32 ringflash_stats_smem ringflash_dq_swizzle32_stats_smem ringflash_default --out $OUT/profile.jsonl > $OUT/profile$r.log 2>&1
echo "profile$r rc=$? left=$(left)"
done
python - <<'PY'
import json, os
for l in open(os.environ["OUT"] + "/profile.jsonl"):
    r = json.loads(l)
    print(r["impl"], r["S"], r["causal"], round(r["call_us"]), round(sum(v for k, v in r["kernels_us"].items() if "dkdv" in k)))
PY
