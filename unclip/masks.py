"""Keep masks, the pipeline's and every stage's: float [B, 1, S, S], 1 where the known image is kept and 0 where a
model fills in. Their sizes through a cascade, and the colour a hole is filled with."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def keep_at(keep: torch.Tensor, size: int) -> torch.Tensor:
    """A keep mask [B, 1, s, s] at another side ``size``. Shrinking keeps a pixel only where every pixel it covers
    is kept (the fill grows to cover any partly filled pixel, so that the low-resolution stage paints all that the
    next stage must fill); growing repeats pixels (nearest)."""
    if keep.shape[-1] == size:
        return keep
    if size < keep.shape[-1]:
        return 1 - F.adaptive_max_pool2d(1 - keep.float(), size)
    return F.interpolate(keep.float(), size=(size, size), mode="nearest")


def fill_colour(image: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Per image, the median colour [B, 3, 1, 1] of its kept pixels (white where nothing is kept)."""
    colours = []
    for one, kept in zip(image, keep):
        pixels = one.flatten(1)[:, kept.flatten() > 0.5]
        colours.append(pixels.median(dim=1).values if pixels.shape[1] else torch.ones(3, device=image.device))
    return torch.stack(colours)[:, :, None, None]
