"""Continue training a Hugging Face Llama model with its attention run as ring attention.

    torchrun --nproc-per-node 2 examples/hf_llama.py               # CPU (gloo) or GPUs (nccl)
    torchrun --nproc-per-node 4 examples/hf_llama.py --seqlen 8192

A small Llama-architecture model is built from a config (weights initialised here: nothing is
downloaded) with attn_implementation="ring_attention". Every rank holds the same weights and its
striped shard of the tokens: ringflash.hf.shard_inputs gives the ids, their global position_ids
(the model's own rotary embeddings use them) and labels shifted on the full sequence. The
model's own loss is this rank's share of the mean over the whole sequence, times the number of
ranks; averaging the loss and the gradients over the ranks gives the full-sequence loss and its
exact gradient. Needs transformers (pip install -e ".[hf]").
"""

import argparse
import os

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM, LlamaConfig

import ringflash.hf as rhf
from ringflash.batch import average_gradients

parser = argparse.ArgumentParser()
parser.add_argument("--seqlen", type=int, default=1024)  # the full sequence, over all ranks
parser.add_argument("--steps", type=int, default=8)
args = parser.parse_args()

cuda = torch.cuda.is_available()
if cuda:
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
dist.init_process_group("nccl" if cuda else "gloo")
rank, world = dist.get_rank(), dist.get_world_size()
device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")

config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, use_cache=False)
torch.manual_seed(0)  # the same initial weights on every rank
model = AutoModelForCausalLM.from_config(config, attn_implementation="ring_attention").to(device)
optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)

rhf.configure(layout="striped")  # the default group and layout, said out loud
tokens = torch.randint(0, 256, (2, args.seqlen))  # the same full batch on every rank
batch = {k: v.to(device) for k, v in rhf.shard_inputs(tokens).items()}  # this rank's shard

for step in range(args.steps):
    loss = model(**batch).loss  # this rank's share of the full-sequence loss, times `world`
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    average_gradients(model.parameters())  # the exact gradient of the full-sequence loss
    optimizer.step()
    full = loss.detach().clone()
    dist.all_reduce(full)
    if rank == 0:
        print(f"step {step} loss {full.item() / world:.4f}")

dist.destroy_process_group()
