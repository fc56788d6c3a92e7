"""Decoder and upsampler quality: on `shapes` judged from the pixels (unclip.eval.judge); on any other data
by CLIP, comparing the decoded images with their source images and captions against shuffled pairs."""

from __future__ import annotations

import torch

from unclip.decoder.inpainting import evaluation_inpainting
from unclip.eval.clip_retrieval import clip_agreement
from unclip.eval.judge import judge_batch, score


@torch.no_grad()
def evaluate_decoder(
    decoder,
    clip,
    images: torch.Tensor,
    captions: list[str],
    metas: list[dict],
    *,
    guidance_scales=(3.0,),
    steps: int = 50,
    sampler: str = "ddim",
    batch_size: int = 64,
    seed: int = 0,
    suffix: str = "",
) -> tuple[dict, torch.Tensor]:
    """Decode the true CLIP image embeddings of ``images`` and judge the results against their metadata.

    Returns metrics ``{colour_acc, shape_acc, ...}_g<scale><suffix>`` and the samples of the first scale.
    Items without `shapes` metadata (other data sets) are scored by CLIP instead: ``image_cosine`` (decoded vs
    source image embedding), ``clip_score`` (decoded image vs caption), each beside ``shuffled_*``, the same
    over mismatched pairs. An inpainting decoder decodes each image with its object masked out
    (``evaluation_inpainting``): it must paint the object back.
    """
    judged_by_pixels = all(isinstance(m, dict) and "scene" in m for m in metas)
    metrics: dict = {}
    first = None
    for scale in guidance_scales:
        generator = torch.Generator(device=next(decoder.parameters()).device).manual_seed(seed)
        samples = []
        for start in range(0, len(images), batch_size):
            chunk = images[start : start + batch_size]
            embed = clip.encode_image(chunk)
            text = clip.encode_text(captions[start : start + batch_size])
            inpaint = evaluation_inpainting(decoder, chunk, metas[start : start + batch_size])
            samples.append(decoder.sample(embed, text, steps=steps, guidance_scale=scale, sampler=sampler,
                                          generator=generator, inpaint=inpaint).cpu())
        samples = torch.cat(samples)
        first = samples if first is None else first
        tag = f"_g{scale:g}{suffix}"
        if not judged_by_pixels:
            metrics.update({k + tag: v for k, v in clip_agreement(clip, samples, images, captions).items()})
            continue
        judged = score(judge_batch(samples), metas)
        for key in ("colour_acc", "shape_acc", "colour_shape_acc"):
            if key in judged:
                metrics[key + tag] = judged[key]
        metrics["found_one_object" + tag] = judged.get("count_acc", float("nan"))
    return metrics, first


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean PSNR (dB) of [-1, 1] images, per image then averaged."""
    mse = ((a.float().clamp(-1, 1) - b.float()) / 2).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return (10 * torch.log10(1 / mse)).mean().item()
