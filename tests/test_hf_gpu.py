"""transformers models with ``"ring_attention"`` on a CUDA GPU, in bf16.

A small Llama-architecture model (GQA), dense, with a sliding window (Mistral) and with packed
documents, runs once in float64 with transformers' ``"eager"`` attention (the reference), and in
bf16 with ``"ring_attention"`` and with transformers' ``"sdpa"``. Every error is
``||x - ref|| / ||ref||`` of the logits, the loss and each parameter's gradient (the largest over
the parameters), and ring attention's must be within ``SDPA_FACTOR`` of SDPA's in the same run:
the single-GPU bf16 error (plus 1e-4, far below bf16's resolution, for the loss: a mean over
thousands of tokens, whose error in either can be luckily small).

    PYTHONPATH=. python -m pytest -m gpu tests/test_hf_gpu.py -s
"""

from __future__ import annotations

import copy

import pytest
import torch

pytestmark = pytest.mark.gpu

pytest.importorskip("transformers")
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig  # noqa: E402

import ringflash.hf as rhf  # noqa: E402

SDPA_FACTOR = 1.5
SHAPE = dict(vocab_size=1000, hidden_size=512, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=2, head_dim=64, use_cache=False)
S, B = 2048, 2

CASES = {
    "llama": (LlamaConfig(**SHAPE), None),
    "mistral_window": (MistralConfig(sliding_window=300, **SHAPE), None),
    "llama_documents": (LlamaConfig(**SHAPE), [0, 1, 700, 701, 1500, 2048]),
}


def run(cfg, impl: str, dtype, state, batch):
    model = AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation=impl)
    model.load_state_dict(state)
    model = model.to("cuda", dtype)
    out = model(**batch)
    out.loss.backward()
    grads = {n: p.grad.double() for n, p in model.named_parameters()}
    return out.logits.double(), out.loss.double(), grads


def rel(x, ref):
    return ((x - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("name", sorted(CASES))
def test_bf16_matches_float64_within_sdpa_error(name):
    cfg, cu = CASES[name]
    torch.manual_seed(0)
    state = AutoModelForCausalLM.from_config(copy.deepcopy(cfg)).state_dict()
    ids = torch.randint(0, cfg.vocab_size, (B, S), device="cuda")
    batch = rhf.shard_inputs(ids, cu_seqlens=cu)  # one process: the whole sequence
    ref = run(cfg, "eager", torch.float64, state, batch)
    errors = {}
    for impl in ("ring_attention", "sdpa"):
        logits, loss, grads = run(cfg, impl, torch.bfloat16, state, batch)
        errors[impl] = dict(logits=rel(logits, ref[0]), loss=rel(loss, ref[1]),
                            grads=max(rel(grads[n], ref[2][n]) for n in grads))
    print(f"\n{name}: " + "; ".join(f"{impl} " + ", ".join(f"{k} {v:.2e}" for k, v in e.items())
                                     for impl, e in errors.items()))
    for what in ("logits", "loss", "grads"):
        ring, sdpa = errors["ring_attention"][what], errors["sdpa"][what]
        assert ring <= SDPA_FACTOR * sdpa + 1e-4, f"{name} {what}: ring {ring:.2e} vs sdpa {sdpa:.2e}"
