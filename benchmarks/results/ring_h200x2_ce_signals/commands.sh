# Copy-engine signalling: driver attributes, tests in both modes, and tests with each process
# seeing only its own GPU (as under the Slurm launcher).
export PYTHONPATH=.
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python - <<'PY' 2>&1 | tee $OUT/driver_attrs.log
import ctypes, torch
torch.zeros(1, device="cuda")
lib = ctypes.CDLL("libcuda.so.1")
for name, attr in [("CAN_USE_STREAM_MEM_OPS_V1", 92), ("CAN_USE_64_BIT_STREAM_MEM_OPS_V1", 93), ("CAN_FLUSH_REMOTE_WRITES", 98)]:
    v = ctypes.c_int(); rc = lib.cuDeviceGetAttribute(ctypes.byref(v), attr, 0); print(name, "rc", rc, "value", v.value)
for sym in ("cuStreamWaitValue32_v2", "cuStreamWriteValue32_v2"):
    print(sym, hasattr(lib, sym))
print("torch", torch.__version__)
PY
timeout 330 torchrun --standalone --nproc-per-node 2 -m pytest tests/test_ring_gpu.py -m multigpu -k copy_engine -q -p no:cacheprovider 2>&1 | tail -8 | tee $OUT/ce_tests.log
cat > /tmp/iso.sh <<'SH'
export CUDA_VISIBLE_DEVICES=$LOCAL_RANK LOCAL_RANK=0
exec python -m pytest tests/test_ring_gpu.py -m multigpu -k "copy_engine and (triton or subgroups)" -q -p no:cacheprovider -x
SH
timeout 200 torchrun --standalone --nproc-per-node 2 --no-python bash /tmp/iso.sh 2>&1 | tail -30 | tee $OUT/ce_isolated.log
export PYTHONPATH=.
cat > /tmp/iso.sh <<'SH'
export CUDA_VISIBLE_DEVICES=$LOCAL_RANK LOCAL_RANK=0
exec python -m pytest tests/test_ring_gpu.py -m multigpu -k "copy_engine and (triton or subgroups)" -q -p no:cacheprovider -x > $OUT/ce_isolated_rank$RANK.log 2>&1
SH
timeout 150 torchrun --standalone --nproc-per-node 2 --no-python bash /tmp/iso.sh > $OUT/ce_isolated_torchrun.log 2>&1
tail -c 3000 $OUT/ce_isolated_rank0.log
timeout 420 torchrun --standalone --nproc-per-node 2 benchmarks/bench_ring.py --seqlens 8k 16k 64k --causal causal --kv-heads 32 8 --layouts zigzag --impls ringflash --engines triton cudnn --transports nccl copy_engine --ce-signals kernel stream --warmup 3 --iters 10 --out $OUT/ring_ce_signals.jsonl > $OUT/bench.log 2>&1
tail -80 $OUT/bench.log
export PYTHONPATH=.
timeout 200 torchrun --standalone --nproc-per-node 2 -m pytest tests/test_ring_gpu.py -m multigpu -k "copy_engine and ((triton and striped) or subgroups)" -q -p no:cacheprovider 2>&1 | tail -3 | tee $OUT/ce_tests_after_check.log
cat > /tmp/iso_check.py <<'PY'
import os, torch, torch.distributed as dist
from ringflash import comm, ring_attention
dist.init_process_group("nccl", device_id=torch.device("cuda", 0))
comm.TRANSPORT = "copy_engine"
q = torch.randn(1, 256, 4, 64, device="cuda", dtype=torch.bfloat16)
try:
    ring_attention(q, q, q, causal=True)
    print(f"rank {dist.get_rank()}: no error")
except ValueError as e:
    print(f"rank {dist.get_rank()}: ValueError: {e}")
comm.TRANSPORT = "nccl"
out = ring_attention(q, q, q, causal=True)  # the group still works over NCCL
torch.cuda.synchronize()
print(f"rank {dist.get_rank()}: nccl ring afterwards ok, {tuple(out.shape)}")
dist.destroy_process_group()
PY
cat > /tmp/iso.sh <<'SH'
export CUDA_VISIBLE_DEVICES=$LOCAL_RANK LOCAL_RANK=0
python /tmp/iso_check.py
python launch/train.py --transport copy_engine --steps 1 --out /tmp/iso_run 2>&1 | tail -4
SH
timeout 150 torchrun --standalone --nproc-per-node 2 --no-python bash /tmp/iso.sh 2>&1 | grep -v "^W1\|\*\*\*\*" | tee $OUT/ce_isolated_after_check.log

# --- profiles (dev_prof.sh)
# profile_ring.py over NCCL and the copy-engine transport (both signalling modes), 2 x H200.
export PYTHONPATH=.
A="--seqlen 32k --kv-heads 32 --layouts striped --engines triton cudnn --modes fwd fwdbwd"
timeout 240 torchrun --standalone --nproc-per-node 2 benchmarks/profile_ring.py $A --transports nccl copy_engine --out $OUT/prof_kernel > $OUT/profile_kernel_signals.log 2>&1; echo "rc=$?"
timeout 150 torchrun --standalone --nproc-per-node 2 benchmarks/profile_ring.py $A --transports copy_engine --ce-signals stream --out $OUT/prof_stream > $OUT/profile_stream_signals.log 2>&1; echo "rc=$?"
python - <<PY > $OUT/trace_event_names.txt
import json, glob, collections
for f in sorted(glob.glob("$OUT/prof_*/trace_*.json")):
    ev = json.load(open(f))["traceEvents"]
    c = collections.Counter((e.get("cat"), e["name"][:80], (e.get("args") or {}).get("stream")) for e in ev
                            if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and ("signal" in e["name"].lower() or e.get("cat") != "kernel" or "nccl" in e["name"].lower()))
    print(f.split("/")[-1])
    for k, v in c.most_common(14):
        print("   ", v, k)
PY
cat $OUT/trace_event_names.txt | head -80
grep -A12 "ms per iteration, rank 0" $OUT/profile_kernel_signals.log $OUT/profile_stream_signals.log
rm -f $OUT/prof_*/trace_*.json

# --- longer A/B and the timeout in both modes (dev_ab.sh)
# Copy-engine signals, kernel against stream memops: a longer A/B, and the timeout in stream mode.
export PYTHONPATH=.
for s in stream kernel; do
  t=$(date +%s); SIGNALS=$s timeout 90 torchrun --standalone --nproc-per-node 2 ce_timeout_signals.py > $OUT/ce_timeout_$s.log 2>&1; echo "timeout test $s: rc=$? after $(( $(date +%s) - t )) s"
  grep -v "^W1\|\*\*\*\*" $OUT/ce_timeout_$s.log | grep "rank\|FATAL" | head -6
done
timeout 400 torchrun --standalone --nproc-per-node 2 benchmarks/bench_ring.py --seqlens 32k 128k --causal causal --kv-heads 32 8 --layouts striped --impls ringflash --engines cudnn triton --transports copy_engine --ce-signals kernel stream --warmup 3 --iters 20 --out $OUT/ring_ce_signals_long.jsonl > $OUT/bench_long.log 2>&1; echo "bench rc=$?"
tail -36 $OUT/bench_long.log
