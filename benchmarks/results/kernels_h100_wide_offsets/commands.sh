#!/usr/bin/env bash
# One H100 call: the > 2**31-element kernel test and a subset of the kernel GPU tests with the
# WIDE (64-bit tile offset) variant; the same test on the old kernels (own process: it may
# crash); an A/B of the kernels' and the merge pass's speed, old (old_pkg/) against new.
set -u
export PYTHONPATH=. PYTHONUNBUFFERED=1
L=$OUT/all.log
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee $L
timeout 200 python -m pytest -m gpu tests/test_kernels_gpu.py -q -p no:cacheprovider \
  -k "offsets or odd_lengths or ring_step or store_dkdv or deterministic or fold or fully_masked" 2>&1 | tail -4 | tee -a $L
cp tests/test_kernels_gpu.py old_pkg/test_offsets_old.py
(cd old_pkg && PYTHONPATH=. timeout 100 python -m pytest -m gpu test_offsets_old.py -k offsets_past_int32 -q -p no:cacheprovider 2>&1 | grep -E "Error|error|assert|passed|failed" | head -12 | cut -c1-400) | tee -a $L
A="--seqlens 8k 32k --head-dims 128 --impls ringflash"
for i in 1 2; do
  timeout 100 python old_pkg/benchmarks/bench_kernels.py $A --out $OUT/old_$i.jsonl > /dev/null 2>&1; echo "old $i rc=$?" | tee -a $L
  timeout 100 python benchmarks/bench_kernels.py $A --out $OUT/new_$i.jsonl > /dev/null 2>&1; echo "new $i rc=$?" | tee -a $L
done
timeout 60 python old_pkg/benchmarks/bench_merge.py --out $OUT/merge_old.jsonl 2>&1 | tail -6 | tee -a $L
timeout 60 python benchmarks/bench_merge.py --out $OUT/merge_new.jsonl 2>&1 | tail -6 | tee -a $L
python - <<'PY' 2>&1 | tee -a $L
import json, os
out = os.environ["OUT"]
def load(n):
    rows = {}
    for i in (1, 2):
        for l in open(f"{out}/{n}_{i}.jsonl"):
            r = json.loads(l)
            if "tflops" in r:
                rows.setdefault((r["S"], r["causal"], r["mode"]), []).append(r["tflops"])
    return rows
old, new = load("old"), load("new")
for k in sorted(old):
    print(k, "old", old[k], "new", new.get(k), "new/old %.3f" % (sum(new[k]) / sum(old[k])))
PY
