#!/usr/bin/env bash
# CPU, 2 cores, torch 2.13 (CPU build), gloo: the README's training command (600 steps).
# metrics.jsonl and loss.png are the run's; time.txt is the output of `time`.
time torchrun --standalone --nproc-per-node 2 launch/train.py --out runs/cpu
