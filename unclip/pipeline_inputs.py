"""What users hand the pipeline, checked and turned into tensors: prompts, images, masks, image embeddings and
mix items. Every bad value is a ValueError (or TypeError) that names it and says what was expected."""

from __future__ import annotations

import math
from numbers import Integral, Real
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from unclip.images import from_pil, resize

OUTPUTS = ("pil", "tensor")


def check_prompts(prompts: Sequence[str] | str, name: str = "prompts") -> list[str]:
    """One prompt or a list of them, each a non-empty string; ``name``: the argument, for the errors."""
    if isinstance(prompts, str):
        prompts = [prompts]
    if not isinstance(prompts, (list, tuple)):
        hint = "; for images without a prompt, call unconditional(n)" if prompts is None and name == "prompts" else ""
        raise TypeError(f"{name} must be a string or a list of strings, got {prompts!r:.80}{hint}")
    prompts = list(prompts)
    if not prompts:
        raise ValueError(f"the prompt list is empty; give at least one prompt ({name})")
    for prompt in prompts:
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"every prompt must be a non-empty string, got {prompt!r} ({name})")
    return prompts


def check_count(name: str, value) -> int:
    """A number of images (or steps): a whole number >= 1."""
    if isinstance(value, bool) or not isinstance(value, Integral) or value < 1:
        raise ValueError(f"{name} must be a whole number >= 1, got {value!r}")
    return int(value)


def check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, Integral) or not -(2**63) <= seed < 2**64:
        raise ValueError(f"seed must be a whole number from -2**63 to 2**64 - 1, got {seed!r:.40}")
    return int(seed)


def check_output(output) -> str:
    if output not in OUTPUTS:
        raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
    return output


def check_amounts(amounts) -> list[float]:
    """``text_diff``'s amounts: a non-empty list of numbers in [0, 1] (0: the image, 1: all the way to the text
    difference)."""
    amounts = list(amounts) if isinstance(amounts, (list, tuple)) else amounts
    if not isinstance(amounts, list) or not amounts:
        raise ValueError(f"amounts must be a non-empty list of numbers in [0, 1], got {amounts!r}")
    for amount in amounts:
        if isinstance(amount, bool) or not isinstance(amount, Real) or not 0 <= amount <= 1:
            raise ValueError(f"every amount must be a number in [0, 1] (0: the image, 1: the text difference), got "
                             f"{amount!r} in {amounts}")
    return [float(a) for a in amounts]


def check_finite(tensor: torch.Tensor, name: str) -> None:
    if not bool(torch.isfinite(tensor).all()):
        raise ValueError(f"{name} holds NaN or infinite values ({int((~torch.isfinite(tensor)).sum())} of "
                         f"{tensor.numel()}); give finite values")


def check_trained_null(stage: str, setting: str, value: float, default: float) -> None:
    """An error unless caption dropout (``setting`` = ``value``) trained ``stage``'s learned null caption, which
    sampling without a prompt starts from."""
    if value == 0:
        raise ValueError(f"this {stage} was trained without caption dropout ({setting}=0), so its learned null caption "
                         f"is untrained and it cannot sample without a prompt; train it with {setting} > 0 (the "
                         f"default is {default})")


def prompts_for(prompt: str | Sequence[str], count: int) -> list[str]:
    """One prompt per image: a string for every image, or a list of ``count``."""
    prompts = check_prompts(prompt)
    if len(prompts) == 1:
        return prompts * count
    if len(prompts) != count:
        raise ValueError(f"{len(prompts)} prompts for {count} images; give one prompt, or one per image")
    return prompts


def _is_pil_list(value) -> bool:
    return isinstance(value, (list, tuple)) and len(value) > 0 and all(isinstance(i, Image.Image) for i in value)


def images_in(image, size: int, device, resize_tensors: bool = True) -> torch.Tensor:
    """A PIL image (any mode or size), a list of them, or [-1, 1] tensors [B, 3, H, W] -> [B, 3, size, size] on
    ``device``: PIL images centre-cropped and resized, tensors resized (unless not ``resize_tensors``)."""
    if isinstance(image, Image.Image) or _is_pil_list(image):
        for one in [image] if isinstance(image, Image.Image) else image:
            if one.width < 1 or one.height < 1:
                raise ValueError(f"an input image is {one.width}x{one.height} pixels; give an image with pixels")
        return from_pil(image, size).to(device)
    if isinstance(image, torch.Tensor):
        if image.ndim == 3:
            image = image[None]
        if image.ndim != 4 or image.shape[1] != 3 or not image.is_floating_point() or 0 in image.shape:
            raise ValueError(f"image tensors must be float [B, 3, H, W] in [-1, 1], got {image.dtype} "
                             f"{list(image.shape)}; convert other images with unclip.images.from_pil")
        check_finite(image, "the image tensor")
        image = image.to(device).float()
        return resize(image, size) if resize_tensors else image
    raise TypeError(f"expected a PIL image, a list of them or a tensor [B, 3, H, W], got {type(image).__name__}")


def unit_embeds(image_embed, count: int, dim: int, device, name: str = "image_embed") -> torch.Tensor:
    """Embeddings [D], [1, D] or [count, D] -> unit-norm [count, D] on ``device``."""
    if not isinstance(image_embed, torch.Tensor) or image_embed.shape[-1:] != (dim,) or image_embed.ndim > 2:
        raise ValueError(f"{name} must be a tensor [D], [1, D] or [N, D] with D = {dim}, got "
                         f"{getattr(image_embed, 'shape', image_embed)!r}")
    embeds = image_embed.reshape(-1, dim).to(device).float()
    check_finite(embeds, name)
    if not bool((embeds.norm(dim=-1) > 0).all()):
        raise ValueError(f"{name} has an all-zero row, which has no direction; give non-zero embeddings")
    if len(embeds) not in (1, count):
        raise ValueError(f"{name} has {len(embeds)} rows for {count} images; give 1 or {count}")
    return F.normalize(embeds, dim=-1).expand(count, dim)


def keep_masks(mask, image, count: int, size: int, device) -> torch.Tensor:
    """The user's masks (white / 1 = paint, black / 0 = keep) -> keep masks [count, 1, size, size] in {0, 1}.

    A PIL mask (one, or one per image) is resized to its image's size (nearest), then centre-cropped and resized as
    the image is; a tensor ([H, W], [1, H, W] or [B, 1, H, W] in [0, 1]) is resized to ``size``. Values over 0.5
    are painted."""
    masks = list(mask) if isinstance(mask, (list, tuple)) else [mask]
    images = list(image) if isinstance(image, (list, tuple)) else [image] * len(masks)
    if all(isinstance(m, Image.Image) for m in masks):
        fills = torch.cat([_pil_fill(m, i, size) for m, i in zip(masks, images)])
    elif len(masks) == 1 and isinstance(masks[0], torch.Tensor):
        fills = _tensor_fill(masks[0], size)
    else:
        raise TypeError("mask must be a PIL image (or a list of them, one per image) or a tensor")
    if len(fills) not in (1, count):
        raise ValueError(f"{len(fills)} masks for {count} images; give one mask, or one per image")
    return (fills <= 0.5).float().expand(count, 1, size, size).to(device)


def _pil_fill(mask: Image.Image, image, size: int) -> torch.Tensor:
    if len(mask.getbands()) != 1:
        raise ValueError(f"the mask must be a single-channel image (mode L or 1: white = paint, black = keep), "
                         f"got mode {mask.mode}; convert it with mask.convert('L')")
    if mask.width < 1 or mask.height < 1:
        raise ValueError(f"the mask is {mask.width}x{mask.height} pixels, which says nothing about what to keep; give "
                         "a mask of the image's size (white = paint, black = keep)")
    if mask.mode not in ("1", "L", "P"):  # float or wide-integer pixels: NaN would read as black (keep)
        check_finite(torch.from_numpy(np.asarray(mask, dtype=np.float64)), f"the mask (mode {mask.mode})")
    if isinstance(image, Image.Image) and mask.size != image.size:
        mask = mask.resize(image.size, Image.NEAREST)
    side = min(mask.size)
    left, top = (mask.width - side) // 2, (mask.height - side) // 2
    mask = mask.convert("L").crop((left, top, left + side, top + side)).resize((size, size), Image.BILINEAR)
    return torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255.0)[None, None]


def _tensor_fill(mask: torch.Tensor, size: int) -> torch.Tensor:
    fills = mask.float().cpu()
    check_finite(fills, "the mask")
    fills = fills[None, None] if fills.ndim == 2 else fills[None] if fills.ndim == 3 else fills
    if fills.ndim != 4 or fills.shape[1] != 1:
        raise ValueError(f"the mask must have a single channel ([H, W], [1, H, W] or [B, 1, H, W]), got "
                         f"{list(mask.shape)}")
    if 0 in fills.shape:
        raise ValueError(f"the mask tensor is empty ({list(mask.shape)}), which says nothing about what to keep; "
                         "give a mask with pixels (1 = paint, 0 = keep)")
    return F.interpolate(fills, size=(size, size), mode="nearest") if fills.shape[-1] != size else fills


def check_mix(items) -> list[tuple]:
    """``[(image_or_text, weight), ...]`` with finite weights whose sum is not zero."""
    items = list(items) if isinstance(items, (list, tuple)) else None
    if not items or not all(isinstance(i, (list, tuple)) and len(i) == 2 for i in items):
        raise ValueError("mix takes a non-empty list of (image_or_text, weight) pairs")
    for item, weight in items:
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise ValueError(f"every weight must be a finite number, got {weight!r} for {item!r:.40}")
    if abs(sum(weight for _, weight in items)) < 1e-8:
        raise ValueError(f"the mix's weights sum to zero ({[w for _, w in items]}); give weights with a non-zero sum")
    return [tuple(i) for i in items]
