"""The modules and the GPT sharded over several GPUs (NCCL, Triton kernels) against one GPU.

Run under torchrun, on 2 or more GPUs of one node, from the repository root:

    torchrun --nproc-per-node 4 -m pytest tests/test_nn_gpu.py -m multigpu -q
    torchrun --nproc-per-node 4 tests/test_nn_gpu.py          # the same checks as a script

Every rank runs every check in the same order (the collectives line up) and asserts only
after its last collective. The oracle is the same module, same weights, over the full
sequence in float64 (reference backend) on a process group of one rank; the bar in bf16 is
the same module over the full sequence on one GPU in bf16 (Triton): the sharded error must
be within 2x of it, for outputs, input gradients and every parameter gradient.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ringflash import MultiheadAttention, get_layout  # noqa: E402
from ringflash.batch import average_gradients, shard_batch, unshard  # noqa: E402
from ringflash.models import GPT, GPTConfig  # noqa: E402

pytestmark = pytest.mark.multigpu

_TORCHRUN = "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1
if __name__ != "__main__" and not (torch.cuda.is_available() and _TORCHRUN):
    pytest.skip("needs torchrun over 2 or more CUDA GPUs", allow_module_level=True)

LAYOUTS = ["contiguous", "striped", "zigzag"]
HEADS = [(8, 8), (8, 2)]  # MHA, GQA
BATCH, DIM, LOCAL_SEQLEN = 2, 512, 256  # head_dim 64
GPT_CONFIG = GPTConfig(vocab_size=256, dim=256, n_layers=2, n_heads=4, n_kv_heads=2)
KERNEL = "triton"  # the backend under test
# Absolute slack on the 2x bar, for a tensor that bf16 happens to round almost exactly; the
# loss is a mean over thousands of tokens whose rounding errors mostly cancel.
FLOOR, LOSS_FLOOR = 1e-4, 2e-3

_STATE: dict = {}


def setup() -> tuple[torch.device, object]:
    """(this rank's GPU, a process group of this rank alone) after initialising NCCL once."""
    if "device" not in _STATE:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group("nccl", device_id=device)
        single, _ = dist.new_subgroups(group_size=1)
        _STATE.update(device=device, single=single)
    return _STATE["device"], _STATE["single"]


@pytest.fixture(scope="module", autouse=True)
def _distributed():
    setup()
    yield
    dist.barrier()  # the process group lives on to the end of the session (tests/conftest.py)


def rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.double(), ref.double()
    return ((x - ref).norm() / ref.norm().clamp(min=1e-30)).item()


def _check(errs: dict, bars: dict, what: str) -> None:
    floor = lambda n: LOSS_FLOOR if n == "loss" else FLOOR  # noqa: E731
    # `not <=`: a NaN error or bar fails too.
    bad = {n: f"{errs[n]:.2e} > 2 x {bars[n]:.2e}" for n in errs if not errs[n] <= 2 * bars[n] + floor(n)}
    assert not bad, f"rank {dist.get_rank()}, {what}: {bad}"


# -- MultiheadAttention ----------------------------------------------------------------------


def _mha(seed, heads, heads_kv, layout, group, backend, dtype, device):
    torch.manual_seed(seed)  # the same weights on every rank
    mha = MultiheadAttention(DIM, heads, num_kv_heads=heads_kv, layout=layout, group=group, backend=backend)
    return mha.to(device, dtype)


def _mha_run(mha, x, dout):
    x = x.detach().clone().requires_grad_()
    out = mha(x)
    out.backward(dout)
    return {"out": out.detach(), "dx": x.grad} | {n: p.grad for n, p in mha.named_parameters()}


def _mha_case(layout_name, heads, heads_kv, seed, group=None):
    device, single = setup()
    world_size, rank = dist.get_world_size(), dist.get_rank()
    layout = get_layout(layout_name)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(BATCH, LOCAL_SEQLEN * world_size, DIM, generator=g).to(device)
    dout = torch.randn(x.shape, generator=g).to(device)

    ref = _mha_run(_mha(seed, heads, heads_kv, layout, single, "reference", torch.float64, device), x.double(), dout.double())
    one = _mha_run(_mha(seed, heads, heads_kv, layout, single, KERNEL, torch.bfloat16, device), x.bfloat16(), dout.bfloat16())
    shard = lambda t: layout.shard(t, rank=rank, world_size=world_size)  # noqa: E731
    sharded = _mha_run(
        _mha(seed, heads, heads_kv, layout, group, KERNEL, torch.bfloat16, device),
        shard(x).bfloat16(), shard(dout).bfloat16(),
    )
    got = {}
    for name, t in sharded.items():
        if name in ("out", "dx"):
            got[name] = layout.unshard(t)
        else:
            got[name] = t.double()
            dist.all_reduce(got[name])  # each rank holds its tokens' share of the gradient
    return {n: rel(got[n], ref[n]) for n in ref}, {n: rel(one[n], ref[n]) for n in ref}


@pytest.mark.parametrize("heads", HEADS, ids=[f"{h}q{k}kv" for h, k in HEADS])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_mha_bf16_matches_one_gpu(layout, heads):
    errs, bars = _mha_case(layout, *heads, seed=1000 * LAYOUTS.index(layout) + heads[1])
    _check(errs, bars, f"{layout} {heads}")


def test_mha_device_mesh_group():
    from torch.distributed.device_mesh import init_device_mesh

    device, _ = setup()
    mesh = init_device_mesh(device.type, (dist.get_world_size(),), mesh_dim_names=("cp",))
    errs, bars = _mha_case("striped", 8, 2, seed=7, group=mesh)
    _check(errs, bars, "mesh")


# -- GPT ---------------------------------------------------------------------------------------


def _gpt(seed, group, backend, device, dtype=torch.float32):
    torch.manual_seed(seed)
    return GPT(dataclasses.replace(GPT_CONFIG, layout="zigzag"), group=group, backend=backend).to(device, dtype)


def _gpt_run(model, ids, *, group, compile=False):
    """Logits (full), loss and parameter gradients (averaged over the group) of one step.

    bf16 autocast unless the model is float64; with the group of one rank this is the model
    on the full sequence.
    """
    layout = model.config.layout
    ids_l, labels_l, _ = shard_batch(ids, layout=layout, group=group)
    fn = torch.compile(model, fullgraph=True) if compile else model  # fullgraph: a graph break raises
    with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=next(model.parameters()).dtype != torch.float64):
        logits, loss = fn(ids_l, labels_l)
    loss.backward()
    average_gradients(model.parameters(), group)
    logits = unshard(logits.detach(), layout=layout, group=group)
    return {"logits": logits.detach(), "loss": loss.detach()} | {n: p.grad for n, p in model.named_parameters()}


def _gpt_errors(seed, *, compile=False, backend=KERNEL):
    device, single = setup()
    g = torch.Generator().manual_seed(seed + 1)
    seqlen = LOCAL_SEQLEN * dist.get_world_size()
    ids = torch.randint(0, GPT_CONFIG.vocab_size, (BATCH, seqlen), generator=g).to(device)
    ref = _gpt_run(_gpt(seed, single, "reference", device, torch.float64), ids, group=single)
    one = _gpt_run(_gpt(seed, single, backend, device), ids, group=single)
    got = _gpt_run(_gpt(seed, None, backend, device), ids, group=None, compile=compile)
    return {n: rel(got[n], ref[n]) for n in ref}, {n: rel(one[n], ref[n]) for n in ref}


def test_gpt_bf16_matches_one_gpu():
    errs, bars = _gpt_errors(seed=11)
    _check(errs, bars, "GPT eager")


def test_gpt_compiled_matches_eager():
    """torch.compile (inductor) of the sharded GPT: as accurate as the eager model on one GPU."""
    errs, bars = _gpt_errors(seed=12, compile=True)
    _check(errs, bars, "GPT compiled")


def test_gpt_compiled_cudnn_engine():
    """The compiled GPT on the cuDNN engine, as one graph (fullgraph): ring attention is the custom op."""
    errs, bars = _gpt_errors(seed=13, compile=True, backend="cudnn")
    _check(errs, bars, "GPT compiled, cuDNN engine")


# -- script form -------------------------------------------------------------------------------


def main() -> int:
    checks = [(f"test_mha_bf16_matches_one_gpu[{l}-{h}q{k}kv]", test_mha_bf16_matches_one_gpu, (l, (h, k)))
              for (h, k) in HEADS for l in LAYOUTS]
    checks += [(f.__name__, f, ()) for f in (test_mha_device_mesh_group, test_gpt_bf16_matches_one_gpu,
                                              test_gpt_compiled_matches_eager, test_gpt_compiled_cudnn_engine)]
    setup()
    failed = 0
    for name, fn, args in checks:
        try:
            fn(*args)
            status = "ok"
        except AssertionError as e:
            failed += 1
            status = f"FAILED: {e}"
        print(f"[rank {dist.get_rank()}] {name}: {status}", flush=True)
    dist.barrier()
    dist.destroy_process_group()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
