"""How well an upsampler super-resolves `shapes`: true renders at its input size, upsampled, against true renders at its
output size (PSNR, beside bicubic upsampling of the same input), and judged (``unclip.eval.judge``) beside its input,
so a stage that sharpens must also keep every object's colour, shape, size and place.

The scenes are the data set's own at both sizes (``shapes`` renders any multiple of 8 from its scene description, the
same scene at every size), not an area-shrunk copy of the large render: what a decoder's image looks like is a
render at its size."""

from __future__ import annotations

import time
from typing import Sequence

import torch

from unclip.data.shapes import generate_item
from unclip.eval.decoder import psnr
from unclip.eval.judge import judge_batch, score
from unclip.images import from_pil, resize

JUDGED = ("colour_shape_acc", "size_acc", "position_acc", "pair_acc", "count_acc")


def shapes_pairs(count: int, sizes: Sequence[int], *, split: str = "val", pair_fraction: float = 0.2, seed: int = 0
                 ) -> tuple[list[torch.Tensor], list[dict]]:
    """The first ``count`` scenes of ``split`` rendered at each of ``sizes``: ([B, 3, S, S] per size), metas."""
    if not isinstance(count, int) or count < 1:
        raise ValueError(f"count must be a positive int, got {count!r}")
    renders, metas = [], None
    for size in sizes:
        items = [generate_item(i, split=split, seed=seed, image_size=size, pair_fraction=pair_fraction)
                 for i in range(count)]
        found = [item.meta for item in items]
        if metas is not None and found != metas:
            raise RuntimeError("shapes rendered different scenes at different sizes")  # SHAPES.md says it never does
        metas = found
        renders.append(from_pil([item.image for item in items]))
    return renders, metas


def _judged(images: torch.Tensor, metas: list[dict]) -> dict:
    found = score(judge_batch(images), metas)
    return {key: found[key] for key in JUDGED if key in found}


@torch.no_grad()
def super_resolution(upsampler, *, count: int = 64, steps: Sequence[int] = (15,), aug_level: float = 0.05,
                     split: str = "val", pair_fraction: float = 0.2, seed: int = 0, batch: int = 16,
                     autocast=None, sampler: str = "ddim", spacing: str = "uniform") -> dict:
    """Rows ``input`` (the low-resolution render, judged), ``bicubic``, ``steps=N`` for each of ``steps`` (PSNR, the
    judge, seconds per image) and ``truth`` (the large render, judged); ``psnr_gain_db`` of each row over bicubic.
    ``sampler`` / ``spacing``: how the upsampler samples (``unclip.diffusion.samplers``)."""
    (low, truth), metas = shapes_pairs(count, (upsampler.low_res_size, upsampler.image_size), split=split,
                                       pair_fraction=pair_fraction, seed=seed)
    bicubic = resize(low, upsampler.image_size)
    rows = {"input": _judged(low, metas), "bicubic": {"psnr": psnr(bicubic, truth), **_judged(bicubic, metas)}}
    device = next(upsampler.parameters()).device
    for n in steps:
        generator = torch.Generator(device=device).manual_seed(seed)
        started = time.perf_counter()
        with autocast or torch.autocast(device.type, enabled=False):
            out = torch.cat([upsampler.sample(low[i:i + batch], steps=n, aug_level=aug_level, generator=generator,
                                              sampler=sampler, spacing=spacing).cpu() for i in range(0, count, batch)])
        seconds = (time.perf_counter() - started) / count
        rows[f"steps={n}"] = {"psnr": psnr(out, truth), "seconds_per_image": seconds, **_judged(out, metas)}
    rows["truth"] = _judged(truth, metas)
    for row in rows.values():
        if "psnr" in row:
            row["psnr_gain_db"] = row["psnr"] - rows["bicubic"]["psnr"]
    return {"count": count, "split": split, "sizes": [upsampler.low_res_size, upsampler.image_size], "rows": rows}


def format_rows(result: dict) -> str:
    """A table of ``super_resolution``'s rows."""
    keys = ["psnr", "psnr_gain_db", "seconds_per_image", *JUDGED]
    lines = ["row            " + " ".join(f"{key:>17}" for key in keys)]
    for name, row in result["rows"].items():
        cells = [("-" if key not in row else f"{row[key]:.4f}" if "seconds" in key else f"{row[key]:.3f}")
                 for key in keys]
        lines.append(f"{name:<15}" + " ".join(f"{cell:>17}" for cell in cells))
    return "\n".join(lines)
