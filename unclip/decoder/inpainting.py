"""The inpainting decoder's pieces: starting one from a trained decoder, the random masks it is trained on, and the
masks' sizes through an upsampling cascade.

Masks here are *keep* masks: float [B, 1, S, S], 1 where the known image is kept and 0 where the model fills in
(``MaskedImageCondition``'s convention). The pipeline's users paint the other way round (white = fill), as in
every image editor; ``UnCLIPPipeline.inpaint`` converts.
"""

from __future__ import annotations

import random
from typing import Mapping, Sequence

import torch

from unclip.diffusion import Inpainting
from unclip.images import resize

# Which masks an inpainting decoder trains on, and how often: a random box; a blob (a union of random discs); the
# box around one of the item's objects (from its metadata; a random box for items without objects); everything
# (plain generation, so that the inpainting decoder can also make whole images).
DEFAULT_MASK_MIX = {"box": 0.35, "blob": 0.25, "object": 0.3, "everything": 0.1}
OBJECT_MARGIN = 0.06  # canvas fraction added around an object's bounding box (a user's mask is never tight)


def check_mask_mix(mix: Mapping[str, float] | None) -> dict[str, float]:
    mix = dict(DEFAULT_MASK_MIX if mix is None else mix)
    unknown = set(mix) - set(DEFAULT_MASK_MIX)
    if unknown:
        raise ValueError(f"unknown mask kinds {sorted(unknown)}; known: {sorted(DEFAULT_MASK_MIX)}")
    if any(not isinstance(w, (int, float)) or w < 0 for w in mix.values()) or sum(mix.values()) <= 0:
        raise ValueError(f"mask_mix weights must be numbers >= 0 with a positive sum, got {mix}")
    return mix


def _box(size: int, x0: float, y0: float, x1: float, y1: float) -> torch.Tensor:
    """Fill mask [S, S] (1 inside) of the box with corners in canvas fractions."""
    coords = (torch.arange(size) + 0.5) / size
    inside_x = (coords >= x0) & (coords <= x1)
    inside_y = (coords >= y0) & (coords <= y1)
    return (inside_y[:, None] & inside_x[None, :]).float()


def random_box(size: int, rng: random.Random) -> torch.Tensor:
    w, h = rng.uniform(0.15, 0.6), rng.uniform(0.15, 0.6)
    x0, y0 = rng.uniform(0, 1 - w), rng.uniform(0, 1 - h)
    return _box(size, x0, y0, x0 + w, y0 + h)


def random_blob(size: int, rng: random.Random) -> torch.Tensor:
    coords = (torch.arange(size) + 0.5) / size
    fill = torch.zeros(size, size)
    cx, cy = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8)
    for _ in range(rng.randint(2, 5)):  # discs around a wandering centre
        radius = rng.uniform(0.06, 0.2)
        inside = (coords[None, :] - cx) ** 2 + (coords[:, None] - cy) ** 2 <= radius**2
        fill = torch.maximum(fill, inside.float())
        cx = min(max(cx + rng.uniform(-0.15, 0.15), 0.0), 1.0)
        cy = min(max(cy + rng.uniform(-0.15, 0.15), 0.0), 1.0)
    return fill


def object_box(obj: Mapping) -> tuple[float, float, float, float]:
    """An object's bounding box in canvas fractions from its metadata's ``box`` [x0, y0, x1, y1] (a data set with
    objects writes it), widened by ``OBJECT_MARGIN``."""
    if "box" not in obj:
        raise ValueError(f"an object's metadata needs its 'box' [x0, y0, x1, y1] in canvas fractions for object "
                         f"masks, got the keys {sorted(obj)}; add it to the data set's metadata or set the mask "
                         f"mix's 'object' weight to 0")
    x0, y0, x1, y1 = obj["box"]
    return x0 - OBJECT_MARGIN, y0 - OBJECT_MARGIN, x1 + OBJECT_MARGIN, y1 + OBJECT_MARGIN


def object_mask(size: int, obj: Mapping) -> torch.Tensor:
    """Fill mask [S, S] over one object (see ``object_box``)."""
    return _box(size, *object_box(obj))


def random_keep_masks(batch: int, size: int, metas: Sequence[Mapping] | None = None, *,
                      mix: Mapping[str, float] | None = None, seed: int | None = None) -> torch.Tensor:
    """Keep masks [batch, 1, size, size] drawn from ``mix`` (see ``DEFAULT_MASK_MIX``); ``metas`` (one per item)
    name the items' objects for the ``object`` kind. ``seed`` None draws from torch's global generator."""
    mix = check_mask_mix(mix)
    if seed is None:
        seed = int(torch.randint(0, 2**62, ()).item())
    rng = random.Random(seed)
    kinds, weights = list(mix), list(mix.values())
    fills = []
    for i in range(batch):
        kind = rng.choices(kinds, weights)[0]
        objects = (metas[i] or {}).get("objects") if metas is not None and i < len(metas) else None
        if kind == "everything":
            fills.append(torch.ones(size, size))
        elif kind == "object" and objects:
            fills.append(object_mask(size, rng.choice(objects)))
        elif kind == "blob":
            fills.append(random_blob(size, rng))
        else:
            fills.append(random_box(size, rng))
    return 1 - torch.stack(fills)[:, None]


def inpainting_decoder_from(decoder, mask_mix: Mapping[str, float] | None = None) -> "torch.nn.Module":
    """An inpainting decoder (``inpaint=True``: the masked image and the mask as 4 more input channels) with every
    weight of ``decoder`` and the new input channels' weights zero: it starts as exactly ``decoder``, whatever the
    mask, and is fine-tuned from there (GLIDE's recipe) on masks drawn from ``mask_mix``."""
    from unclip.config import build

    if getattr(decoder, "inpaints", False):
        return decoder
    model = build({**decoder.config, "inpaint": True, "mask_mix": check_mask_mix(mask_mix)})
    state = decoder.state_dict()
    weight = state["unet.input_conv.weight"]
    wide = torch.zeros_like(model.unet.input_conv.weight)
    wide[:, : weight.shape[1]] = weight
    state["unet.input_conv.weight"] = wide
    model.load_state_dict(state)
    return model.to(next(decoder.parameters()).device)


def decoder_to_fine_tune(path, *, inpaint: bool, mask_mix: Mapping[str, float] | None = None, space=None):
    """The decoder a fine-tune job (``init_from=``) starts from: the checkpoint's EMA weights and architecture (the
    job's architecture settings do not apply), made an inpainting decoder when ``inpaint``. ``space``: the job's
    CLIP embedding space, which the checkpoint's must be."""
    from unclip.checkpoint import load_stage

    stage = load_stage(path, stage="decoder")
    if space is not None and stage.space is not None:
        space.check_same(stage.space, "the job's CLIP", f"the decoder to fine-tune ({stage.path})")
    return inpainting_decoder_from(stage.model, mask_mix) if inpaint else stage.model


def evaluation_inpainting(decoder, images: torch.Tensor, metas: Sequence[Mapping] | None) -> Inpainting | None:
    """What an inpainting decoder's evaluation and previews fill in: ``images`` (resized to its size) with a mask
    over each item's object (a random box, fixed by the item's index, for items without objects); None for a plain
    decoder, which needs no mask."""
    if not getattr(decoder, "inpaints", False):
        return None
    size = decoder.image_size
    known = resize(images, size)
    keep = torch.cat([random_keep_masks(1, size, None if metas is None else [metas[i]], mix={"object": 1.0}, seed=i)
                      for i in range(len(images))])
    return Inpainting(known, keep.to(images.device))
