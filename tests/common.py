"""Helpers shared by the CPU tests."""

from __future__ import annotations

import io

import torch


def rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    """``‖x − ref‖ / ‖ref‖``, computed in float64."""
    x, ref = x.double(), ref.double()
    return ((x - ref).norm() / ref.norm()).item()


def pack(obj) -> bytes:
    """Tensors cross back from a spawned rank as bytes: a shared-memory handle would not
    outlive the worker."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def unpack(data: bytes):
    return torch.load(io.BytesIO(data))
