"""The ``shapes`` data set: procedurally generated caption/image pairs (contract: SHAPES.md).

Every item is a pure function of ``(seed, split, index)``: it is drawn from its own
``random.Random(f"shapes/{seed}/{split}/{index}")`` (string seeding hashes with SHA-512, the same on
every machine), so items can be rendered on the fly in any order, by any worker, and train / val /
heldout never share a stream.

Rendering is analytic: each object's coverage of a pixel is the fraction of a ``SUPERSAMPLE`` x
``SUPERSAMPLE`` grid of sample points inside the shape (a box filter over a supersampled raster).
Fully covered pixels therefore hold exactly the palette colour, untouched pixels stay exactly white,
and edge pixels are the coverage-weighted mix of the two.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from PIL import Image

from unclip.configurable import register
from unclip.data.collate import collate_dicts
from unclip.images import to_tensor

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "orange": (245, 140, 20),
    "yellow": (235, 200, 20),
    "green": (40, 160, 60),
    "cyan": (20, 190, 200),
    "blue": (40, 70, 220),
    "purple": (140, 50, 190),
    "pink": (245, 120, 190),
}
SHAPES = ("circle", "square", "triangle", "diamond")
SIZES = ("small", "large")
SIZE_FRACTION = {"small": 0.25, "large": 0.5}  # bounding-box side / canvas side
POSITIONS: dict[str, tuple[float, float]] = {
    "centre": (0.5, 0.5),
    "left": (0.25, 0.5),
    "right": (0.75, 0.5),
    "top": (0.5, 0.25),
    "bottom": (0.5, 0.75),
}
DEFAULT_HELDOUT = (("purple", "triangle"), ("orange", "circle"), ("cyan", "square"), ("pink", "diamond"))
SPLITS = ("train", "val", "heldout")
RELATIONS = ("left of", "right of", "above", "below")
BACKGROUND = (255, 255, 255)
MAX_JITTER = 0.03
SUPERSAMPLE = 4

# Caption vocabulary (SHAPES.md, "Captions"). Position phrases follow the object's noun phrase.
POSITION_PHRASES: dict[str, tuple[str, ...]] = {
    "centre": ("in the centre", "in the middle", "in the center"),
    "left": ("on the left", "on the left side"),
    "right": ("on the right", "on the right side"),
    "top": ("at the top", "in the upper part"),
    "bottom": ("at the bottom", "in the lower part"),
}
RELATION_PHRASES = {"left of": "to the left of", "right of": "to the right of", "above": "above", "below": "below"}
# {a}: "a"/"an" agreeing with the noun phrase; {np}: "[size ]colour shape"; {pos}: " <position>" or "".
SINGLE_TEMPLATES = ("{a} {np}{pos}", "{np}{pos}", "a picture of {a} {np}{pos}", "there is {a} {np}{pos}")
PAIR_TEMPLATES = ("{a0} {np0} {rel} {a1} {np1}", "a picture of {a0} {np0} {rel} {a1} {np1}",
                  "there is {a0} {np0} {rel} {a1} {np1}")
P_NAME_SIZE = 0.6  # probability that a caption names the size
P_NAME_POSITION = 0.6  # ... the position (single scenes; pair captions name the relation instead)


@dataclass(frozen=True)
class ShapeObject:
    colour: str
    shape: str
    size: str
    position: str
    centre: tuple[float, float]  # bounding-box centre (x, y) in canvas fractions, jitter included

    def to_meta(self) -> dict:
        return {"colour": self.colour, "shape": self.shape, "size": self.size, "position": self.position,
                "centre": [self.centre[0], self.centre[1]]}


@dataclass
class ShapesItem:
    image: Image.Image
    caption: str
    meta: dict


def check_image_size(image_size: int) -> int:
    if isinstance(image_size, bool) or not isinstance(image_size, int) or not (
        16 <= image_size <= 256 and image_size % 8 == 0
    ):
        raise ValueError(f"image_size must be a multiple of 8 from 16 to 256, got {image_size!r}")
    return image_size


def normalise_heldout(heldout: Iterable[Sequence[str]]) -> tuple[tuple[str, str], ...]:
    """Validate a held-out list of (colour, shape) pairs; lists (e.g. from YAML) become tuples."""
    pairs: list[tuple[str, str]] = []
    for entry in heldout:
        if isinstance(entry, str) or len(entry) != 2:
            raise ValueError(f"heldout entries must be (colour, shape) pairs, got {entry!r}")
        colour, shape = entry
        if colour not in COLOURS:
            raise ValueError(f"heldout colour {colour!r} is not one of {list(COLOURS)}")
        if shape not in SHAPES:
            raise ValueError(f"heldout shape {shape!r} is not one of {list(SHAPES)}")
        if (colour, shape) not in pairs:
            pairs.append((colour, shape))
    return tuple(pairs)


@lru_cache(maxsize=64)
def _allowed_combos(split: str, heldout: tuple[tuple[str, str], ...]) -> tuple[tuple[str, str], ...]:
    if split == "heldout":
        return heldout
    return tuple((c, s) for c in COLOURS for s in SHAPES if (c, s) not in heldout)


@dataclass(frozen=True)
class ShapesConfig:
    """Everything that determines the items of a shapes stream; validated at construction."""

    split: str = "train"
    seed: int = 0
    image_size: int = 64
    pair_fraction: float = 0.0
    heldout: tuple = DEFAULT_HELDOUT
    jitter: float = MAX_JITTER

    def __post_init__(self) -> None:
        if self.split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {self.split!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed must be an int, got {self.seed!r}")
        check_image_size(self.image_size)
        if not 0.0 <= self.pair_fraction <= 1.0:
            raise ValueError(f"pair_fraction must be in [0, 1], got {self.pair_fraction!r}")
        if not 0.0 <= self.jitter <= MAX_JITTER:
            raise ValueError(f"jitter must be in [0, {MAX_JITTER}] (canvas sides), got {self.jitter!r}")
        object.__setattr__(self, "heldout", normalise_heldout(self.heldout))
        combos = _allowed_combos(self.split, self.heldout)
        if not combos:
            raise ValueError(f"split {self.split!r} has no colour-shape pair to draw with heldout={self.heldout}")
        if self.pair_fraction > 0 and len({c for c, _ in combos}) < 2:
            raise ValueError(
                f"pair scenes need two colours, but split {self.split!r} allows only {combos} "
                f"(heldout={self.heldout}); set pair_fraction=0 or extend the held-out list"
            )


# ----------------------------------------------------------------------------------------------------
# rendering


def shape_coverage(shape: str, centre_px: tuple[float, float], side_px: float, x0: int, y0: int,
                   width: int, height: int, supersample: int = SUPERSAMPLE) -> np.ndarray:
    """Fraction of each pixel of the window [y0, y0+height) x [x0, x0+width) covered by the shape.

    ``centre_px`` is the bounding-box centre and ``side_px`` its side, in pixels (pixel i spans [i, i+1)).
    Returns float32 [height, width] in [0, 1].
    """
    half = side_px / 2
    offsets = (np.arange(supersample) + 0.5) / supersample
    dx = (np.arange(x0, x0 + width)[:, None] + offsets).reshape(-1) - centre_px[0]  # [width * ss]
    dy = (np.arange(y0, y0 + height)[:, None] + offsets).reshape(-1) - centre_px[1]  # [height * ss]
    dx, dy = dx[None, :], dy[:, None]
    if shape == "square":
        inside = (np.abs(dx) <= half) & (np.abs(dy) <= half)
    elif shape == "circle":
        inside = dx * dx + dy * dy <= half * half
    elif shape == "diamond":
        inside = np.abs(dx) + np.abs(dy) <= half
    elif shape == "triangle":  # apex (0, -half), base corners (+-half, +half): width = height
        inside = (dy <= half) & (2 * np.abs(dx) <= dy + half)
    else:
        raise ValueError(f"shape must be one of {SHAPES}, got {shape!r}")
    inside = inside.reshape(height, supersample, width, supersample)
    return inside.mean(axis=(1, 3), dtype=np.float32)


def _render_array(objects: Sequence[ShapeObject], image_size: int) -> np.ndarray:
    canvas = np.full((image_size, image_size, 3), 255.0, dtype=np.float32)
    for obj in objects:
        if obj.colour not in COLOURS:
            raise ValueError(f"colour must be one of {list(COLOURS)}, got {obj.colour!r}")
        if obj.size not in SIZE_FRACTION:
            raise ValueError(f"size must be one of {SIZES}, got {obj.size!r}")
        side = SIZE_FRACTION[obj.size] * image_size
        cx, cy = obj.centre[0] * image_size, obj.centre[1] * image_size
        x0, x1 = max(0, math.floor(cx - side / 2)), min(image_size, math.ceil(cx + side / 2))
        y0, y1 = max(0, math.floor(cy - side / 2)), min(image_size, math.ceil(cy + side / 2))
        if x1 <= x0 or y1 <= y0:
            continue
        coverage = shape_coverage(obj.shape, (cx, cy), side, x0, y0, x1 - x0, y1 - y0)[..., None]
        window = canvas[y0:y1, x0:x1]
        # coverage 1 gives exactly the palette colour, coverage 0 leaves the pixel untouched
        canvas[y0:y1, x0:x1] = window * (1.0 - coverage) + np.asarray(COLOURS[obj.colour], np.float32) * coverage
    return np.rint(canvas).astype(np.uint8)


def render(objects: Sequence[ShapeObject], image_size: int) -> Image.Image:
    """Draw objects on a white square canvas of side ``image_size``."""
    return Image.fromarray(_render_array(objects, check_image_size(image_size)))


# ----------------------------------------------------------------------------------------------------
# sampling


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _jittered(rng: random.Random, position: str, jitter: float) -> tuple[float, float]:
    x, y = POSITIONS[position]
    # rounded so that the recorded centre is exactly the rendered one and reads well
    return (round(x + rng.uniform(-jitter, jitter), 6), round(y + rng.uniform(-jitter, jitter), 6))


def _noun_phrase(obj: ShapeObject, named_size: bool) -> str:
    return f"{obj.size} {obj.colour} {obj.shape}" if named_size else f"{obj.colour} {obj.shape}"


def _sample_single(rng: random.Random, config: ShapesConfig, combos) -> tuple[str, dict, list[ShapeObject]]:
    colour, shape = rng.choice(combos)
    size = rng.choice(SIZES)
    position = "centre" if size == "large" else rng.choice(tuple(POSITIONS))
    obj = ShapeObject(colour, shape, size, position, _jittered(rng, position, config.jitter))
    named_size = rng.random() < P_NAME_SIZE
    named_position = rng.random() < P_NAME_POSITION
    noun = _noun_phrase(obj, named_size)
    pos = " " + rng.choice(POSITION_PHRASES[position]) if named_position else ""
    caption = rng.choice(SINGLE_TEMPLATES).format(a=_article(noun), np=noun, pos=pos)
    meta = {"scene": "single", "objects": [obj.to_meta()], "relation": None,
            "named_size": named_size, "named_position": named_position}
    return caption, meta, [obj]


def _sample_pair(rng: random.Random, config: ShapesConfig, combos) -> tuple[str, dict, list[ShapeObject]]:
    first = rng.choice(combos)
    second = rng.choice([combo for combo in combos if combo[0] != first[0]])
    positions = rng.choice((("left", "right"), ("right", "left"), ("top", "bottom"), ("bottom", "top")))
    relation = {"left": "left of", "right": "right of", "top": "above", "bottom": "below"}[positions[0]]
    objects = [ShapeObject(colour, shape, "small", position, _jittered(rng, position, config.jitter))
               for (colour, shape), position in zip((first, second), positions)]
    named_size = rng.random() < P_NAME_SIZE
    nouns = [_noun_phrase(obj, named_size) for obj in objects]
    caption = rng.choice(PAIR_TEMPLATES).format(
        a0=_article(nouns[0]), np0=nouns[0], rel=RELATION_PHRASES[relation], a1=_article(nouns[1]), np1=nouns[1]
    )
    meta = {"scene": "pair", "objects": [obj.to_meta() for obj in objects], "relation": relation,
            "named_size": named_size, "named_position": False}
    return caption, meta, objects


def _generate(index: int, config: ShapesConfig) -> tuple[np.ndarray, str, dict]:
    if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or index < 0:
        raise ValueError(f"index must be a non-negative int, got {index!r}")
    rng = random.Random(f"shapes/{config.seed}/{config.split}/{int(index)}")
    combos = _allowed_combos(config.split, config.heldout)
    pair = rng.random() < config.pair_fraction  # always drawn: items do not shift with pair_fraction
    caption, meta, objects = (_sample_pair if pair else _sample_single)(rng, config, combos)
    return _render_array(objects, config.image_size), caption, meta


def generate_item(index: int, *, split: str = "train", seed: int = 0, image_size: int = 64,
                  pair_fraction: float = 0.0, heldout=DEFAULT_HELDOUT, jitter: float = MAX_JITTER) -> ShapesItem:
    """The item ``index`` of the stream (seed, split): the same image and caption on every machine."""
    config = ShapesConfig(split, seed, image_size, pair_fraction, heldout, jitter)
    array, caption, meta = _generate(index, config)
    return ShapesItem(Image.fromarray(array), caption, meta)


@register
class ShapesDataset(torch.utils.data.Dataset):
    """Map-style view of the first ``length`` items of a shapes stream, rendered on the fly."""

    def __init__(self, split: str = "train", length: int = 10_000, image_size: int = 64,
                 pair_fraction: float = 0.0, seed: int = 0, heldout=DEFAULT_HELDOUT, jitter: float = MAX_JITTER):
        if isinstance(length, bool) or not isinstance(length, int) or length < 1:
            raise ValueError(f"length must be a positive int, got {length!r}")
        self.config = ShapesConfig(split, seed, image_size, pair_fraction, heldout, jitter)
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict:
        if not -self.length <= i < self.length:
            raise IndexError(f"index {i} out of range for a ShapesDataset of length {self.length}")
        array, caption, meta = _generate(i % self.length, self.config)
        return {"image": to_tensor(array), "caption": caption, "meta": meta}

    def __repr__(self) -> str:
        return f"ShapesDataset(length={self.length}, {self.config})"


def collate(items: Sequence[dict]) -> dict:
    """Batch dataset items: images stacked to [B, 3, S, S]; captions and metas as lists."""
    return collate_dicts(items)


def write_folder(out_dir, n: int, **dataset_kwargs) -> Path:
    """Write ``n`` items as ``000000.png``... plus ``captions.jsonl`` ({"file", "caption", "meta"} a line)."""
    if "length" in dataset_kwargs:
        raise ValueError("write_folder takes the number of items as n, not length=")
    dataset = ShapesDataset(length=n, **dataset_kwargs)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "captions.jsonl", "w", encoding="utf-8") as lines:
        for i in range(n):
            array, caption, meta = _generate(i, dataset.config)
            name = f"{i:06d}.png"
            Image.fromarray(array).save(out / name)
            lines.write(json.dumps({"file": name, "caption": caption, "meta": meta}) + "\n")
    return out


def class_prompts() -> list[tuple[str, str, str]]:
    """The 32 colour-shape classes for zero-shot evaluation: (colour, shape, "a red circle")."""
    return [(c, s, f"{_article(c)} {c} {s}") for c in COLOURS for s in SHAPES]
