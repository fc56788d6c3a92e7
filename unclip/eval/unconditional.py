"""Unconditional samples on `shapes`, judged from the pixels: are they scenes the data set could hold, and do their
attributes come as often as in the training data?

Each image is read by the pixel judge (``unclip.eval.judge``) and then checked against docs/data.md's scenes
(:func:`read_scene`): a ``single`` object (large only at the centre, small at one of the five positions), a ``pair``
(two small objects of different colours, left/right or top/bottom of each other) or a ``count`` scene (2-4 small
objects of one colour and shape at distinct corners), with nothing else drawn (no ink off the objects). Anything
else is invalid, with the reason.

The attribute frequencies (scene kind over every sample, invalid included; colour, shape, size, position, the count
of a count scene and the joint colour x shape over the objects of valid scenes) are compared by total-variation
distance, TV = 1/2 sum |p - q|, with those of a draw of training images read by the same judge (so that the judge's
own errors cancel), beside:

- ``floor``: a second, independent draw of as many training images as samples, read by the same judge: what a
  perfect model's samples would score (TV of a finite draw is not 0).
- ``shuffled``: that second draw with each object attribute permuted independently across its objects: the
  marginals are the floor's, the colour x shape pairing is broken (what a model that knows the colours and shapes
  but not which go together would score on the joint).
- ``uniform``: the uniform distribution over the vocabulary (3 scene kinds, 8 colours, 4 shapes, 2 sizes, 9 places:
  5 positions and 4 corners, 3 counts, 32 colour x shape pairs): a model that learned no frequencies.

Also the share of samples showing a held-out composition (training never shows one: it is zero-shot composition
done unasked; the floor's share is the judge's false positives).
"""

from __future__ import annotations

import math
import random
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from unclip.data.shapes import COLOURS, CORNERS, COUNTS, DEFAULT_HELDOUT, POSITIONS, SHAPES, SIZES
from unclip.eval.judge import JudgedObject, _to_array, judge

KINDS = ("single", "pair", "count")
PLACES = {**POSITIONS, **CORNERS}  # where an object may stand: the five positions, and the corners of count scenes
PLACE_TOLERANCE = 0.1  # canvas sides between an object's centre and its place (the jitter is 0.03)
INK_DISTANCE = 60.0  # RGB distance from white of a pixel that is ink
STRAY_INK = 0.01  # share of the canvas that may hold ink off the objects' boxes (anti-aliasing, noise)
ATTRIBUTES = ("scene", "colour", "shape", "size", "position", "count", "colour_shape")
VOCABULARY = {"scene": KINDS, "colour": tuple(COLOURS), "shape": SHAPES, "size": SIZES, "position": tuple(PLACES),
              "count": COUNTS, "colour_shape": tuple(f"{c} {s}" for c in COLOURS for s in SHAPES)}


@dataclass
class SceneReading:
    """What one image shows: a valid scene of ``kind`` or not (``reason`` says why), and its objects."""

    valid: bool
    kind: str | None  # single, pair or count; None when invalid
    objects: list[JudgedObject] = field(default_factory=list)
    places: list[str] = field(default_factory=list)  # each object's place (a position or a corner)
    reason: str = ""  # why invalid: a short code (empty, objects, placement, pair, count, stray_ink)

    def attributes(self) -> dict[str, list]:
        """Each attribute's values in this image: the scene kind ("invalid" too), and for a valid scene one value of
        each object attribute per object (``count``: one, for a count scene)."""
        values = {name: [] for name in ATTRIBUTES}
        values["scene"].append(self.kind if self.valid else "invalid")
        if not self.valid:
            return values
        for obj, place in zip(self.objects, self.places):
            for name, value in (("colour", obj.colour), ("shape", obj.shape), ("size", obj.size), ("position", place),
                                ("colour_shape", f"{obj.colour} {obj.shape}")):
                values[name].append(value)
        if self.kind == "count":
            values["count"].append(len(self.objects))
        return values


def _place(obj: JudgedObject) -> str | None:
    """The place (position or corner) the object's centre stands at, None where it is near none."""
    name = min(PLACES, key=lambda p: math.dist(PLACES[p], obj.centre))
    return name if math.dist(PLACES[name], obj.centre) <= PLACE_TOLERANCE else None


def _kind(objects: list[JudgedObject], places: list[str]) -> tuple[str | None, str]:
    """(scene kind, "") for objects at their places that make a docs/data.md scene, else (None, reason)."""
    if len(objects) == 1:
        obj, place = objects[0], places[0]
        ok = place == "centre" if obj.size == "large" else place in POSITIONS
        return ("single", "") if ok else (None, "placement")
    if any(obj.size != "small" for obj in objects):
        return None, "placement"  # only a single object may be large
    if all(place in CORNERS for place in places):  # a count scene's: one colour and shape, each at its own corner
        one_kind = len({(obj.colour, obj.shape) for obj in objects}) == 1
        return ("count", "") if one_kind and len(set(places)) == len(places) else (None, "count")
    if len(objects) == 2 and set(places) in ({"left", "right"}, {"top", "bottom"}):
        return ("pair", "") if objects[0].colour != objects[1].colour else (None, "pair")
    return None, "placement"


def _stray_ink(rgb: np.ndarray, objects: list[JudgedObject]) -> float:
    """The share of the canvas that is ink outside every object's bounding box (with a margin)."""
    height, width = rgb.shape[:2]
    ink = np.linalg.norm(rgb - 255.0, axis=-1) > INK_DISTANCE
    ys, xs = (np.arange(height) + 0.5) / height, (np.arange(width) + 0.5) / width
    for obj in objects:
        half = obj.side / 2 + 0.04
        inside = (np.abs(ys - obj.centre[1]) <= half)[:, None] & (np.abs(xs - obj.centre[0]) <= half)[None, :]
        ink &= ~inside
    return float(ink.mean())


def read_scene(image) -> SceneReading:
    """Judge one image (PIL, or a [3, H, W] tensor in [-1, 1]) and read it as a ``shapes`` scene."""
    judgement = judge(image)
    objects = judgement.objects
    if not objects:
        return SceneReading(False, None, reason="empty")
    if len(objects) > max(COUNTS):
        return SceneReading(False, None, objects, reason="objects")
    places = [_place(obj) for obj in objects]
    if None in places:
        return SceneReading(False, None, objects, reason="placement")
    kind, reason = _kind(objects, places)
    if kind is not None and _stray_ink(_to_array(image), objects) > STRAY_INK:
        kind, reason = None, "stray_ink"
    return SceneReading(kind is not None, kind, objects, places, reason)


# ----------------------------------------------------------------------------------------------------
# frequencies


def frequencies(readings: list[SceneReading]) -> dict[str, Counter]:
    """Each attribute's value counts over the readings."""
    counts = {name: Counter() for name in ATTRIBUTES}
    for reading in readings:
        for name, values in reading.attributes().items():
            counts[name].update(values)
    return counts


def total_variation(p: Counter | dict, q: Counter | dict) -> float:
    """1/2 sum |p - q| of two count tables, each normalised (1 where exactly one is empty, 0 where both are)."""
    p_total, q_total = sum(p.values()), sum(q.values())
    if not p_total or not q_total:
        return float(bool(p_total) != bool(q_total))
    return 0.5 * sum(abs(p.get(k, 0) / p_total - q.get(k, 0) / q_total) for k in set(p) | set(q))


def shuffled(counts_of: list[SceneReading], seed: int = 0) -> dict[str, Counter]:
    """The readings' frequencies with each object attribute permuted independently across their objects: the
    marginals stay, the colour x shape pairing is broken."""
    values = {name: [v for r in counts_of for v in r.attributes()[name]] for name in ATTRIBUTES}
    rng = random.Random(f"unconditional/shuffled/{seed}")
    colours, shapes = list(values["colour"]), list(values["shape"])
    rng.shuffle(colours)
    rng.shuffle(shapes)
    values["colour_shape"] = [f"{c} {s}" for c, s in zip(colours, shapes)]
    return {name: Counter(v) for name, v in values.items()}


def uniform() -> dict[str, dict]:
    """The uniform distribution over each attribute's vocabulary."""
    return {name: {value: 1.0 for value in VOCABULARY[name]} for name in ATTRIBUTES}


def heldout_share(readings: list[SceneReading], heldout=DEFAULT_HELDOUT) -> float:
    """The share of readings that are valid scenes with an object of a held-out colour x shape."""
    pairs = {tuple(pair) for pair in heldout}
    hits = sum(r.valid and any((o.colour, o.shape) in pairs for o in r.objects) for r in readings)
    return hits / max(len(readings), 1)


def compare(readings: list[SceneReading], reference: list[SceneReading], floor: list[SceneReading], *,
            heldout=DEFAULT_HELDOUT, seed: int = 0, prefix: str = "unconditional/") -> dict:
    """The metrics of samples' ``readings`` against the ``reference`` draw of training images, beside the ``floor``
    (another training draw), its shuffle and the uniform distribution (module docstring)."""
    ref = frequencies(reference)
    rows = {"": frequencies(readings), "floor/": frequencies(floor), "shuffled/": shuffled(floor, seed),
            "uniform/": uniform()}
    metrics: dict = {f"{prefix}n": len(readings), f"{prefix}reference_n": len(reference),
                     f"{prefix}floor_n": len(floor)}
    for name, table in rows.items():
        for attribute in ATTRIBUTES:
            metrics[f"{prefix}{name}tv/{attribute}"] = total_variation(table[attribute], ref[attribute])
    for name, group in (("", readings), ("floor/", floor), ("reference/", reference)):
        metrics[f"{prefix}{name}valid"] = sum(r.valid for r in group) / max(len(group), 1)
        metrics[f"{prefix}{name}heldout"] = heldout_share(group, heldout)
        kinds = Counter(r.kind if r.valid else "invalid" for r in group)
        metrics.update({f"{prefix}{name}scene/{k}": kinds[k] / max(len(group), 1) for k in (*KINDS, "invalid")})
    reasons = Counter(r.reason for r in readings if not r.valid)
    metrics.update({f"{prefix}invalid/{reason}": count / max(len(readings), 1) for reason, count in reasons.items()})
    return metrics


def training_draws(training, n: int, reference: int, seed: int = 0) -> tuple[list, list]:
    """Two disjoint draws of training images (``reference`` and ``n`` of them) from a map-style data set whose
    items hold an ``image``, at indices drawn from ``seed``."""
    if len(training) < reference + n:
        raise ValueError(f"the training data has {len(training)} items, fewer than the {reference} + {n} the "
                         "reference and the floor draw; give a longer training split or fewer samples")
    indices = random.Random(f"unconditional/draws/{seed}").sample(range(len(training)), reference + n)
    images = [training[i]["image"] for i in indices]
    return images[:reference], images[reference:]


def training_captions(training, n: int, seed: int = 0) -> list[str]:
    """The captions of ``n`` training items (a map-style data set whose items hold a ``caption``), drawn from
    ``seed``: the caption bank unconditional samples are re-ranked by (``pipe.unconditional(rerank=, captions=)``)."""
    if len(training) < n:
        raise ValueError(f"the training data has {len(training)} items, fewer than the {n} captions asked for the "
                         "caption bank; give fewer (unconditional_captions=)")
    indices = random.Random(f"unconditional/captions/{seed}").sample(range(len(training)), n)
    return [training[i]["caption"] for i in indices]


def unconditional_metrics(images, training, *, reference: int = 1024, heldout=DEFAULT_HELDOUT, seed: int = 0,
                          prefix: str = "unconditional/") -> dict:
    """Judge unconditional samples (PIL images, or tensors [N, 3, H, W] in [-1, 1]) against ``training`` (a
    map-style data set of the training split, items with ``image``): ``reference`` training images are the
    distribution compared with, another draw of as many as there are samples the floor. See the module docstring."""
    samples = list(images)
    if not samples:
        raise ValueError("got no unconditional samples to judge; give at least one image")
    ref_images, floor_images = training_draws(training, len(samples), reference, seed)
    return compare([read_scene(i) for i in samples], [read_scene(i) for i in ref_images],
                   [read_scene(i) for i in floor_images], heldout=heldout, seed=seed, prefix=prefix)


def unconditional_table(metrics: dict, prefix: str = "unconditional/") -> str:
    """The metrics as a text table: valid share, scene-kind shares and held-out share (samples beside the training
    draws), then each attribute's TV distance to the training reference beside the baselines."""
    def get(key: str) -> str:
        value = metrics.get(f"{prefix}{key}")
        return "-" if value is None else f"{value:.3f}"

    n, floor, ref = (int(metrics.get(f"{prefix}{k}", 0)) for k in ("n", "floor_n", "reference_n"))
    rerank, prior = int(metrics.get(f"{prefix}rerank", 1)), int(metrics.get(f"{prefix}prior_candidates", 1))
    best = " and ".join([*([f"the best of {rerank}"] if rerank > 1 else []),
                         *([f"its image embedding the best of {prior} prior samples"] if prior > 1 else [])])
    ranked = (f" (each {best} by a bank of {int(metrics.get(f'{prefix}bank_captions', 0))} training captions)"
              if best else "")
    lines = [f"unconditional samples: {n}{ranked}, judged from the pixels; training reference {ref}, floor draw {floor}",
             "| share | samples | training (floor draw) | training (reference) |", "| --- | --- | --- | --- |"]
    for label, key in (("valid scenes", "valid"), *((f"scene: {k}", f"scene/{k}") for k in (*KINDS, "invalid")),
                       ("held-out composition", "heldout")):
        lines.append(f"| {label} | {get(key)} | {get('floor/' + key)} | {get('reference/' + key)} |")
    lines += ["", "| TV distance to the training reference | samples | floor (2nd training draw) | shuffled floor | "
              "uniform |", "| --- | --- | --- | --- | --- |"]
    for attribute in ATTRIBUTES:
        lines.append(f"| {attribute.replace('_', ' x ')} | {get('tv/' + attribute)} | {get('floor/tv/' + attribute)} | "
                     f"{get('shuffled/tv/' + attribute)} | {get('uniform/tv/' + attribute)} |")
    return "\n".join(lines)
