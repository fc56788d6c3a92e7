"""Tiny real stages for tests: a micro CLIP, prior, decoder and upsampler saved as checkpoints."""

from __future__ import annotations

import torch
from conftest import MICRO_CLIP

from unclip.checkpoint import save_stage
from unclip.clip import OpenClipEncoder
from unclip.decoder import Decoder, Upsampler
from unclip.prior import DiffusionPrior

TINY_UNET = {"base_channels": 32, "channel_mult": [1, 2], "num_res_blocks": 1, "attention_resolutions": [8], "head_channels": 16}


def micro_stages(seed: int = 0):
    torch.manual_seed(seed)
    clip = OpenClipEncoder(model_cfg=MICRO_CLIP, name="micro")
    space = clip.space
    prior = DiffusionPrior(embed_dim=space.dim, token_dim=space.token_dim, text_length=space.text_length,
                           width=32, depth=1, heads=2, num_steps=50)
    decoder = Decoder(image_size=16, image_embed_dim=space.dim, text_length=space.text_length, unet=TINY_UNET,
                      caption_width=32, caption_layers=1, caption_heads=2, num_steps=50)
    upsampler = Upsampler(low_res_size=16, image_size=32, unet=TINY_UNET, num_steps=50)
    return clip, prior, decoder, upsampler


def save_micro_pipeline(root, seed: int = 0):
    clip, prior, decoder, upsampler = micro_stages(seed)
    space = clip.space
    return {
        "clip": save_stage(root / "clip", clip, stage="clip", space=space),
        "prior": save_stage(root / "prior", prior, stage="prior", space=space),
        "decoder": save_stage(root / "decoder", decoder, stage="decoder", space=space),
        "upsamplers": [save_stage(root / "upsampler", upsampler, stage="upsampler", space=None)],
    }


@torch.no_grad()
def enliven(model: torch.nn.Module, seed: int = 0, scale: float = 0.05) -> torch.nn.Module:
    """Fill every all-zero parameter (the zero-initialised output layers) with small random values, so that a
    fresh model's output depends on its input and conditioning: tests that pin outputs then see every path."""
    generator = torch.Generator().manual_seed(seed)
    for param in model.parameters():
        if param.numel() and not param.any():
            param.copy_(torch.randn(param.shape, generator=generator) * scale)
    return model


def save_lively_pipeline(root, seed: int = 0):
    """``save_micro_pipeline`` with every stage enlivened (see ``enliven``)."""
    clip, prior, decoder, upsampler = (enliven(m, seed + i) for i, m in enumerate(micro_stages(seed)))
    space = clip.space
    return {
        "clip": save_stage(root / "clip", clip, stage="clip", space=space),
        "prior": save_stage(root / "prior", prior, stage="prior", space=space),
        "decoder": save_stage(root / "decoder", decoder, stage="decoder", space=space),
        "upsamplers": [save_stage(root / "upsampler", upsampler, stage="upsampler", space=None)],
    }
