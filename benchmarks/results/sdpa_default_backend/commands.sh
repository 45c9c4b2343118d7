#!/usr/bin/env bash
# One H200, torch 2.11: which SDPA backend PyTorch picks with no sdpa_kernel context.
python sdpa_default_backend.py > sdpa_default_backend_h200.txt
