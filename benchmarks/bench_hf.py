"""Training tokens/s of a ~1B-parameter Llama-architecture model from transformers, with
ringflash's ``"ring_attention"`` next to transformers' own ``"sdpa"`` attention, in one run.

    PYTHONPATH=. python benchmarks/bench_hf.py                        # one GPU: 32k, 64k, 128k
    PYTHONPATH=. python benchmarks/bench_hf.py --lengths 16k --impls ring_attention sdpa eager
    PYTHONPATH=. torchrun --nproc-per-node 4 benchmarks/bench_hf.py --lengths 128k 512k --impls ring_attention

The model: a Llama configuration built locally (no download) with Llama-3.2-1B's shape (hidden
2048, 16 layers, 32 query and 8 key/value heads of 64, MLP 8192) and a 32k vocabulary (1.1B
parameters), bf16, randomly initialised, gradient checkpointing on every layer (what makes
128k tokens fit), no KV cache. One step is ``model(**batch).loss.backward()`` on one sequence
of ``S`` tokens (batch size 1); the optimizer is not timed. ``ring_attention`` runs with its
default local engine (Triton), ``ring_attention:cudnn`` with PyTorch's cuDNN kernel (dense
masks only). Under torchrun the sequence is cut
over the ranks (``ringflash.hf.shard_inputs``, striped layout), and tokens/s counts the whole
sequence; ``"sdpa"`` and ``"eager"`` run only with one process.

Each step is timed with CUDA events after one warm-up step; the median of ``--iters`` steps is
reported, with the peak memory of the timed steps. A length that does not fit is recorded as
``OOM`` (and longer lengths of that implementation are skipped). Rows go to a JSON file
(``--out``, default ``benchmarks/results/hf_<gpu>/hf.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_kernels import gpu_slug, parse_len  # noqa: E402

SHAPE = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
             num_key_value_heads=8, head_dim=64, vocab_size=32000)


def build(impl: str, device, layers: int):
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(**{**SHAPE, "num_hidden_layers": layers}, max_position_embeddings=1 << 20,
                      use_cache=False, attention_dropout=0.0)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation=impl).to(torch.bfloat16)
    model.gradient_checkpointing_enable()
    model.train()
    return model


def step_times(model, batch, iters: int) -> tuple[list[float], int]:
    def step():
        model.zero_grad(set_to_none=True)
        model(**batch).loss.backward()

    step()  # warm-up: compiles the kernels
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return times, torch.cuda.max_memory_allocated()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", nargs="+", default=["32k", "64k", "128k"], help="sequence lengths (e.g. 32k)")
    p.add_argument("--impls", nargs="+", default=["ring_attention", "ring_attention:cudnn", "sdpa"],
                   help="attn_implementation values (ring_attention, sdpa, eager, flex_attention); "
                        "ring_attention:ENGINE runs ring attention with that local engine (cudnn, triton)")
    p.add_argument("--layers", type=int, default=SHAPE["num_hidden_layers"])
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--out", default=None)
    args = p.parse_args()

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("nccl")
    rank = dist.get_rank() if world > 1 else 0
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    torch.cuda.set_device(device)

    import transformers

    import ringflash.hf as rhf

    gpu = gpu_slug()
    out = args.out or os.path.join("benchmarks", "results", f"hf_{gpu}{f'x{world}' if world > 1 else ''}",
                                   "hf.json")
    rows = []
    for impl in args.impls:
        name, _, engine = impl.partition(":")
        if name != rhf.ATTENTION and world > 1:
            if rank == 0:
                print(f"{impl}: skipped under torchrun (it attends over one process's tokens only)")
            continue
        rhf.configure(backend=engine or None)
        model = build(name, device, args.layers)
        n_params = sum(p.numel() for p in model.parameters())
        oom = False
        for S in map(parse_len, args.lengths):
            row = dict(impl=impl, gpu=gpu, world_size=world, seqlen=S, layers=args.layers, params=n_params,
                       transformers=transformers.__version__, torch=torch.__version__)
            if oom:
                rows.append({**row, "status": "skipped (a shorter length did not fit)"})
                continue
            ids = torch.randint(0, SHAPE["vocab_size"], (1, S), device=device,
                                generator=torch.Generator(device=device).manual_seed(S))
            batch = rhf.shard_inputs(ids) if name == rhf.ATTENTION else dict(input_ids=ids, labels=ids)
            try:
                times, peak = step_times(model, batch, args.iters)
            except torch.cuda.OutOfMemoryError:
                oom = True
                model.zero_grad(set_to_none=True)
                torch.cuda.empty_cache()
                rows.append({**row, "status": "OOM"})
            else:
                ms = statistics.median(times)
                rows.append({**row, "status": "ok", "ms": round(ms, 1), "tokens_per_s": round(S / ms * 1e3),
                             "peak_gib": round(peak / 2**30, 2)})
            if rank == 0:
                print(json.dumps(rows[-1]), flush=True)
            del batch
        del model
        torch.cuda.empty_cache()

    if rank == 0:
        base = {r["seqlen"]: r for r in rows if r["impl"] == "sdpa" and r["status"] == "ok"}
        print(f"\n{'impl':>21} {'S':>8} {'ms/step':>9} {'tokens/s':>9} {'peak GiB':>9} {'vs sdpa':>8}")
        for r in rows:
            if r["status"] != "ok":
                print(f"{r['impl']:>21} {r['seqlen']:>8} {r['status']}")
                continue
            ratio = f"{r['tokens_per_s'] / base[r['seqlen']]['tokens_per_s']:.2f}" if r["seqlen"] in base else "-"
            print(f"{r['impl']:>21} {r['seqlen']:>8} {r['ms']:>9.1f} {r['tokens_per_s']:>9} "
                  f"{r['peak_gib']:>9.2f} {ratio:>8}")
        os.makedirs(os.path.dirname(out), exist_ok=True)
        with open(out, "w") as f:
            json.dump(rows, f, indent=1)
        print(f"wrote {out}")
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
