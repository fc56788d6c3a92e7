"""The paper's ablation: use the CLIP text embedding as the image embedding."""

from __future__ import annotations

import torch
from torch import nn

from unclip.configurable import configurable
from unclip.embedding import TextCondition
from unclip.prior.diffusion_prior import check_prompts


@configurable
class PassthroughPrior(nn.Module):
    """No training, no weights: ``sample(text)`` returns the (unit-norm) text embeddings."""

    def __init__(self):
        super().__init__()

    def training_loss(self, batch: dict) -> dict:
        raise TypeError("the passthrough prior has nothing to train")

    @torch.no_grad()
    def sample(self, text: TextCondition, **ignored) -> torch.Tensor:
        check_prompts(text)
        return text.embed.float().clone()
