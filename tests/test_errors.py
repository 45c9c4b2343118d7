"""Bad input raises a clear error on every rank, before any communication; nothing hangs."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

from distributed import spawn
from ringflash import Striped, ring_attention


def t(*shape, dtype=torch.float32, device="cpu"):
    return torch.randn(*shape, dtype=dtype, device=device)


# name -> (q, k, v, kwargs, exception type, words the message must contain)
def bad_cases():
    ok_q, ok_kv = (2, 8, 4, 16), (2, 8, 2, 16)
    return {
        "batch": (t(*ok_q), t(1, 8, 2, 16), t(1, 8, 2, 16), {}, ValueError, "batch"),
        "head_dim": (t(*ok_q), t(2, 8, 2, 32), t(2, 8, 2, 32), {}, ValueError, "head_dim"),
        "dtype": (t(*ok_q), t(*ok_kv, dtype=torch.float64), t(*ok_kv, dtype=torch.float64), {}, ValueError, "dtype"),
        "device": (t(*ok_q), t(*ok_kv, device="meta"), t(*ok_kv, device="meta"), {}, ValueError, "device"),
        "heads": (t(2, 8, 6, 16), t(2, 8, 4, 16), t(2, 8, 4, 16), {}, ValueError, "multiple of the number of key/value heads"),
        "no_kv_heads": (t(*ok_q), t(2, 8, 0, 16), t(2, 8, 0, 16), {}, ValueError, "at least one head"),
        "rank3": (t(2, 8, 64), t(2, 8, 64), t(2, 8, 64), {}, ValueError, "4-D"),
        "integer": (torch.ones(*ok_q, dtype=torch.int32),) * 3 + ({}, TypeError, "floating-point"),
        "k_v_shapes": (t(*ok_q), t(*ok_kv), t(2, 8, 4, 16), {}, ValueError, "k and v"),
        "local_lengths": (t(*ok_q), t(2, 6, 2, 16), t(2, 6, 2, 16), {}, ValueError, "same tokens"),
        "zigzag_odd": (t(2, 3, 4, 16), t(2, 3, 2, 16), t(2, 3, 2, 16), {"layout": "zigzag"}, ValueError, "multiple of 2"),
        "stripe_width": (t(2, 6, 4, 16), t(2, 6, 2, 16), t(2, 6, 2, 16), {"layout": Striped(stripe=4)}, ValueError, "multiple of 4"),
        "layout_name": (t(*ok_q), t(*ok_kv), t(*ok_kv), {"layout": "spiral"}, ValueError, "unknown layout"),
        "backend_name": (t(*ok_q), t(*ok_kv), t(*ok_kv), {"backend": "cuda-magic"}, ValueError, "unknown backend"),
        # Tensors the group's backend cannot move (gloo serves CPU tensors only).
        "group_device": (t(*ok_q, device="meta"), t(*ok_kv, device="meta"), t(*ok_kv, device="meta"), {}, ValueError, "cannot send meta tensors"),
    }


def _try_all(rank, world_size):
    results = {}
    for name, (q, k, v, kwargs, exc, words) in bad_cases().items():
        try:
            ring_attention(q, k, v, causal=True, **kwargs)
            results[name] = "no error"
        except exc as e:
            results[name] = "ok" if words in str(e) else f"message without {words!r}: {e}"
        except Exception as e:  # noqa: BLE001
            results[name] = f"{type(e).__name__}: {e}"
    # Ring transports (ringflash.comm.TRANSPORT) and settings that cannot serve this group.
    from ringflash import comm

    q, k = t(2, 8, 4, 16), t(2, 8, 2, 16)

    def refused(name, words, call, transport="copy_engine", signals="kernel", local_world=None):
        saved_env = os.environ.get("LOCAL_WORLD_SIZE")
        comm.TRANSPORT, comm.COPY_ENGINE_SIGNALS = transport, signals
        if local_world is not None:
            os.environ["LOCAL_WORLD_SIZE"] = local_world
        try:
            call()
            results[name] = "no error"
        except ValueError as e:
            results[name] = "ok" if words in str(e) else f"message without {words!r}: {e}"
        finally:
            comm.TRANSPORT, comm.COPY_ENGINE_SIGNALS = "nccl", "kernel"
            if saved_env is None:
                os.environ.pop("LOCAL_WORLD_SIZE", None)
            else:
                os.environ["LOCAL_WORLD_SIZE"] = saved_env

    ring = lambda: ring_attention(q, k, k, causal=True)  # noqa: E731
    refused("transport_cpu", "moves CUDA tensors", ring)
    refused("transport_unknown", "unknown ring transport", ring, transport="pigeon")
    # An unknown way of signalling over the copy engine.
    refused("transport_signals", "COPY_ENGINE_SIGNALS", ring, signals="semaphore")
    # A group spread over nodes (one rank per node here): the copy engine cannot reach.
    refused("transport_nodes", "on one node", ring, local_world="1")
    # A process that sees fewer GPUs than the group has ranks (one GPU per process under
    # Slurm's binding; none here) cannot map its peers' memory.
    refused("transport_visible_gpus", "see all GPUs of its group",
            lambda: comm.check_transport("copy_engine", None, torch.device("cuda", 0)))
    # A mask the SDPA engines cannot cut (stripes of 2 tokens): the verdict comes from the
    # positions of every step, so every rank raises, even those whose own steps would cut.
    from test_sdpa import EMULATED

    q2, k2 = t(2, 18, 4, 16), t(2, 18, 2, 16)
    try:
        ring_attention(q2, k2, k2, causal=True, layout=Striped(stripe=2), backend=EMULATED)
        results["sdpa_layout"] = "no error"
    except ValueError as e:
        results["sdpa_layout"] = "ok" if "cannot run causal ring attention over layout Striped(stripe=2)" in str(e) else str(e)
    # The group still works afterwards: nothing was half-sent.
    x = torch.ones(1)
    dist.all_reduce(x)
    results["group_alive"] = "ok" if x.item() == world_size else f"all_reduce gave {x.item()}"
    return results


@pytest.mark.parametrize("world_size", [2, 3])
def test_bad_input_raises_on_every_rank(world_size):
    for rank, res in enumerate(spawn(_try_all, world_size, timeout=120)):
        bad = {k: v for k, v in res.items() if v != "ok"}
        assert not bad, f"rank {rank}: {bad}"


def test_group_without_distributed():
    q = t(1, 4, 2, 8)
    with pytest.raises(ValueError, match="not initialised"):
        ring_attention(q, q, q, group=object())


def test_world_of_one_without_distributed_is_plain_attention():
    from ringflash import reference

    q, k, v = t(2, 10, 4, 16), t(2, 10, 2, 16), t(2, 10, 2, 16)
    out = ring_attention(q.double(), k.double(), v.double(), causal=True, layout="zigzag")
    ref, _ = reference.attention(q.double(), k.double(), v.double(), causal=True)
    assert ((out - ref).norm() / ref.norm()).item() < 1e-12


def _mismatched_calls(rank, world_size, case):
    """Calls that differ between ranks, with the consistency check on: a ValueError on every rank
    naming what differs; then the same group runs a matching call."""
    from ringflash import ring as ring_mod

    ring_mod.CHECK_CONSISTENCY = True
    L = 8
    kwargs = {}
    if case == "length":
        L = 8 if rank == 0 else 16
    elif case == "causal":
        kwargs["causal"] = rank != 1
    elif case == "layout":
        kwargs["layout"] = "zigzag" if rank == world_size - 1 else "striped"
    dtype = torch.float64 if case == "dtype" and rank != 0 else torch.float32
    q, k = t(1, L, 4, 8, dtype=dtype), t(1, L, 2, 8, dtype=dtype)
    try:
        ring_attention(q, k, k, **{"causal": True, **kwargs})
        verdict = "no error"
    except ValueError as e:
        field = {"length": "local_seqlen", "dtype": "dtype", "causal": "causal", "layout": "layout"}[case]
        verdict = "ok" if f"{field}: rank 0" in str(e) and "called differently" in str(e) else str(e)
    q, k = t(1, 8, 4, 8), t(1, 8, 2, 8)
    ring_attention(q, k, k, causal=True)  # the group is usable afterwards
    ring_mod.CHECK_CONSISTENCY = False
    return verdict


@pytest.mark.parametrize("case", ["length", "dtype", "causal", "layout"])
def test_consistency_check_names_the_difference_on_every_rank(case):
    assert spawn(_mismatched_calls, 3, case, timeout=120) == ["ok"] * 3


def _matching_calls_with_check(rank, world_size):
    from ringflash import reference
    from ringflash import ring as ring_mod
    from ringflash.layout import get_layout

    ring_mod.CHECK_CONSISTENCY = True
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 12, h, 8, generator=g, dtype=torch.float64) for h in (4, 2, 2))
    lay = get_layout("zigzag")
    out = ring_attention(*(lay.shard(x, rank=rank, world_size=world_size) for x in (q, k, v)), causal=True, layout=lay)
    ref, _ = reference.attention(q, k, v, causal=True)
    return ((out - lay.shard(ref, rank=rank, world_size=world_size)).norm() / ref.norm()).item()


def test_consistency_check_passes_matching_calls():
    assert max(spawn(_matching_calls_with_check, 2, timeout=120)) < 1e-12


@pytest.mark.parametrize("scale", [-0.25, 0.0, float("nan"), float("inf")])
def test_softmax_scale_must_be_finite_positive(scale):
    """A negative scale would turn each tile's row maximum into its minimum (NaN from exp2)."""
    from ringflash import flash_attention

    q = t(1, 8, 2, 16)
    with pytest.raises(ValueError, match="softmax_scale"):
        flash_attention(q, q, q, softmax_scale=scale)
    with pytest.raises(ValueError, match="softmax_scale"):
        ring_attention(q, q, q, softmax_scale=scale)


def test_head_dim_zero_is_refused():
    from ringflash import flash_attention

    q = t(1, 8, 2, 0)
    with pytest.raises(ValueError, match="head_dim must be at least 1"):
        flash_attention(q, q, q)


@pytest.mark.parametrize("backend", ["reference", "ring"])
def test_second_order_gradients_are_refused(backend):
    """The backward is not itself differentiable: asking for a gradient of the gradient raises
    instead of returning a wrong one."""
    from ringflash import flash_attention

    q, k, v = (t(1, 8, 2, 16, dtype=torch.float64).requires_grad_() for _ in range(3))
    attn = flash_attention if backend == "reference" else ring_attention
    out = attn(q, k, v, causal=True)
    (gq,) = torch.autograd.grad((out ** 2).sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        gq.square().sum().backward()


def test_half_given_positions_are_refused():
    from ringflash import reference

    q = t(1, 8, 2, 16)
    with pytest.raises(ValueError, match="both q_pos and k_pos"):
        reference.forward(q, q, q, q_pos=torch.arange(8) + 4, causal=True)
