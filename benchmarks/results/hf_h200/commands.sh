# One H200 (141 GB), torch 2.11, triton 3.6, transformers 5.17, at commit 148712a, from the repository root:
PYTHONPATH=. python -m pytest -m gpu tests/test_hf_gpu.py -s -q      # gpu_test.txt
PYTHONPATH=. python benchmarks/bench_hf.py --iters 2 --out hf.json   # hf.json, table.txt
