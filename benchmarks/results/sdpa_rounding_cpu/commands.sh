#!/usr/bin/env bash
# CPU, torch 2.13: the SDPA engines' per-step bf16 rounding, emulated, against one rounding at the end.
python -m pytest tests/test_sdpa.py -k rounding -s > sdpa_rounding_cpu.txt
