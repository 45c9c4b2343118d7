"""The GPT on shards against the same GPT on the full sequence, and the batch helpers.

Spawned gloo ranks (reference backend, float64) run the sharded model on their shards of a
batch cut by :func:`ringflash.batch.shard_batch`; the oracle is the same model, same weights,
in this process without a process group, on the full sequences. Logits, the loss (the global
mean over the context-parallel group) and the parameter gradients after averaging over the
group as :mod:`ringflash.batch` says must match to float64 rounding.
"""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch
import torch.nn.functional as F

from common import rel, pack, unpack
from distributed import spawn
from ringflash.batch import average_gradients, shard_batch, sharded_cross_entropy, unshard
from ringflash import models
from ringflash.models import GPT, GPTConfig

LAYOUTS = ["contiguous", "striped", "zigzag"]
CONFIG = GPTConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, rope_base=100.0)
BATCH, SEQLEN = 2, 16
IGNORED = 5  # the first IGNORED labels of every row are -100: the ranks' token counts differ
TOL = 1e-10




def _model(seed: int, group=None, **overrides) -> GPT:
    torch.manual_seed(seed)  # the same weights on every rank and in the oracle
    return GPT(dataclasses.replace(CONFIG, **overrides), group=group).double()


def _batch(seed: int, seqlen: int = SEQLEN):
    g = torch.Generator().manual_seed(seed + 1)
    ids = torch.randint(0, CONFIG.vocab_size, (BATCH, seqlen), generator=g)
    labels = ids.clone()
    labels[:, : IGNORED + 1] = -100  # after the shift: the first IGNORED targets are ignored
    return ids, labels


def _full(model: GPT, ids, labels):
    """The model on the full sequences, one process: logits, loss, gradients by name."""
    targets = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], dim=1)
    logits, loss = model(ids, targets)
    loss.backward()
    return logits.detach(), loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _sharded(model: GPT, ids, labels, layout, group=None, average=True, pad_id=None):
    ids_l, labels_l, _ = shard_batch(ids, labels, layout=layout, group=group, pad_id=pad_id)
    logits, loss = model(ids_l, labels_l)
    loss.backward()
    if average:
        average_gradients(model.parameters(), group)
    logits = unshard(logits.detach(), layout=layout, group=group)
    # torch.compile and DDP wrap the model: name the gradients as the bare model does.
    names = lambda n: n.removeprefix("_orig_mod.").removeprefix("module.")  # noqa: E731
    return logits, loss.detach(), {names(n): p.grad.clone() for n, p in model.named_parameters()}


def _gpt_grid(rank, world_size, seed):
    results = {}
    for i, layout in enumerate(LAYOUTS):
        ids, labels = _batch(seed + i)
        results[layout] = _sharded(_model(seed + i, layout=layout), ids, labels, layout)
    # Activation checkpointing, and torch.compile of the whole sharded model as one graph
    # (fullgraph: a graph break raises): ring attention, rotary tables, the loss's all-reduce.
    ids, labels = _batch(seed + 1)
    results["checkpoint"] = _sharded(_model(seed + 1, layout="striped", checkpoint=True), ids, labels, "striped")
    compiled = torch.compile(_model(seed + 1, layout="striped"), backend="aot_eager", fullgraph=True)
    results["compile"] = _sharded(compiled, ids, labels, "striped")
    # A sequence the layout cannot split, padded by shard_batch.
    ids, labels = _batch(seed + 2, seqlen=SEQLEN - 3)
    results["padded"] = _sharded(_model(seed + 2, layout="zigzag"), ids, labels, "zigzag", pad_id=0)[1]
    try:
        shard_batch(ids, labels, layout="zigzag")
    except ValueError as e:
        results["unpadded-error"] = str(e)
    ids_p, labels_p, pos = shard_batch(ids, labels, layout="zigzag", pad_id=0)
    results["padded-shapes"] = (tuple(ids_p.shape), tuple(labels_p.shape), pos.tolist())
    return pack(results) if rank == 0 else None


def _dp_cp(rank, world_size, seed):
    """4 ranks as a ("dp", "cp") mesh of 2 x 2, DDP over all four ranks: gradients averaged over dp x cp."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.nn.parallel import DistributedDataParallel as DDP

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "cp"))
    dp = mesh["dp"].get_local_rank()
    model = DDP(_model(seed, group=mesh["cp"], layout="zigzag"))
    ids, labels = _batch(seed + 10 + dp)  # each data-parallel replica has its own batch
    logits, loss, grads = _sharded(model, ids, labels, "zigzag", group=mesh["cp"], average=False)
    return pack((dp, logits, loss, grads))


def _fsdp_dp_cp(rank, world_size, seed):
    """The same mesh with FSDP2 (fully_shard per block and at the root, over all four ranks)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "cp"))
    world = init_device_mesh("cpu", (4,))
    dp = mesh["dp"].get_local_rank()
    model = _model(seed, group=mesh["cp"], layout="zigzag")
    for block in model.blocks:
        fully_shard(block, mesh=world)
    fully_shard(model, mesh=world)
    ids, labels = _batch(seed + 10 + dp)
    ids_l, labels_l, _ = shard_batch(ids, labels, layout="zigzag", group=mesh["cp"])
    logits, loss = model(ids_l, labels_l)
    loss.backward()
    grads = {n: p.grad.full_tensor() for n, p in model.named_parameters()}  # sharded DTensors
    logits = unshard(logits.detach(), layout="zigzag", group=mesh["cp"])
    return pack((dp, logits, loss.detach(), grads))


_SEED = random.randrange(1 << 30)  # fresh inputs every run; printed on failure
_RUNS: dict = {}


def gpt_grid() -> dict:
    if "grid" not in _RUNS:
        _RUNS["grid"] = unpack(spawn(_gpt_grid, 2, _SEED, timeout=240)[0])
    return _RUNS["grid"]


def _compare(got, ref, what):
    logits, loss, grads = got
    ref_logits, ref_loss, ref_grads = ref
    assert rel(logits, ref_logits) < TOL, (what, _SEED)
    assert abs(loss.item() - ref_loss.item()) < TOL * ref_loss.item(), (what, loss.item(), ref_loss.item(), _SEED)
    assert grads.keys() == ref_grads.keys()
    errs = {n: rel(grads[n], ref_grads[n]) for n in grads}
    assert all(e < TOL for e in errs.values()), (what, _SEED, errs)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_sharded_gpt_matches_full_sequence(layout):
    i = LAYOUTS.index(layout)
    ref = _full(_model(_SEED + i, layout=layout), *_batch(_SEED + i))
    _compare(gpt_grid()[layout], ref, layout)


def test_sharded_gpt_checkpoint_and_compile():
    ref = _full(_model(_SEED + 1, layout="striped"), *_batch(_SEED + 1))
    _compare(gpt_grid()["checkpoint"], ref, "checkpoint")
    _compare(gpt_grid()["compile"], ref, "compile")


def test_shard_batch_padding():
    res = gpt_grid()
    ids, labels = _batch(_SEED + 2, seqlen=SEQLEN - 3)
    # The oracle runs the 13 real tokens unpadded (one process, contiguous: any length splits).
    _, ref_loss, _ = _full(_model(_SEED + 2, layout="contiguous"), ids, labels)
    assert abs(res["padded"].item() - ref_loss.item()) < TOL * ref_loss.item()
    assert "multiple of 4" in res["unpadded-error"]
    # 13 tokens padded to 16 over 2 ranks of zigzag: rank 0 holds chunks 0 and 3.
    assert res["padded-shapes"] == ((BATCH, 8), (BATCH, 8), [0, 1, 2, 3, 12, 13, 14, 15])


@pytest.mark.parametrize("wrapper", ["ddp", "fsdp"])
def test_data_parallel_over_data_and_context_parallel_mesh(wrapper):
    runs = [unpack(r) for r in spawn({"ddp": _dp_cp, "fsdp": _fsdp_dp_cp}[wrapper], 4, _SEED, timeout=240)]
    refs = [_full(_model(_SEED, layout="zigzag"), *_batch(_SEED + 10 + dp)) for dp in range(2)]
    mean_grads = {n: (refs[0][2][n] + refs[1][2][n]) / 2 for n in refs[0][2]}
    for rank, (dp, logits, loss, grads) in enumerate(runs):
        assert dp == rank // 2
        _compare((logits, loss, grads), (refs[dp][0], refs[dp][1], mean_grads), f"rank {rank}")


# -- one process -----------------------------------------------------------------------------


def test_single_process_loss_is_mean_cross_entropy():
    model = _model(0)
    ids, labels = _batch(0)
    ids_l, labels_l, pos = shard_batch(ids, labels)  # no process group: the whole sequence
    assert torch.equal(ids_l, ids) and torch.equal(pos, torch.arange(SEQLEN))
    assert torch.equal(labels_l[:, :-1], labels[:, 1:]) and (labels_l[:, -1] == -100).all()
    logits, loss = model(ids_l, labels_l)
    assert logits.shape == (BATCH, SEQLEN, CONFIG.vocab_size)
    ref = F.cross_entropy(logits.flatten(0, 1), labels_l.flatten(), ignore_index=-100)
    assert torch.allclose(loss.double(), ref, rtol=1e-6)
    assert model(ids_l)[1] is None
    assert model.head.weight is model.tok_emb.weight
    untied = _model(0, tie_embeddings=False)
    assert untied.head.weight is not untied.tok_emb.weight
    assert not torch.equal(untied.head.weight, untied.tok_emb.weight)


def test_all_labels_ignored_gives_zero_loss():
    logits = torch.randn(1, 4, 8, requires_grad=True)
    loss = sharded_cross_entropy(logits, torch.full((1, 4), -100))
    assert loss.item() == 0.0
    loss.backward()
    assert (logits.grad == 0).all()


def test_checkpoint_single_process(monkeypatch):
    ids, labels = _batch(3)
    a = _full(_model(3), ids, labels)
    calls = []
    real = models.checkpoint
    monkeypatch.setattr(models, "checkpoint", lambda *args, **kw: calls.append(1) or real(*args, **kw))
    b = _full(_model(3, checkpoint=True), ids, labels)
    assert len(calls) == CONFIG.n_layers  # every block ran under activation checkpointing
    _compare(b, a, "checkpoint")


def test_compile_single_process():
    """Inductor on the CPU, a tiny model: compiled logits, loss and gradients match eager."""
    ids, labels = _batch(4)
    ref = _full(_model(4, n_layers=1), ids, labels)
    model = _model(4, n_layers=1)
    got = _full(torch.compile(model, fullgraph=True), ids, labels)
    got = (got[0], got[1], {n.removeprefix("_orig_mod."): g for n, g in got[2].items()})
    logits, loss, grads = got
    assert rel(logits, ref[0]) < 1e-12 and abs(loss - ref[1]) < 1e-12
    assert all(rel(grads[n], ref[2][n]) < 1e-12 for n in grads), _SEED


@pytest.mark.parametrize("overrides,match", [
    (dict(dim=30), "divisible by num_heads"),
    (dict(n_kv_heads=3), "divisible by num_kv_heads"),
    (dict(n_layers=0), "n_layers"),
    (dict(rope_base=0.0), "rope_base"),  # gave a NaN loss
])
def test_config_errors(overrides, match):
    with pytest.raises(ValueError, match=match):
        GPT(dataclasses.replace(CONFIG, **overrides))


def test_forward_errors():
    model = GPT(dataclasses.replace(CONFIG, layout="zigzag"))
    with pytest.raises(ValueError, match="2-D"):
        model(torch.zeros(2, 8, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="labels_local"):
        model(torch.zeros(2, 8, dtype=torch.long), torch.zeros(2, 6, dtype=torch.long))
    logits, _ = model(torch.zeros(2, 7, dtype=torch.long))  # one process: any length, any layout
    assert logits.shape[:2] == (2, 7)
    with pytest.raises(ValueError, match="2-D"):
        shard_batch(torch.zeros(8, dtype=torch.long))
    _, _, pos = shard_batch(torch.zeros(2, 7, dtype=torch.long), layout="zigzag")  # one process
    assert torch.equal(pos, torch.arange(7))


@pytest.mark.quick
def test_window_per_call_and_in_the_config():
    """``GPT.forward(window=...)`` sets every layer's window for that call; ``GPTConfig.window``
    takes N (each token sees the N before it) or flash-attn's (left, right); both checked."""
    ids, labels = _batch(3, 24)
    base = _model(3).double()
    windowed = _model(3, window=4).double()
    windowed.load_state_dict(base.state_dict())
    pair = _model(3, window=(4, -1)).double()  # causal: the right side is moot
    pair.load_state_dict(base.state_dict())
    want, _ = windowed(ids, labels)
    assert rel(base(ids, labels, window=(4, 0))[0], want) < 1e-12
    assert rel(pair(ids, labels)[0], want) < 1e-12
    assert rel(windowed(ids, labels, window=None)[0], base(ids, labels)[0]) < 1e-12
    assert rel(want, base(ids, labels)[0]) > 1e-3  # the window changes the logits
    cu = [0, 10, 24]
    assert rel(base(ids, labels, cu_seqlens=cu, window=(4, 0))[0], windowed(ids, labels, cu_seqlens=cu)[0]) < 1e-12
    for bad in (-1, (4,), (4, -2), 2.5):
        with pytest.raises(ValueError, match="window"):
            GPT(dataclasses.replace(_model(3).config, window=bad))
    with pytest.raises(ValueError, match="window"):
        base(ids, labels, window=(-3, 0))
