"""Conversions at the library's edges: [-1, 1] NCHW tensors <-> PIL images, and sample grids."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """[B, 3, H, W] in [-1, 1] -> RGB PIL images."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be [B, 3, H, W], got {tuple(images.shape)}")
    pixels = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
    return [Image.fromarray(p.permute(1, 2, 0).numpy()) for p in pixels]


def from_pil(images: Sequence[Image.Image] | Image.Image, size: int | None = None) -> torch.Tensor:
    """PIL images (any mode, any size) -> [B, 3, size, size] in [-1, 1]; non-square ones are centre-cropped."""
    if isinstance(images, Image.Image):
        images = [images]
    out = []
    for image in images:
        if not isinstance(image, Image.Image):
            raise TypeError(f"expected PIL images, got {type(image).__name__}")
        image = _to_rgb(image)
        if size is not None and image.size != (size, size):
            side = min(image.size)
            left, top = (image.width - side) // 2, (image.height - side) // 2
            image = image.crop((left, top, left + side, top + side)).resize((size, size), Image.BICUBIC)
        array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
        out.append(torch.from_numpy(array).permute(2, 0, 1))
    shapes = {tuple(t.shape) for t in out}
    if len(shapes) > 1:
        raise ValueError(f"images of different sizes {sorted(shapes)}; pass size= to resize them")
    return torch.stack(out)


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode to RGB; transparency is composited onto white."""
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64)
        top = array.max() or 1.0
        return Image.fromarray((array / top * 255).astype(np.uint8)).convert("RGB")
    return image.convert("RGB")


def make_grid(images: Sequence[Image.Image], columns: int | None = None, pad: int = 2) -> Image.Image:
    """Tile images (all of one size) into a grid on a grey background."""
    if not images:
        raise ValueError("make_grid got no images")
    columns = columns or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    width, height = images[0].size
    grid = Image.new("RGB", (columns * (width + pad) + pad, rows * (height + pad) + pad), (128, 128, 128))
    for i, image in enumerate(images):
        r, c = divmod(i, columns)
        grid.paste(image.convert("RGB").resize((width, height)), (pad + c * (width + pad), pad + r * (height + pad)))
    return grid


def save_grid(images: Sequence[Image.Image], path: str | Path, columns: int | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    make_grid(images, columns).save(path)
    return path
