# One H100 80GB (torch 2.11, triton 3.6), one call: the GPU mask tests, then ringflash's masked
# kernels vs FlexAttention (torch.compile) and ringflash dense causal at S = 32k, B = 1, H = 32,
# D = 128, bf16, with the dense kernels of the tree before masks (b901a7f) timed in the same run.
# (The 128k rows of this call failed in FlexAttention's block-mask construction, which then built
# an S x S matrix; see masks_h200_128k/ for 128k with _compile=True.)
mkdir -p .old/tmp && git archive b901a7f ringflash/kernels | tar -x -C .old/tmp && mv .old/tmp/ringflash/kernels .old/kernels_prev
PYTHONPATH=. python -m pytest -q -m gpu tests/test_masks_gpu.py > gpu_tests.log 2>&1
PYTHONPATH=. python benchmarks/bench_masks.py --seqlens 32k 128k --prev .old/kernels_prev --out masks.jsonl | tee bench.log
