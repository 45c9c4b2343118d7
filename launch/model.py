"""What the training job trains and how: the GPT of a config, its optimizer, the learning rate.

The model is ``ringflash.models.GPT`` over bytes (vocabulary 256) with ring attention over the
context-parallel group: causal, within a sliding window with ``--window``, sparse with
``--sparsity`` (GPTConfig.sparsity: every layer's attention, seeded by its index; the document
mask of packed sequences comes with each call, launch/train.py). AdamW decays the matrices only; the
learning rate warms up linearly, then follows a cosine down to ``min_lr_ratio * lr``.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from ringflash import comm
from ringflash.models import GPT, GPTConfig

if TYPE_CHECKING:  # annotations only (launch/ on sys.path)
    from config import TrainConfig

__all__ = ["build_model", "build_optimizer", "lr_at"]


def build_model(cfg: TrainConfig, group) -> torch.nn.Module:
    """The GPT of ``cfg``; ``group``: the context-parallel process group (None: one process)."""
    comm.TRANSPORT = cfg.transport
    model_cfg = GPTConfig(
        vocab_size=256,
        dim=cfg.dim,
        n_layers=cfg.layers,
        n_heads=cfg.heads,
        n_kv_heads=cfg.kv_heads,
        layout=cfg.layout,
        rope_base=cfg.rope_base,
        checkpoint=cfg.checkpoint_activations,
        window=cfg.window or None,  # --window 0: none (GPTConfig's 0 would be each token alone)
        sparsity=cfg.sparsity or None,  # sparse attention (ringflash.sparse); "": dense
    )
    return GPT(model_cfg, group=group, backend=cfg.backend)


def build_optimizer(cfg: TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95))


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Linear warmup, then cosine decay to ``min_lr_ratio * lr`` at ``lr_decay_steps``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.lr_decay_steps - cfg.warmup_steps)
    t = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def shard_model(model: torch.nn.Module, device: torch.device, *, compile: bool = False) -> torch.nn.Module:
    """FSDP2 over every rank of the world: each block, then the root (embedding, norm, head).

    Parameters, gradients and optimizer state are split over all dp x cp ranks; a block's
    parameters are gathered for its forward and backward, and gradients reduce-scattered as the
    mean over the ranks (what DDP's all-reduce gives). Build the optimizer after this.

    ``compile``: each block's ``forward`` becomes a compiled graph (ring attention a custom op
    in it), while FSDP's gathers and reduce-scatters stay eager hooks around the blocks, as
    torchtitan does it. The embedding, final norm and head stay eager. Parameter names do not
    change, so checkpoints are those of an uncompiled run.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),), mesh_dim_names=("fsdp",))
    for block in model.blocks:
        if compile:
            block.forward = torch.compile(block.forward)
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model
