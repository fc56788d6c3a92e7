"""Decoder and upsampler quality: decode the true CLIP image embeddings of real images and score the results
(the data set's evaluator says how: judged from the pixels on `shapes`, by CLIP elsewhere)."""

from __future__ import annotations

from typing import Callable

import torch

from unclip.decoder.inpainting import evaluation_inpainting


@torch.no_grad()
def evaluate_decoder(
    decoder,
    clip,
    images: torch.Tensor,
    captions: list[str],
    score: Callable[[torch.Tensor], dict],
    *,
    guidance_scales=(3.0,),
    steps: int = 50,
    sampler: str = "ddim",
    spacing: str = "uniform",
    batch_size: int = 64,
    seed: int = 0,
    suffix: str = "",
    metas: list | None = None,
) -> tuple[dict, torch.Tensor]:
    """Decode the true CLIP image embeddings of ``images`` (with their captions) at every guidance scale and
    ``score`` the samples (``score(samples) -> metrics``). Returns the metrics, each key suffixed
    ``_g<scale><suffix>``, and the samples of the first scale. An inpainting decoder decodes each image with
    its object (from ``metas``) masked out (``evaluation_inpainting``): it must paint the object back."""
    metrics: dict = {}
    first = None
    for scale in guidance_scales:
        generator = torch.Generator(device=next(decoder.parameters()).device).manual_seed(seed)
        samples = []
        for start in range(0, len(images), batch_size):
            chunk = images[start : start + batch_size]
            embed = clip.encode_image(chunk)
            text = clip.encode_text(captions[start : start + batch_size])
            inpaint = evaluation_inpainting(decoder, chunk, None if metas is None else metas[start : start + batch_size])
            samples.append(decoder.sample(embed, text, steps=steps, guidance_scale=scale, sampler=sampler,
                                          spacing=spacing, generator=generator, inpaint=inpaint).cpu())
        samples = torch.cat(samples)
        first = samples if first is None else first
        metrics.update({f"{key}_g{scale:g}{suffix}": value for key, value in score(samples).items()})
    return metrics, first


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean PSNR (dB) of [-1, 1] images, per image then averaged."""
    mse = ((a.float().clamp(-1, 1) - b.float()) / 2).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return (10 * torch.log10(1 / mse)).mean().item()
