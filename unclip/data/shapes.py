"""The ``shapes`` data set: procedurally generated caption/image pairs (contract: docs/data.md).

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
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from PIL import Image

from unclip.configurable import register
from unclip.data.caption_noise import CaptionNoise, others_of
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
# count scenes: the objects stand at distinct corners (docs/data.md, "Scenes")
CORNERS: dict[str, tuple[float, float]] = {
    "top left": (0.25, 0.25),
    "top right": (0.75, 0.25),
    "bottom left": (0.25, 0.75),
    "bottom right": (0.75, 0.75),
}
COUNTS = (2, 3, 4)
COUNT_WORDS = {2: "two", 3: "three", 4: "four"}
DEFAULT_HELDOUT = (("purple", "triangle"), ("orange", "circle"), ("cyan", "square"), ("pink", "diamond"))
SPLITS = ("train", "val", "heldout")
RELATIONS = ("left of", "right of", "above", "below")
BACKGROUND = (255, 255, 255)
MAX_JITTER = 0.03
SUPERSAMPLE = 4

# Caption vocabulary (docs/data.md, "Captions"). Position phrases follow the object's noun phrase.
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
COUNT_TEMPLATES = ("{n} {np}", "a picture of {n} {np}", "there are {n} {np}")  # {np}: "colour shapes"
P_DIGIT = 0.3  # probability that a count caption writes the number as a digit ("3 red circles")
P_NAME = 0.6  # probability that a caption names the size, and (single scenes) the position


@dataclass(frozen=True)
class ShapeObject:
    colour: str
    shape: str
    size: str
    position: str
    centre: tuple[float, float]  # bounding-box centre (x, y) in canvas fractions, jitter included

    def box(self) -> list[float]:
        """The bounding box [x0, y0, x1, y1] in canvas fractions (the object masks of inpainting use it)."""
        half = SIZE_FRACTION[self.size] / 2
        return [self.centre[0] - half, self.centre[1] - half, self.centre[0] + half, self.centre[1] + half]

    def to_meta(self) -> dict:
        return {"colour": self.colour, "shape": self.shape, "size": self.size, "position": self.position,
                "centre": [self.centre[0], self.centre[1]], "box": self.box()}


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
def allowed_combos(split: str, heldout: tuple[tuple[str, str], ...]) -> tuple[tuple[str, str], ...]:
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
    name_probability: float = P_NAME  # of naming size and position; only the captions depend on it
    count_fraction: float = 0.0  # share of count scenes; pair_fraction + count_fraction <= 1

    def __post_init__(self) -> None:
        if self.split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {self.split!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed must be an int, got {self.seed!r}")
        check_image_size(self.image_size)
        if not 0.0 <= self.pair_fraction <= 1.0:
            raise ValueError(f"pair_fraction must be in [0, 1], got {self.pair_fraction!r}")
        if not 0.0 <= self.count_fraction <= 1.0:
            raise ValueError(f"count_fraction must be in [0, 1], got {self.count_fraction!r}")
        if self.pair_fraction + self.count_fraction > 1.0:
            raise ValueError(
                f"pair_fraction + count_fraction must be <= 1 (the rest are single objects), got pair_fraction="
                f"{self.pair_fraction!r} + count_fraction={self.count_fraction!r}; lower one of them"
            )
        if not 0.0 <= self.name_probability <= 1.0:
            raise ValueError(f"name_probability must be in [0, 1], got {self.name_probability!r}")
        if not 0.0 <= self.jitter <= MAX_JITTER:
            raise ValueError(f"jitter must be in [0, {MAX_JITTER}] (canvas sides), got {self.jitter!r}")
        object.__setattr__(self, "heldout", normalise_heldout(self.heldout))
        combos = allowed_combos(self.split, self.heldout)
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


def jittered_centre(rng: random.Random, position: str, jitter: float) -> tuple[float, float]:
    x, y = POSITIONS[position] if position in POSITIONS else CORNERS[position]
    # rounded so that the recorded centre is exactly the rendered one and reads well
    return (round(x + rng.uniform(-jitter, jitter), 6), round(y + rng.uniform(-jitter, jitter), 6))


def _noun_phrase(obj: ShapeObject, named_size: bool) -> str:
    return f"{obj.size} {obj.colour} {obj.shape}" if named_size else f"{obj.colour} {obj.shape}"


def _sample_single(rng: random.Random, config: ShapesConfig, combos) -> tuple[str, dict, list[ShapeObject]]:
    colour, shape = rng.choice(combos)
    size = rng.choice(SIZES)
    position = "centre" if size == "large" else rng.choice(tuple(POSITIONS))
    obj = ShapeObject(colour, shape, size, position, jittered_centre(rng, position, config.jitter))
    named_size = rng.random() < config.name_probability
    named_position = rng.random() < config.name_probability
    caption = single_caption(rng, obj, named_size, named_position)
    return caption, single_meta(obj, named_size, named_position), [obj]


def single_caption(rng: random.Random, obj: ShapeObject, named_size: bool, named_position: bool) -> str:
    """A caption of one object from docs/data.md's templates and synonyms (the template and synonyms drawn from ``rng``)."""
    noun = _noun_phrase(obj, named_size)
    pos = " " + rng.choice(POSITION_PHRASES[obj.position]) if named_position else ""
    return rng.choice(SINGLE_TEMPLATES).format(a=_article(noun), np=noun, pos=pos)


def single_meta(obj: ShapeObject, named_size: bool, named_position: bool) -> dict:
    return {"scene": "single", "objects": [obj.to_meta()], "relation": None,
            "named_size": named_size, "named_position": named_position}


def _sample_pair(rng: random.Random, config: ShapesConfig, combos) -> tuple[str, dict, list[ShapeObject]]:
    first = rng.choice(combos)
    second = rng.choice([combo for combo in combos if combo[0] != first[0]])
    positions = rng.choice((("left", "right"), ("right", "left"), ("top", "bottom"), ("bottom", "top")))
    relation = {"left": "left of", "right": "right of", "top": "above", "bottom": "below"}[positions[0]]
    objects = [ShapeObject(colour, shape, "small", position, jittered_centre(rng, position, config.jitter))
               for (colour, shape), position in zip((first, second), positions)]
    named_size = rng.random() < config.name_probability
    caption = pair_caption(rng, objects, relation, named_size)
    return caption, pair_meta(objects, relation, named_size), objects


def pair_position(relation: str) -> tuple[str, str]:
    """The positions of a pair's first and second object for a relation ("left of" -> left, right)."""
    return {"left of": ("left", "right"), "right of": ("right", "left"), "above": ("top", "bottom"),
            "below": ("bottom", "top")}[relation]


def pair_caption(rng: random.Random, objects: Sequence[ShapeObject], relation: str, named_size: bool) -> str:
    """A caption of a pair scene, "<first> <relation> <second>", from docs/data.md's templates."""
    nouns = [_noun_phrase(obj, named_size) for obj in objects]
    return rng.choice(PAIR_TEMPLATES).format(
        a0=_article(nouns[0]), np0=nouns[0], rel=RELATION_PHRASES[relation], a1=_article(nouns[1]), np1=nouns[1]
    )


def pair_meta(objects: Sequence[ShapeObject], relation: str, named_size: bool) -> dict:
    return {"scene": "pair", "objects": [obj.to_meta() for obj in objects], "relation": relation,
            "named_size": named_size, "named_position": False}


def _sample_count(rng: random.Random, config: ShapesConfig, combos) -> tuple[str, dict, list[ShapeObject]]:
    colour, shape = rng.choice(combos)
    objects = count_objects(rng, colour, shape, rng.choice(COUNTS), config.jitter)
    caption = count_caption(rng, colour, shape, len(objects))
    return caption, count_meta(objects), objects


def count_objects(rng: random.Random, colour: str, shape: str, n: int, jitter: float,
                  keep: Sequence[ShapeObject] = ()) -> list[ShapeObject]:
    """``n`` small objects of one colour and shape at distinct corners drawn at random (``keep``: objects that stay
    where they are, as many of them as fit), listed in the corners' order."""
    kept = {obj.position: obj for obj in rng.sample(list(keep), min(n, len(keep)))}
    free = [corner for corner in CORNERS if corner not in kept]
    chosen = set(kept) | set(rng.sample(free, n - len(kept)))
    return [ShapeObject(colour, shape, "small", corner, kept[corner].centre if corner in kept
                        else jittered_centre(rng, corner, jitter)) for corner in CORNERS if corner in chosen]


def count_caption(rng: random.Random, colour: str, shape: str, n: int) -> str:
    """A caption of a count scene, "three red circles", from docs/data.md's templates (the number a word or a digit)."""
    number = str(n) if rng.random() < P_DIGIT else COUNT_WORDS[n]
    return rng.choice(COUNT_TEMPLATES).format(n=number, np=f"{colour} {shape}s")


def count_meta(objects: Sequence[ShapeObject]) -> dict:
    return {"scene": "count", "objects": [obj.to_meta() for obj in objects], "count": len(objects), "relation": None,
            "named_size": False, "named_position": False}


def _twin_count(rng: random.Random, objects: Sequence[ShapeObject], combos, jitter: float) -> list[ShapeObject]:
    first = objects[0]
    n = rng.choice([k for k in COUNTS if k != len(objects)])
    options = [(3, count_objects(rng, first.colour, first.shape, n, jitter, keep=objects))]  # another number
    colours = [c for c, s in combos if s == first.shape and c != first.colour]
    if colours:
        colour = rng.choice(colours)
        options.append((1, [ShapeObject(colour, o.shape, o.size, o.position, o.centre) for o in objects]))
    shapes = [s for c, s in combos if c == first.colour and s != first.shape]
    if shapes:
        shape = rng.choice(shapes)
        options.append((1, [ShapeObject(o.colour, shape, o.size, o.position, o.centre) for o in objects]))
    return rng.choices([o for _, o in options], weights=[w for w, _ in options])[0]


def _twin_single(rng: random.Random, obj: ShapeObject, meta: dict, combos, jitter: float) -> list[ShapeObject]:
    options = []  # (weight, changed object)
    if meta["named_position"] and obj.size == "small":
        position = rng.choice([p for p in POSITIONS if p != obj.position])
        options.append((2, ShapeObject(obj.colour, obj.shape, "small", position, jittered_centre(rng, position, jitter))))
    if meta["named_size"] and obj.position == "centre":
        size = "small" if obj.size == "large" else "large"
        options.append((1, ShapeObject(obj.colour, obj.shape, size, "centre", obj.centre)))
    colours = [c for c, s in combos if s == obj.shape and c != obj.colour]
    if colours:
        options.append((1, ShapeObject(rng.choice(colours), obj.shape, obj.size, obj.position, obj.centre)))
    shapes = [s for c, s in combos if c == obj.colour and s != obj.shape]
    if shapes:
        options.append((1, ShapeObject(obj.colour, rng.choice(shapes), obj.size, obj.position, obj.centre)))
    if not options:
        raise ValueError(f"no hard-negative twin for {single_caption(rng, obj, False, False)!r}: its caption names neither "
                         f"size nor position, and no other composition of the split {list(combos)} shares its colour or "
                         f"shape; twins (data.twins) are meant for the train split")
    return [rng.choices([o for _, o in options], weights=[w for w, _ in options])[0]]


def _twin_pair(rng: random.Random, objects: Sequence[ShapeObject], combos, jitter: float) -> list[ShapeObject]:
    a, b = objects
    options = [(2, [ShapeObject(a.colour, a.shape, "small", b.position, b.centre),  # the relation reversed
                    ShapeObject(b.colour, b.shape, "small", a.position, a.centre)])]
    if (b.colour, a.shape) in combos and (a.colour, b.shape) in combos:  # colours bound to the other shape
        options.append((1, [ShapeObject(b.colour, a.shape, "small", a.position, a.centre),
                            ShapeObject(a.colour, b.shape, "small", b.position, b.centre)]))
    if a.shape != b.shape and (a.colour, b.shape) in combos and (b.colour, a.shape) in combos:
        options.append((1, [ShapeObject(a.colour, b.shape, "small", a.position, a.centre),
                            ShapeObject(b.colour, a.shape, "small", b.position, b.centre)]))
    return rng.choices([o for _, o in options], weights=[w for w, _ in options])[0]


def twin_scene(index: int, config: ShapesConfig, meta: dict) -> tuple[np.ndarray, str]:
    """A hard negative for item ``index``: the same scene with one attribute its caption names changed (a single
    object's position, size, colour or shape; a pair's relation reversed, or its colours or shapes swapped between
    the two objects; a count scene's number, most often, or its colour or shape), drawn within the split's
    compositions. Its own random stream: items do not shift."""
    rng = random.Random(f"shapes/{config.seed}/{config.split}/{int(index)}/twin")
    combos = allowed_combos(config.split, config.heldout)
    objects = [ShapeObject(o["colour"], o["shape"], o["size"], o["position"], tuple(o["centre"]))
               for o in meta["objects"]]
    if meta["scene"] == "pair":
        twin = _twin_pair(rng, objects, combos, config.jitter)
        relation = {"left": "left of", "right": "right of", "top": "above", "bottom": "below"}[twin[0].position]
        caption = pair_caption(rng, twin, relation, meta["named_size"])
    elif meta["scene"] == "count":
        twin = _twin_count(rng, objects, combos, config.jitter)
        caption = count_caption(rng, twin[0].colour, twin[0].shape, len(twin))
    else:
        twin = _twin_single(rng, objects[0], meta, combos, config.jitter)
        caption = single_caption(rng, twin[0], meta["named_size"], meta["named_position"])
    return _render_array(twin, config.image_size), caption


def _scene(index: int, config: ShapesConfig) -> tuple[str, dict, list[ShapeObject]]:
    """Item ``index``'s caption, meta and objects (not yet rendered)."""
    if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or index < 0:
        raise ValueError(f"index must be a non-negative int, got {index!r}")
    rng = random.Random(f"shapes/{config.seed}/{config.split}/{int(index)}")
    combos = allowed_combos(config.split, config.heldout)
    # one draw picks the scene, always made: the items of the other scenes do not shift with the fractions
    u = rng.random()
    sample = (_sample_pair if u < config.pair_fraction else
              _sample_count if u < config.pair_fraction + config.count_fraction else _sample_single)
    return sample(rng, config, combos)


def _generate(index: int, config: ShapesConfig) -> tuple[np.ndarray, str, dict]:
    caption, meta, objects = _scene(index, config)
    return _render_array(objects, config.image_size), caption, meta


def generate_item(index: int, *, split: str = "train", seed: int = 0, image_size: int = 64,
                  pair_fraction: float = 0.0, heldout=DEFAULT_HELDOUT, jitter: float = MAX_JITTER,
                  name_probability: float = P_NAME, count_fraction: float = 0.0) -> ShapesItem:
    """The item ``index`` of the stream (seed, split): the same image and caption on every machine."""
    config = ShapesConfig(split, seed, image_size, pair_fraction, heldout, jitter, name_probability, count_fraction)
    array, caption, meta = _generate(index, config)
    return ShapesItem(Image.fromarray(array), caption, meta)


@register
class ShapesDataset(torch.utils.data.Dataset):
    """Map-style view of the first ``length`` items of a shapes stream, rendered on the fly."""

    def __init__(self, split: str = "train", length: int = 10_000, image_size: int = 64,
                 pair_fraction: float = 0.0, seed: int = 0, heldout=DEFAULT_HELDOUT, jitter: float = MAX_JITTER,
                 twins: bool = False, name_probability: float = P_NAME, count_fraction: float = 0.0,
                 caption_noise: float = 0.0):
        if isinstance(length, bool) or not isinstance(length, int) or length < 1:
            raise ValueError(f"length must be a positive int, got {length!r}")
        self.config = ShapesConfig(split, seed, image_size, pair_fraction, heldout, jitter, name_probability,
                                   count_fraction)
        self.length = length
        self.twins = bool(twins)  # items also carry "twin_image" / "twin_caption": a hard negative (twin_scene)
        # a share of the training captions replaced by web-like garbage (unclip/data/caption_noise.py)
        self.noise = CaptionNoise(caption_noise, seed, source=f"ShapesDataset(split={split!r})", split=split)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict:
        if not -self.length <= i < self.length:
            raise IndexError(f"index {i} out of range for a ShapesDataset of length {self.length}")
        array, caption, meta = _generate(i % self.length, self.config)
        item = {"image": to_tensor(array), "caption": caption, "meta": meta}
        if self.twins:
            twin, twin_caption = twin_scene(i % self.length, self.config, meta)
            item.update(twin_image=to_tensor(twin), twin_caption=twin_caption)
        if self.noise:
            self.noise.apply(item, i % self.length, others_of(self.length, i % self.length, self._caption))
        return item

    def _caption(self, index: int) -> str:
        return _scene(index, self.config)[0]

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


_CAPTION_PREFIXES = ("a picture of ", "there is ", "there are ")
# any number a user may write, so that one the data set cannot draw ("five red circles") is told apart from words it
# does not know; only COUNTS are drawn
_NUMBERS = {"one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8, "nine": 9,
            "ten": 10}
_COUNT = re.compile(r"^(?P<n>\d+|{words}) (?P<colour>{colours}) (?P<shape>{shapes})s?$".format(
    words="|".join(_NUMBERS), colours="|".join(COLOURS), shapes="|".join(SHAPES)))
_POSITION_BY_PHRASE = {phrase: position for position, phrases in POSITION_PHRASES.items() for phrase in phrases}
_NOUN = re.compile(
    r"^(?:(?:a|an) )?(?:(?P<size>{sizes}) )?(?P<colour>{colours}) (?P<shape>{shapes})(?: (?P<pos>{positions}))?$".format(
        sizes="|".join(SIZES), colours="|".join(COLOURS), shapes="|".join(SHAPES),
        positions="|".join(sorted(map(re.escape, _POSITION_BY_PHRASE), key=len, reverse=True)),
    )
)


def _parse_noun(text: str) -> dict | None:
    match = _NOUN.match(text)
    if match is None:
        return None
    position = _POSITION_BY_PHRASE.get(match["pos"]) if match["pos"] else None
    return {"colour": match["colour"], "shape": match["shape"], "size": match["size"], "position": position}


def _parse_count(match: re.Match) -> dict | None:
    """A count caption's meta ("three red circles", "3 red circles") from its ``_COUNT`` match, or None where the
    data set cannot draw it (another number, or the object in the singular)."""
    n = int(match["n"]) if match["n"].isdigit() else _NUMBERS[match["n"]]
    if n not in COUNTS or not match.string.endswith("s"):
        return None
    objects = [{"colour": match["colour"], "shape": match["shape"], "size": "small", "position": None}
               for _ in range(n)]
    return {"scene": "count", "objects": objects, "count": n, "relation": None, "named_size": False,
            "named_position": False}


def _parse_pair(first: str, relation: str, second: str) -> dict | None:
    """A pair caption's meta from its two noun phrases, or None where the data set cannot draw it."""
    objects = [_parse_noun(first), _parse_noun(second)]
    if None in objects or any(o["position"] or o["size"] == "large" for o in objects):
        return None
    if objects[0]["colour"] == objects[1]["colour"]:
        return None
    for obj, position in zip(objects, pair_position(relation)):
        obj["size"], obj["position"] = "small", position
    named_size = "small" in (first.split() + second.split())
    return {"scene": "pair", "objects": objects, "relation": relation, "named_size": named_size,
            "named_position": False}


def parse_caption(caption: str) -> dict | None:
    """The metadata a caption states, in the items' ``meta`` form (objects without centres; ``size`` / ``position``
    None where the caption leaves them out), or None when the caption is not one this data set can draw: words
    outside docs/data.md's vocabulary, a large object off the centre, a pair of one colour or with a large object,
    a number of objects other than 2, 3 or 4 ("five red circles", "one red circle": outside the vocabulary, so an
    evaluation lists such a prompt rather than counting it).

    The inverse of the captions the generator writes: ``parse_caption(item["caption"])`` agrees with the item's
    ``meta`` on every attribute the caption names. Lets an evaluation judge any prompt a user writes.
    """
    if not isinstance(caption, str):
        return None
    text = " ".join(caption.lower().replace(",", " ").split()).rstrip(".")
    for prefix in _CAPTION_PREFIXES:
        if text.startswith(prefix):
            text = text[len(prefix):]
            break
    counted = _COUNT.match(text)
    if counted:
        return _parse_count(counted)
    for relation, phrase in RELATION_PHRASES.items():
        first, sep, second = text.partition(f" {phrase} ")
        if sep:
            return _parse_pair(first, relation, second)
    obj = _parse_noun(text)
    if obj is None:
        return None
    if obj["size"] == "large" and obj["position"] not in (None, "centre"):
        return None
    named_size, named_position = obj["size"] is not None, obj["position"] is not None
    if obj["position"] not in (None, "centre") and obj["size"] is None:
        obj["size"] = "small"  # only small objects stand off the centre
    return {"scene": "single", "objects": [obj], "relation": None, "named_size": named_size,
            "named_position": named_position}


def class_prompts() -> list[tuple[str, str, str]]:
    """The 32 colour-shape classes for zero-shot evaluation: (colour, shape, "a red circle")."""
    return [(c, s, f"{_article(c)} {c} {s}") for c in COLOURS for s in SHAPES]
