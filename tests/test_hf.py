"""ringflash.hf: transformers models with "ring_attention" against the same models with
transformers' own attention ("eager" or "sdpa") on one process over the full sequence.

Each world size is spawned once (gloo, reference engine): every rank runs the grid of models
x layouts x batches below on its shards and sends back its logits, its loss and its parameter
gradients, then the misuses that must raise ``ValueError`` on every rank. The parent compares:
logits against the reference's logits at the rank's layout positions, the mean of the ranks'
losses against the full loss, and the mean of the ranks' gradients (what an all-reduce over the
group gives) against the full-sequence gradients. Weights and tokens are made here and sent to
the ranks, so the oracle and the sharded models hold the same ones.

Packed documents are checked against the reference model run on each document alone (positions
from 0), with the loss summed over the documents' targets and divided by their number.
"""

from __future__ import annotations

import copy
import itertools
import random

import pytest
import torch

transformers = pytest.importorskip("transformers")

import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config  # noqa: E402

import ringflash.hf as rhf  # noqa: E402
from common import pack, rel, unpack  # noqa: E402
from distributed import spawn  # noqa: E402
from ringflash import get_layout  # noqa: E402
from ringflash.batch import IGNORE_INDEX  # noqa: E402

WORLD_SIZES = [2, 3]
LAYOUTS = ["striped", "zigzag", "contiguous"]
MODELS = ["llama", "mistral", "qwen2"]
# How the batch reaches shard_inputs: one sequence per row; packed documents given as
# position_ids restarting at 0; the same documents given as cu_seqlens.
BATCHES = ["dense", "docs-positions", "docs-cu"]
REFERENCE = {"llama": "sdpa", "mistral": "eager", "qwen2": "eager"}  # transformers' attention for the oracle
BATCH, SEQLEN, VOCAB = 2, 24, 64  # 24: zigzag over 3 ranks needs a multiple of 6
DOCS = [0, 7, 17, 24]
TOL = 1e-5

CASES = list(itertools.product(MODELS, LAYOUTS, BATCHES))


def _config(name: str, **extra):
    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, use_cache=False, attention_dropout=0.0)
    if name == "llama":
        return LlamaConfig(**{**common, **extra})
    if name == "mistral":  # a window of 5 on every layer
        return MistralConfig(**{**common, "sliding_window": 5, **extra})
    if name == "qwen2":  # layer 0 full attention, layer 1 a window of 5
        return Qwen2Config(**{**common, "use_sliding_window": True, "sliding_window": 5, "max_window_layers": 1,
                              **extra})
    raise AssertionError(name)


def _model(cfg, attn: str, state=None):
    # from_config writes the implementation into the config it is given: a copy each time.
    model = AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation=attn).float()
    if state is not None:
        model.load_state_dict(state)
    return model


def _grads(model) -> list:
    return [p.grad.detach().clone() for _, p in model.named_parameters()]


def _tokens(seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (BATCH, SEQLEN), generator=torch.Generator().manual_seed(seed))


def _doc_positions() -> torch.Tensor:
    return torch.cat([torch.arange(b - a) for a, b in zip(DOCS[:-1], DOCS[1:])])[None].expand(BATCH, -1)


def _shard(ids, batch: str, **kw) -> dict:
    if batch == "dense":
        return rhf.shard_inputs(ids, **kw)
    if batch == "docs-positions":
        return rhf.shard_inputs(ids, position_ids=_doc_positions(), **kw)
    return rhf.shard_inputs(ids, cu_seqlens=DOCS, **kw)


# -- the oracle: one process, transformers' own attention, the full sequence ------------------

_SEED = random.randrange(1 << 30)  # fresh weights and tokens every run; printed on failure
_REFS: dict = {}


def weights(name: str) -> dict:
    """The model's weights for every run of this session (the oracle's and the ranks')."""
    if ("weights", name) not in _REFS:
        torch.manual_seed(_SEED + MODELS.index(name))
        _REFS[("weights", name)] = _model(_config(name), REFERENCE[name]).state_dict()
    return _REFS[("weights", name)]


def reference(name: str, docs: bool, attn: str | None = None, **extra) -> dict:
    """Logits (batch, seqlen, vocab), loss and parameter gradients of the reference model."""
    key = (name, docs, attn, tuple(sorted(extra.items())))
    if key not in _REFS:
        model = _model(_config(name, **extra), attn or REFERENCE[name], weights(name))
        ids = _tokens(_SEED)
        if not docs:
            out = model(input_ids=ids, labels=ids)
            logits, loss = out.logits, out.loss
        else:  # each document alone, positions from 0; the loss averages over all documents' targets
            pieces, total, count = [], 0.0, 0
            for a, b in zip(DOCS[:-1], DOCS[1:]):
                lg = model(input_ids=ids[:, a:b]).logits
                pieces.append(lg)
                total = total + F.cross_entropy(lg[:, :-1].flatten(0, 1).float(), ids[:, a + 1:b].flatten(),
                                                reduction="sum")
                count += ids[:, a + 1:b].numel()
            logits, loss = torch.cat(pieces, dim=1), total / count
        loss.backward()
        _REFS[key] = {"logits": logits.detach(), "loss": loss.detach(), "grads": _grads(model),
                      "names": [n for n, _ in model.named_parameters()]}
    return _REFS[key]


# -- the ranks ---------------------------------------------------------------------------------


def _catch(fn) -> str:
    """The ValueError's message, or what happened instead."""
    try:
        fn()
    except ValueError as e:
        return "ValueError: " + str(e)
    return "no error"


def _errors(rank, world_size, states, ids) -> dict:
    """Misuses that must raise ValueError on this rank (and so on every rank)."""
    out = {}
    cfg = _config("llama")
    model = _model(cfg, "ring_attention", states["llama"])
    with rhf.configure(layout="striped"):
        batch = rhf.shard_inputs(ids)
        # Padding that only rank 0's shard holds: every rank must learn of it.
        mask = torch.ones_like(batch["input_ids"])
        if rank == 0:
            mask[0, 0] = 0
        out["padding on rank 0"] = _catch(lambda: model(**batch, attention_mask=mask))
        # Shards cut by another layout than the model's.
        other = rhf.shard_inputs(ids, layout="contiguous")
        out["cut by another layout"] = _catch(lambda: model(**other))
        # A padding mask given to shard_inputs, and rows with different documents.
        padded = torch.ones_like(ids)
        padded[1, -3:] = 0
        out["shard_inputs padding"] = _catch(lambda: rhf.shard_inputs(ids, attention_mask=padded))
        rows = torch.stack([_doc_positions()[0], torch.arange(SEQLEN)])
        out["shard_inputs rows differ"] = _catch(lambda: rhf.shard_inputs(ids, position_ids=rows))
        # Documents that one rank drops from its batch.
        docs = rhf.shard_inputs(ids, cu_seqlens=DOCS)
        if rank == 0:
            del docs["cu_seq_lens_q"], docs["cu_seq_lens_k"]
        out["documents on some ranks"] = _catch(lambda: model(**docs))
    with rhf.configure(layout="contiguous"):
        # What one process would pass: the whole sequence, positions 0..S-1. Under the
        # contiguous layout rank 0's positions are right; the others' are not.
        full = torch.arange(SEQLEN)[None].expand(BATCH, -1)
        out["unsharded batch"] = _catch(lambda: model(input_ids=ids, position_ids=full))
        # Local positions 0..L-1 on every rank (shards cut for a group of one).
        local = rhf.shard_inputs(ids)
        local["position_ids"] = torch.arange(local["input_ids"].shape[1])[None].expand(BATCH, -1)
        out["local positions"] = _catch(lambda: model(**local))
    # Attention dropout in training mode; the same model in eval mode has none.
    dropping = _model(_config("llama", attention_dropout=0.1), "ring_attention", states["llama"])
    batch = rhf.shard_inputs(ids)
    out["dropout in training"] = _catch(lambda: dropping.train()(**batch))
    out["dropout, eval mode"] = _catch(lambda: dropping.eval()(**batch))
    return out


def _grid(rank, world_size, states, ids):
    torch.manual_seed(0)
    results = {}
    models = {name: _model(_config(name), "ring_attention") for name in MODELS}
    for name, layout, batch in CASES:
        model = models[name]
        model.load_state_dict(states[name])
        model.zero_grad(set_to_none=True)
        with rhf.configure(layout=layout):
            inputs = _shard(ids, batch)
            out = model(**inputs)
            out.loss.backward()
        results[(name, layout, batch)] = (out.logits.detach(), out.loss.detach(), _grads(model))
    results["errors"] = _errors(rank, world_size, states, ids)
    # After all the errors, a forward runs as before.
    model = models["llama"]
    with rhf.configure(layout="zigzag"):
        results["after errors"] = model(**rhf.shard_inputs(ids)).logits.detach()
    return pack(results)


_RUNS: dict[int, list | Exception] = {}


def grid(world_size: int) -> list:
    """Every rank's results (one spawn per world size, shared by the tests)."""
    if world_size not in _RUNS:
        states = pack({name: weights(name) for name in MODELS})
        try:
            outs = spawn(_grid_entry, world_size, states, pack(_tokens(_SEED)), timeout=240)
        except RuntimeError as e:  # a rank failed or hung: the other tests of this size say so at once
            _RUNS[world_size] = e
        else:
            _RUNS[world_size] = [unpack(o) for o in outs]
    if isinstance(_RUNS[world_size], Exception):
        raise RuntimeError(f"the spawn of {world_size} ranks failed (seed {_SEED})") from _RUNS[world_size]
    return _RUNS[world_size]


def _grid_entry(rank, world_size, states, ids):
    return _grid(rank, world_size, unpack(states), unpack(ids))


# -- sharded against the oracle ----------------------------------------------------------------


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_sharded_models_match_full_sequence(world_size):
    """Logits, loss and every parameter gradient, for every model, layout and batch kind."""
    ranks = grid(world_size)
    failures = []
    for name, layout, batch in CASES:
        ref = reference(name, docs=batch != "dense")
        errs = {}
        for rank, res in enumerate(ranks):
            pos = get_layout(layout).positions(SEQLEN, rank=rank, world_size=world_size)
            errs[f"logits[rank {rank}]"] = rel(res[(name, layout, batch)][0], ref["logits"][:, pos])
        loss = torch.stack([res[(name, layout, batch)][1] for res in ranks]).mean()
        errs["loss"] = rel(loss, ref["loss"])
        grads = [res[(name, layout, batch)][2] for res in ranks]
        assert len(grads[0]) == len(ref["grads"]) == len(ref["names"])
        for i, param in enumerate(ref["names"]):
            mean = torch.stack([g[i] for g in grads]).sum(0) / world_size  # all_reduce(sum) / world_size
            errs[f"grad {param}"] = rel(mean, ref["grads"][i])
        bad = {k: f"{v:.2e}" for k, v in errs.items() if not v < TOL}
        if bad:
            failures.append(f"{name} {layout} {batch}: {bad}")
    assert not failures, f"seed {_SEED}, world size {world_size}, relative errors >= {TOL}:\n" + "\n".join(failures)


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_misuse_raises_on_every_rank(world_size):
    expect = {
        "padding on rank 0": ["padding", "rank(s) [0]"],
        "cut by another layout": ["position_ids", "layout"],
        "shard_inputs padding": ["padding"],
        "shard_inputs rows differ": ["every row"],
        "documents on some ranks": ["document boundaries"],
        "unsharded batch": ["position_ids", "rank(s) [1"],
        "local positions": ["position_ids"],
        "dropout in training": ["dropout"],
    }
    ranks = grid(world_size)
    assert len(ranks) == world_size
    for rank, res in enumerate(ranks):
        errors = res["errors"]
        for case, words in expect.items():
            msg = errors[case]
            assert msg.startswith("ValueError: "), f"rank {rank}, {case}: {msg}"
            for w in words:
                assert w in msg, f"rank {rank}, {case}: {w!r} not in {msg!r}"
        assert errors["dropout, eval mode"] == "no error", f"rank {rank}: {errors['dropout, eval mode']}"


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_forward_after_errors(world_size):
    ref = reference("llama", docs=False)
    for rank, res in enumerate(grid(world_size)):
        pos = get_layout("zigzag").positions(SEQLEN, rank=rank, world_size=world_size)
        assert rel(res["after errors"], ref["logits"][:, pos]) < TOL, f"seed {_SEED}, rank {rank}"


def test_the_cases_are_not_vacuous():
    """The window and the documents change the reference: a ring that ignored them would fail."""
    no_window = reference("mistral", docs=False, sliding_window=None)
    assert rel(reference("mistral", docs=False)["logits"], no_window["logits"]) > 1e-3
    assert list(_config("qwen2").layer_types) == ["full_attention", "sliding_attention"]
    qwen_full = reference("qwen2", docs=False, use_sliding_window=False)
    assert rel(reference("qwen2", docs=False)["logits"], qwen_full["logits"]) > 1e-3
    dense, docs = reference("qwen2", docs=False), reference("qwen2", docs=True)
    assert rel(docs["logits"][:, DOCS[1]:], dense["logits"][:, DOCS[1]:]) > 1e-3
    # sdpa and eager agree, so either serves as the oracle.
    assert rel(reference("llama", docs=False, attn="eager")["logits"], reference("llama", docs=False)["logits"]) < TOL


def _hybrid_entry(rank, world_size, states, ids):
    """Llama (K/V heads 2, Ulysses 2) over a 2 x 2 HybridGroup: dense and packed, every layout."""
    from ringflash import HybridGroup

    states, ids = unpack(states), unpack(ids)
    rings = [dist.new_group([r * 2 + u for r in range(2)]) for u in range(2)]
    ulysses = [dist.new_group([r * 2 + u for u in range(2)]) for r in range(2)]
    hybrid = HybridGroup(rings[rank % 2], ulysses[rank // 2])
    model = _model(_config("llama"), "ring_attention", states["llama"])
    results = {}
    for layout, batch in itertools.product(LAYOUTS, ["dense", "docs-cu"]):
        model.zero_grad(set_to_none=True)
        with rhf.configure(group=hybrid, layout=layout):
            out = model(**_shard(ids, batch))
            out.loss.backward()
        results[(layout, batch)] = (out.logits.detach(), out.loss.detach(), _grads(model))
    return pack(results)


def test_hybrid_group_matches_full_sequence():
    """configure(group=HybridGroup(...)): the model on 2 x 2 ranks equals one process."""
    outs = [unpack(o) for o in spawn(_hybrid_entry, 4, pack({"llama": weights("llama")}), pack(_tokens(_SEED)))]
    failures = []
    for layout, batch in itertools.product(LAYOUTS, ["dense", "docs-cu"]):
        ref = reference("llama", docs=batch != "dense")
        errs = {}
        for rank, res in enumerate(outs):
            pos = get_layout(layout).positions(SEQLEN, rank=rank, world_size=4)
            errs[f"logits[rank {rank}]"] = rel(res[(layout, batch)][0], ref["logits"][:, pos])
        errs["loss"] = rel(torch.stack([res[(layout, batch)][1] for res in outs]).mean(), ref["loss"])
        for i, param in enumerate(ref["names"]):
            errs[f"grad {param}"] = rel(torch.stack([res[(layout, batch)][2][i] for res in outs]).mean(0),
                                        ref["grads"][i])
        bad = {k: f"{v:.2e}" for k, v in errs.items() if not v < TOL}
        if bad:
            failures.append(f"{layout} {batch}: {bad}")
    assert not failures, f"seed {_SEED}:\n" + "\n".join(failures)


# -- one process, no process group -------------------------------------------------------------


@pytest.fixture
def no_group():
    if dist.is_available() and dist.is_initialized():
        pytest.skip("a process group is initialised in this process")
    before = rhf.settings()
    yield
    rhf._settings = before


@pytest.mark.parametrize("batch", BATCHES)
def test_single_process_matches_eager(no_group, batch):
    model = _model(_config("qwen2"), "ring_attention", weights("qwen2"))
    ids = _tokens(_SEED)
    out = model(**_shard(ids, batch))
    out.loss.backward()
    ref = reference("qwen2", docs=batch != "dense")
    errs = {"logits": rel(out.logits, ref["logits"]), "loss": rel(out.loss, ref["loss"])}
    errs.update({n: rel(g, r) for n, g, r in zip(ref["names"], _grads(model), ref["grads"])})
    assert all(e < TOL for e in errs.values()), f"seed {_SEED}: {errs}"


def test_shard_inputs_without_group(no_group):
    ids = _tokens(_SEED)
    shifted = torch.cat([ids[:, 1:], torch.full((BATCH, 1), IGNORE_INDEX)], dim=1)
    b = rhf.shard_inputs(ids, layout="zigzag")
    assert torch.equal(b["input_ids"], ids)
    assert torch.equal(b["position_ids"], torch.arange(SEQLEN)[None].expand(BATCH, -1))
    assert torch.equal(b["shift_labels"], shifted) and b["labels"] is b["shift_labels"]
    assert b["num_items_in_batch"].item() == BATCH * (SEQLEN - 1)
    assert "cu_seq_lens_q" not in b
    for batch in ("docs-positions", "docs-cu"):
        b = _shard(ids, batch)
        assert torch.equal(b["input_ids"], ids)
        assert torch.equal(b["position_ids"], _doc_positions())
        want = shifted.clone()
        want[:, [DOCS[1] - 1, DOCS[2] - 1]] = IGNORE_INDEX  # a document's last token predicts nothing
        assert torch.equal(b["shift_labels"], want)
        assert b["num_items_in_batch"].item() == BATCH * (SEQLEN - (len(DOCS) - 1))
        assert b["cu_seq_lens_q"].tolist() == b["cu_seq_lens_k"].tolist() == DOCS


def test_single_process_errors(no_group):
    ids = _tokens(_SEED)
    model = _model(_config("llama", attention_dropout=0.1), "ring_attention", weights("llama"))
    with pytest.raises(ValueError, match="dropout"):
        model.train()(input_ids=ids)
    model.eval()(input_ids=ids)
    padded = torch.ones_like(ids)
    padded[0, -1] = 0
    with pytest.raises(ValueError, match="padding"):
        model(input_ids=ids, attention_mask=padded)
    with pytest.raises(ValueError, match="padding"):
        rhf.shard_inputs(ids, attention_mask=padded)
    model(input_ids=ids, attention_mask=torch.ones_like(ids))  # a mask of ones is no padding
    with pytest.raises(ValueError, match="every row"):
        rhf.shard_inputs(ids, position_ids=torch.stack([_doc_positions()[0], torch.arange(SEQLEN)]))
    with pytest.raises(ValueError, match="different documents"):
        rhf.shard_inputs(ids, position_ids=_doc_positions(), cu_seqlens=[0, 12, 24])


def test_logit_softcapping_is_refused(no_group):
    Gemma2Config = getattr(transformers, "Gemma2Config", None)
    if Gemma2Config is None:
        pytest.skip("this transformers has no Gemma2")
    cfg = Gemma2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=8,
                       sliding_window=5, attn_logit_softcapping=50.0, final_logit_softcapping=None,
                       use_cache=False)
    model = _model(cfg, "ring_attention")
    with pytest.raises(ValueError, match="soft-capping"):
        model(input_ids=_tokens(_SEED))


# -- configuration and registration ------------------------------------------------------------


def test_configure_context_manager_restores(no_group):
    before = rhf.settings()
    with rhf.configure(layout="zigzag", check=False) as s:
        assert s is rhf.settings()
        assert s.layout == get_layout("zigzag") and s.check is False and s.group is None
        with rhf.configure(layout="contiguous"):
            inner = rhf.settings()
            # An argument left out takes its default, not the value set before.
            assert inner.layout == get_layout("contiguous") and inner.check is True
        assert rhf.settings() is s
    assert rhf.settings() is before
    rhf.configure(layout="zigzag")  # a plain call stays
    assert rhf.settings().layout == get_layout("zigzag")
    with pytest.raises(ValueError):
        rhf.configure(layout="diagonal")
    assert rhf.settings().layout == get_layout("zigzag")  # a refused call changes nothing
    rhf.configure()
    assert rhf.settings() == rhf.RingSettings()


def test_registered_attention(no_group):
    from transformers import AttentionInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    assert rhf.ATTENTION == "ring_attention"
    assert "ring_attention" in AttentionInterface()
    assert AttentionInterface()["ring_attention"] is rhf.ring_attention_forward
    assert ALL_ATTENTION_FUNCTIONS["ring_attention"] is rhf.ring_attention_forward
    if hasattr(transformers, "AttentionMaskInterface"):  # else the padding mask would never reach the ring
        assert "ring_attention" in transformers.AttentionMaskInterface()
    # Dropout in training mode tells which implementation runs: ring attention refuses it.
    cfg = _config("mistral", attention_dropout=0.1)
    ids = _tokens(_SEED)
    model = AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation="ring_attention")
    assert model.config._attn_implementation == "ring_attention"
    with pytest.raises(ValueError, match="dropout"):
        model.train()(input_ids=ids)
    eager = _model(cfg, "eager")
    eager.train()(input_ids=ids)
    if not hasattr(eager, "set_attn_implementation"):
        pytest.skip("this transformers has no set_attn_implementation")
    eager.set_attn_implementation("ring_attention")
    assert eager.config._attn_implementation == "ring_attention"
    with pytest.raises(ValueError, match="dropout"):
        eager.train()(input_ids=ids)
