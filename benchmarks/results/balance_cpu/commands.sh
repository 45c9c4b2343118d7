#!/usr/bin/env bash
# CPU only (2 cores), torch 2.13.0 (CPU build), from the repository root:
#   python3 -m venv /tmp/venv_bal && . /tmp/venv_bal/bin/activate
#   pip install torch==2.13.0 && pip install -e ".[test]"
set -euo pipefail
python benchmarks/bench_balance.py \
    --out benchmarks/results/balance_cpu/balance.jsonl \
    --txt benchmarks/results/balance_cpu/balance.txt
