# One H200 (torch 2.11, triton 3.6): ringflash's masked kernels vs FlexAttention (torch.compile,
# block mask built with _compile=True) and ringflash dense causal at S = 128k, B = 1, H = 32,
# D = 128, bf16, in one run.
PYTHONPATH=. python benchmarks/bench_masks.py --seqlens 128k --out masks.jsonl | tee bench.log
