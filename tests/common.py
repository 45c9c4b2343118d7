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


def make_qkv(B, Sq, Sk, H, Hkv, D, dtype, seed=0):
    """Fresh random q, k, v and dout (B, S, heads, D) in ``dtype``, from a seeded generator."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Sq, H, D, generator=g).to(dtype)
    k = torch.randn(B, Sk, Hkv, D, generator=g).to(dtype)
    v = torch.randn(B, Sk, Hkv, D, generator=g).to(dtype)
    dout = torch.randn(B, Sq, H, D, generator=g).to(dtype)
    return q, k, v, dout


def striped_positions(L, world, rank):
    """Striped layout (stripe 1): rank r holds global tokens r, r+P, r+2P, ..."""
    return rank + world * torch.arange(L)


def zigzag_positions(L, world, rank):
    """Zigzag layout: 2P chunks of L/2 tokens; rank r holds chunks r and 2P-1-r."""
    C = L // 2
    return torch.cat([rank * C + torch.arange(C), (2 * world - 1 - rank) * C + torch.arange(C)])


def brute_force_rule(q_pos, k_pos, causal, window, cu):
    """(Sq, Sk) visibility as the mask rules state it, read from the positions: causal ``k <= q``;
    window ``q - left <= k <= q + right`` (-1: unbounded); documents ``cu[d] <= p < cu[d + 1]``
    alike for q and k. Written independently of ringflash.mask, for the tests to check it."""
    qp, kp = q_pos[:, None].long(), k_pos[None, :].long()
    vis = torch.ones(len(q_pos), len(k_pos), dtype=torch.bool)
    if causal:
        vis &= kp <= qp
    if window is not None:
        left, right = window
        if left != -1:
            vis &= kp >= qp - left
        if right != -1:
            vis &= kp <= qp + right
    if cu is not None:
        ends = torch.tensor(list(cu)[1:], dtype=torch.long)
        doc = lambda p: (p[..., None] >= ends).sum(-1)  # noqa: E731 - documents ending at or before p
        vis &= doc(qp) == doc(kp)
    return vis


class CountExchanges:
    """Within ``with``: the ``hops`` of every ``Ring.exchange`` call, in order, in ``.hops``."""

    def __enter__(self):
        from ringflash import comm

        self.hops, self._real = [], comm.Ring.exchange
        real, seen = self._real, self.hops

        def counting(ring, send, recv, hops=1):
            seen.append(hops)
            return real(ring, send, recv, hops)

        comm.Ring.exchange = counting
        return self

    def take(self) -> list:
        """The hops counted since the last ``take``."""
        out = list(self.hops)
        self.hops.clear()
        return out

    def __exit__(self, *exc):
        from ringflash import comm

        comm.Ring.exchange = self._real


def require_interpreter() -> None:
    """At a test module's top, after ``TRITON_INTERPRET=1`` is set: skip the module if
    ringflash.kernels was imported before that (the kernels would not run on CPU tensors)."""
    import pytest

    from ringflash import kernels

    if not kernels.INTERPRETED:
        pytest.skip(
            "ringflash.kernels was imported before TRITON_INTERPRET=1 was set (by another test "
            "module); set TRITON_INTERPRET=1 in the environment to run the interpreter tests",
            allow_module_level=True,
        )
