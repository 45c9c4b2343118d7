#!/usr/bin/env bash
# One H200, torch 2.11, Triton 3.6, the kernels as committed in b495523:
# h200.log, the whole kernel GPU suite (80 passed).
time python -m pytest -m gpu tests/test_kernels_gpu.py -q -p no:cacheprovider > h200.log 2>&1
