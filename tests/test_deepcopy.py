"""Copies of modules built with a process group: ``copy.deepcopy``, ``AveragedModel``, ``torch.save``.

The modules keep their group as an attribute; a ProcessGroup cannot be pickled, and
``copy.deepcopy`` used to pickle it. In a 2-rank gloo job (reference backend, float64) a GPT
and a MultiheadAttention built with a ProcessGroup are deep-copied and wrapped in
``torch.optim.swa_utils.AveragedModel``: the copy shares the group, owns its parameters, and
computes the same output, loss and gradients as the original. ``torch.save(model)`` raises a
TypeError that says to save the state dict.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.distributed as dist
from torch.optim.swa_utils import AveragedModel

from distributed import spawn
from ringflash import MultiheadAttention
from ringflash.batch import shard_batch
from ringflash.models import GPT, GPTConfig

CONFIG = GPTConfig(vocab_size=32, dim=16, n_layers=2, n_heads=4, n_kv_heads=2)
BATCH, SEQLEN = 2, 16


def _groups_of(module) -> list:
    return [m.group for m in module.modules() if "group" in m.__dict__]


def _check_copy(original, clone, group) -> None:
    """The clone shares the group and owns its parameters (ties kept)."""
    assert clone is not original
    groups = _groups_of(clone)
    assert groups and all(g is group for g in groups), groups
    ptrs = {p.data_ptr() for p in original.parameters()}
    for (n, p), (n2, p2) in zip(original.named_parameters(), clone.named_parameters()):
        assert n == n2 and p is not p2 and p2.data_ptr() not in ptrs, n
        assert torch.equal(p, p2), n
    if isinstance(original, GPT) and CONFIG.tie_embeddings:
        assert clone.head.weight is clone.tok_emb.weight


def _gpt_run(model, ids, labels):
    model.zero_grad(set_to_none=True)
    logits, loss = model(ids, labels)
    loss.backward()
    return logits.detach(), loss.detach(), [p.grad.clone() for p in model.parameters()]


def _same(a, b) -> bool:
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return torch.equal(a, b)


def _copies(rank, world_size):
    pg = dist.new_group(list(range(world_size)))  # a ProcessGroup object, not the default group
    out = {}

    torch.manual_seed(0)  # the same weights and batch on every rank
    model = GPT(CONFIG, group=pg, backend="reference").double()
    full = torch.randint(0, CONFIG.vocab_size, (BATCH, SEQLEN))
    ids, labels, _ = shard_batch(full, layout=CONFIG.layout, group=pg)
    ref = _gpt_run(model, ids, labels)

    clone = copy.deepcopy(model)
    _check_copy(model, clone, pg)
    out["gpt_deepcopy"] = _same(_gpt_run(clone, ids, labels), ref)
    with torch.no_grad():
        next(clone.parameters()).add_(1.0)
    out["gpt_independent"] = not torch.equal(next(clone.parameters()), next(model.parameters()))

    averaged = AveragedModel(model)
    _check_copy(model, averaged.module, pg)
    averaged.update_parameters(model)
    out["gpt_averaged"] = _same(_gpt_run(averaged.module, ids, labels), ref)

    try:
        torch.save(model, io.BytesIO())
        out["gpt_save"] = "saved"
    except TypeError as e:
        out["gpt_save"] = str(e)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)  # the supported way
    buf.seek(0)
    fresh = GPT(CONFIG, group=pg, backend="reference").double()
    fresh.load_state_dict(torch.load(buf))
    out["gpt_state_dict"] = _same(_gpt_run(fresh, ids, labels), ref)

    torch.manual_seed(1)
    mha = MultiheadAttention(16, 4, num_kv_heads=2, group=pg, backend="reference").double()
    x = torch.randn(BATCH, SEQLEN // world_size, 16, dtype=torch.float64)
    y = mha(x)
    mha_clone = copy.deepcopy(mha)
    _check_copy(mha, mha_clone, pg)
    out["mha_deepcopy"] = torch.equal(mha_clone(x), y)
    mha_avg = AveragedModel(mha)
    _check_copy(mha, mha_avg.module, pg)
    out["mha_averaged"] = torch.equal(mha_avg(x), y)

    # A 1-D DeviceMesh is shared the same way (and, unlike a ProcessGroup, pickles).
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("cp",))
    torch.manual_seed(0)
    mesh_model = GPT(CONFIG, group=mesh, backend="reference").double()
    mesh_clone = copy.deepcopy(mesh_model)
    _check_copy(mesh_model, mesh_clone, mesh)
    out["mesh_deepcopy"] = _same(_gpt_run(mesh_clone, ids, labels), _gpt_run(mesh_model, ids, labels))
    return out


_RUNS: dict = {}


def runs() -> list[dict]:
    if "copies" not in _RUNS:
        _RUNS["copies"] = spawn(_copies, 2, timeout=240)
    return _RUNS["copies"]


@pytest.mark.parametrize(
    "what", ["gpt_deepcopy", "gpt_independent", "gpt_averaged", "gpt_state_dict", "mha_deepcopy", "mha_averaged",
             "mesh_deepcopy"],
)
def test_copy_shares_group_and_matches(what):
    for rank, out in enumerate(runs()):
        assert out[what] is True, (what, rank, out[what])


def test_torch_save_of_model_with_process_group_says_to_save_state_dict():
    for out in runs():
        msg = out["gpt_save"]
        assert "cannot be pickled" in msg and "ProcessGroup" in msg and "state_dict()" in msg, msg


def test_deepcopy_without_group():
    torch.manual_seed(0)
    model = GPT(CONFIG).double()
    clone = copy.deepcopy(model)
    assert clone.group is None
    ids = torch.randint(0, CONFIG.vocab_size, (1, 8))
    assert torch.equal(clone(ids)[0], model(ids)[0])
    assert all(p is not q for p, q in zip(model.parameters(), clone.parameters()))
    buf = io.BytesIO()
    torch.save(model, buf)  # no process group: the whole module pickles
    buf.seek(0)
    assert torch.equal(torch.load(buf, weights_only=False)(ids)[0], model(ids)[0])
