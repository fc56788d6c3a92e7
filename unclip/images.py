"""Image conversions, all of them: [-1, 1] NCHW tensors <-> PIL images and uint8 arrays, any PIL mode to RGB
(one rule for 16-bit pixels), the one resize of image tensors, and sample grids."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
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
        image = to_rgb(image)
        if size is not None and image.size != (size, size):
            side = min(image.size)
            left, top = (image.width - side) // 2, (image.height - side) // 2
            image = image.crop((left, top, left + side, top + side)).resize((size, size), Image.BICUBIC)
        out.append(to_tensor(np.asarray(image, dtype=np.uint8)))
    shapes = {tuple(t.shape) for t in out}
    if len(shapes) > 1:
        raise ValueError(f"images of different sizes {sorted(shapes)}; pass size= to resize them")
    return torch.stack(out)


SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode to RGB: transparency composited onto white; 16-bit and 32-bit integer pixels read as
    0..65535 and float ones as 0..1 (or 0..255 when larger), each mapped onto 0..255.

    A 16-bit file states absolute intensities, as an 8-bit one does: scaling by 65535 keeps a dark image dark
    (scaling by the image's own maximum would stretch every image to full brightness, and a flat one to white).
    Raises ValueError for a mode PIL cannot convert (e.g. LAB)."""
    if image.mode == "RGB":
        return image
    if image.mode in SIXTEEN_BIT_MODES or image.mode in ("I", "F"):
        values = np.asarray(image, dtype=np.float64)
        if image.mode == "F":
            scale = 255.0 if values.size and np.nanmax(values) <= 1.0 else 1.0
        else:
            scale = 255.0 / 65535.0
        grey = np.clip(np.nan_to_num(values * scale), 0, 255)
        return Image.fromarray(np.rint(grey).astype(np.uint8)).convert("RGB")
    if image.mode in ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def to_tensor(array: np.ndarray) -> torch.Tensor:
    """uint8 [H, W, 3] -> float32 [3, H, W] in [-1, 1].

    Done in numpy: torch would spread this small op over threads, which costs far more than it saves
    inside data-loader workers.
    """
    chw = np.ascontiguousarray(array.transpose(2, 0, 1), dtype=np.float32)
    return torch.from_numpy(chw / np.float32(127.5) - np.float32(1.0))


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


def resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """The one resize of [-1, 1] images [B, 3, H, W] to ``size`` x ``size``, for every stage and for the stage that
    takes its output, so that each learns from what it will be given (the upsampler is conditioned on the decoder's
    images shrunk as the decoder's targets were, the transformer learns tokens of images shrunk as the dVAE's were).

    Shrinking averages the pixels each output pixel covers (area: a box filter, exact block means for whole
    factors); growing is bicubic, clamped back to [-1, 1] (bicubic overshoots at edges)."""
    if images.shape[-2:] == (size, size):
        return images
    if size < images.shape[-1]:
        return F.interpolate(images.float(), size=(size, size), mode="area")
    return F.interpolate(images.float(), size=(size, size), mode="bicubic", align_corners=False).clamp(-1, 1)
