#!/usr/bin/env bash
# 2 x H200, the whole multi-GPU suite with the code of commit b901a7f: 91 passed on each rank.
time torchrun --standalone --nproc-per-node 2 -m pytest tests/test_ring_gpu.py tests/test_nn_gpu.py -m multigpu \
    -q -p no:cacheprovider > tests_2026-11-23.log 2>&1
