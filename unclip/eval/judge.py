"""Judge a ``shapes`` image from its pixels alone: which objects, of what colour, shape, size and place.

How it decides (any image size; tolerant of blur, noise, colour shift and grey speckle):

1. Ink: every pixel is explained as white mixed with a palette colour, ``white + alpha * (colour - white)``.
   A pixel is *coloured* when, for its best palette colour, ``alpha >= 0.5`` and the pixel lies within
   ``MAX_RESIDUAL`` of that line, and it is not grey (``MIN_CHROMA``). Segmentation runs on a lightly
   smoothed copy so that pixel noise averages out; white, grey and noise pixels stay background.
2. Objects: 8-connected components of coloured pixels, at least ``MIN_AREA_FRACTION`` of the area of
   the smallest object docs/data.md allows. A component's colour is the palette line nearest its mean
   core colour; at least ``MIN_CONSISTENCY`` of its pixels must agree (pure noise never does).
   An object lies on white and has a sharp edge: most of a ring 2 px and more outside it must be
   near-white (``MIN_WHITE_SURROUND``), and it does not touch the canvas border; this rejects blobs
   and gradients in noise.
3. Shape: for each shape, the template with the component's ink area and centroid is rendered with
   the data set's own rasteriser (sharp, and blurred by ``FIT_BLURS``) and compared with the
   component's soft ink (alpha) map; the best soft IoU wins and must reach ``MIN_FIT``. Size is the
   template side (small 0.25 / large 0.5 of the canvas, split at their geometric mean); position is
   the nearest of docs/data.md's five centres.

Objects are returned largest first: for a single-object prompt ``objects[0]`` is "the" object, and
``len(objects)`` says how many the image holds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from unclip.data.shapes import COLOURS, POSITIONS, SHAPES, SIZE_FRACTION, shape_coverage

MAX_RESIDUAL = 50.0  # max distance (0..255 RGB units) of a coloured pixel from its colour's white line
MIN_CHROMA = 25.0  # min distance from the grey axis of a coloured pixel
MIN_ALPHA = 0.5  # a pixel is coloured when mostly ink
MIN_AREA_FRACTION = 0.3  # of the smallest object's area (a small triangle: (S/4)^2 / 2)
MIN_CONSISTENCY = 0.6  # fraction of a component's pixels that must take its colour
MIN_FIT = 0.5  # soft IoU of the best shape template
MIN_WHITE_SURROUND = 0.6  # fraction of near-white pixels in a ring around an object
MAX_WHITE_DISTANCE = 80.0  # near-white: within this RGB distance of white ...
MAX_RING_ALPHA = 0.3  # ... and holding little of the object's colour (objects have sharp edges)
MAX_SIDE_FRACTION = 0.8  # larger "objects" are backgrounds, not shapes
MAX_CANDIDATES = 16  # components examined, largest first
FIT_BLURS = (0.7, 1.2)  # Gaussian sigmas (pixels) of the soft templates tried besides the sharp one
FIT_RESOLUTION = 40  # shape fitting works on windows of at most this side (pixels)

_WHITE = np.float32(255.0)
_NAMES = list(COLOURS)
_DIRECTIONS = np.asarray(list(COLOURS.values()), np.float32) - _WHITE  # [K, 3], colour - white
_DIRECTION_NORM2 = (_DIRECTIONS**2).sum(1)  # [K]
_FILL = {"circle": math.pi / 4, "square": 1.0, "triangle": 0.5, "diamond": 0.5}  # area / bbox area
_SIZE_SPLIT = math.sqrt(SIZE_FRACTION["small"] * SIZE_FRACTION["large"])


@dataclass
class JudgedObject:
    colour: str
    shape: str
    size: str
    position: str
    centre: tuple[float, float]  # bounding-box centre (x, y) in canvas fractions
    side: float = 0.0  # bounding-box side, fraction of the canvas
    fit: float = 1.0  # soft IoU with the chosen shape template


@dataclass
class Judgement:
    objects: list[JudgedObject]  # largest first; empty for a blank, grey or noise image
    relation: str | None  # how objects[0] stands to objects[1] ("left of", ...); None with < 2 objects

    @property
    def count(self) -> int:
        return len(self.objects)


def relation_between(a: tuple[float, float], b: tuple[float, float]) -> str:
    """How the object centred at ``a`` stands to the one at ``b``, along the axis they differ most."""
    dx, dy = a[0] - b[0], a[1] - b[1]
    if abs(dx) >= abs(dy):
        return "left of" if dx < 0 else "right of"
    return "above" if dy < 0 else "below"


# ----------------------------------------------------------------------------------------------------
# pixels


def _to_array(image) -> np.ndarray:
    """PIL image, [3, H, W] tensor in [-1, 1], or uint8 [H, W, 3] array -> float32 [H, W, 3] in 0..255."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float32)
    if isinstance(image, torch.Tensor):
        if image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"judge expects a [3, H, W] tensor, got shape {tuple(image.shape)}")
        x = image.detach().to("cpu", torch.float32).clamp(-1, 1).numpy()
        return ((x.transpose(1, 2, 0) + 1.0) * 127.5).astype(np.float32)
    if isinstance(image, np.ndarray) and image.ndim == 3 and image.shape[2] == 3:
        return image.astype(np.float32)
    raise TypeError(f"judge expects a PIL image or a [3, H, W] tensor in [-1, 1], got {type(image).__name__}")


def _smooth(rgb: np.ndarray) -> np.ndarray:
    """Separable [1, 2, 1] / 4 blur with edge padding: [H, W, 3] -> [H, W, 3]."""
    p = np.pad(rgb, ((1, 1), (0, 0), (0, 0)), mode="edge")
    rgb = (p[:-2] + 2 * p[1:-1] + p[2:]) / 4
    p = np.pad(rgb, ((0, 0), (1, 1), (0, 0)), mode="edge")
    return (p[:, :-2] + 2 * p[:, 1:-1] + p[:, 2:]) / 4


def _fit_lines(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Alpha and residual of every pixel against every palette line: [..., 3] -> ([..., K], [..., K])."""
    ink = rgb - _WHITE
    # written out rather than a matmul: BLAS threads cost more than they save on this small product
    dots = ink[..., 0:1] * _DIRECTIONS[:, 0] + ink[..., 1:2] * _DIRECTIONS[:, 1] + ink[..., 2:3] * _DIRECTIONS[:, 2]
    alpha = dots / _DIRECTION_NORM2
    residual2 = (ink * ink).sum(-1, keepdims=True) - alpha * dots  # |ink|^2 - (ink . d)^2 / |d|^2
    return alpha, np.sqrt(np.maximum(residual2, 0.0))


def _classify(rgb: np.ndarray) -> np.ndarray:
    """Colour index of every coloured pixel, -1 elsewhere: [H, W, 3] -> int [H, W].

    The best line is chosen by residual alone (a light edge pixel of red lies on red's line, even
    though it is "more than half" of the paler pink); only then must the pixel be mostly ink.
    """
    alpha, residual = _fit_lines(rgb)
    best = np.where(alpha > 0.1, residual, np.inf).argmin(-1)[..., None]
    best_alpha = np.take_along_axis(alpha, best, -1)[..., 0]
    best_residual = np.take_along_axis(residual, best, -1)[..., 0]
    chroma = np.linalg.norm(rgb - rgb.mean(-1, keepdims=True), axis=-1)
    coloured = (best_alpha >= MIN_ALPHA) & (best_residual <= MAX_RESIDUAL) & (chroma >= MIN_CHROMA)
    return np.where(coloured, best[..., 0], -1)


def label_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """8-connected components of a bool [H, W] mask -> (int32 labels [H, W], 0 = background; count).

    Works on horizontal runs: a union-find over runs that touch runs of the row above.
    """
    h, w = mask.shape
    padded = np.zeros((h, w + 2), np.int8)
    padded[:, 1:-1] = mask
    steps = np.diff(padded, axis=1)
    rows, starts = np.nonzero(steps == 1)
    _, ends = np.nonzero(steps == -1)  # exclusive; same row-major order as starts
    n = len(rows)
    labels = np.zeros((h, w), np.int32)
    if n == 0:
        return labels, 0
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    row_begin = np.searchsorted(rows, np.arange(h + 1))
    starts_l, ends_l, begin_l = starts.tolist(), ends.tolist(), row_begin.tolist()
    for r in range(1, h):
        i, i_end = begin_l[r - 1], begin_l[r]  # runs of the row above
        j, j_end = begin_l[r], begin_l[r + 1]
        while i < i_end and j < j_end:
            # 8-connectivity: runs touch when they overlap or meet diagonally
            if starts_l[i] <= ends_l[j] and starts_l[j] <= ends_l[i]:
                a, b = find(i), find(j)
                if a != b:
                    parent[max(a, b)] = min(a, b)
            if ends_l[i] < ends_l[j]:
                i += 1
            else:
                j += 1
    roots = np.fromiter((find(i) for i in range(n)), np.int64, n)
    _, run_label = np.unique(roots, return_inverse=True)
    lengths = ends - starts
    flat_start = rows * w + starts
    offsets = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    labels.flat[np.repeat(flat_start, lengths) + offsets] = np.repeat(run_label + 1, lengths)
    return labels, int(run_label.max()) + 1


def _dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """Binary dilation of a bool [h, w] mask by a (2 radius + 1)^2 square."""
    h, w = mask.shape
    padded = np.pad(mask, radius)
    across = np.zeros((h + 2 * radius, w), bool)
    for shift in range(2 * radius + 1):
        across |= padded[:, shift : shift + w]
    out = np.zeros((h, w), bool)
    for shift in range(2 * radius + 1):
        out |= across[shift : shift + h]
    return out


# ----------------------------------------------------------------------------------------------------
# objects


def _nearest_position(centre: tuple[float, float]) -> str:
    return min(POSITIONS, key=lambda p: (POSITIONS[p][0] - centre[0]) ** 2 + (POSITIONS[p][1] - centre[1]) ** 2)


def _blur_matrix(n: int, sigma: float) -> np.ndarray:
    """[n, n] matrix applying a 1-D Gaussian blur (zero outside the window)."""
    offsets = np.arange(n)[:, None] - np.arange(n)[None, :]
    kernel = np.exp(-0.5 * (offsets / sigma) ** 2)
    return (kernel / kernel.sum(1, keepdims=True).max()).astype(np.float32)


def _fit_shape(ink: np.ndarray) -> tuple[str, float, tuple[float, float], float]:
    """Best shape template for a soft ink map [h, w] (window coordinates, pixel i spans [i, i+1)).

    Each shape's template has the ink's area and centroid; it is also compared blurred by each of
    ``FIT_BLURS`` (pixels) so that a soft image is matched against soft templates. Large windows are
    box-downsampled to at most ``FIT_RESOLUTION`` pixels first. Returns (shape, side px, bounding-box
    centre px, soft IoU of the best match).
    """
    factor = max(1, math.ceil(max(ink.shape) / FIT_RESOLUTION))
    if factor > 1:
        h, w = (-(-n // factor) * factor for n in ink.shape)
        ink = np.pad(ink, ((0, h - ink.shape[0]), (0, w - ink.shape[1])))
        ink = ink.reshape(h // factor, factor, w // factor, factor).mean((1, 3))
    h, w = ink.shape
    area = float(ink.sum())
    mx = float((ink.sum(0) * (np.arange(w) + 0.5)).sum() / area)
    my = float((ink.sum(1) * (np.arange(h) + 0.5)).sum() / area)
    blurs = [(_blur_matrix(h, sigma), _blur_matrix(w, sigma)) for sigma in FIT_BLURS]
    best = ("circle", 0.0, (mx, my), -1.0)
    for shape in SHAPES:
        side = math.sqrt(area / _FILL[shape])
        # the centroid of an upright triangle lies side / 6 below its bounding-box centre
        centre = (mx, my - side / 6) if shape == "triangle" else (mx, my)
        sharp = shape_coverage(shape, centre, side, 0, 0, w, h)
        for template in [sharp] + [np.clip((bh @ sharp @ bw.T - 0.1) / 0.8, 0, 1) for bh, bw in blurs]:
            iou = float(np.minimum(ink, template).sum() / max(np.maximum(ink, template).sum(), 1e-6))
            if iou > best[3]:
                best = (shape, side * factor, (centre[0] * factor, centre[1] * factor), iou)
    return best


def judge(image) -> Judgement:
    """Find the shapes objects in one image (PIL, or a [3, H, W] tensor in [-1, 1])."""
    rgb = _to_array(image)  # [H, W, 3], 0..255
    height, width = rgb.shape[:2]
    canvas = min(height, width)
    smooth = _smooth(rgb)
    pixel_colour = _classify(smooth)  # [H, W], -1 = background
    components, count = label_components(pixel_colour >= 0)
    if count == 0:
        return Judgement([], None)
    areas = np.bincount(components.ravel(), minlength=count + 1)
    areas[0] = 0
    min_area = max(4.0, MIN_AREA_FRACTION * (SIZE_FRACTION["small"] * canvas) ** 2 / 2)
    candidates = [int(c) for c in np.argsort(-areas)[:MAX_CANDIDATES] if areas[c] >= min_area]
    pad = 2 + canvas // 64
    found: list[tuple[float, JudgedObject]] = []
    for label in candidates:
        member = components == label
        rows, cols = np.nonzero(member)
        if rows.min() == 0 or cols.min() == 0 or rows.max() == height - 1 or cols.max() == width - 1:
            continue  # objects never touch the border: this is background, or cut off
        y0, y1 = max(0, rows.min() - pad), min(height, rows.max() + pad + 1)
        x0, x1 = max(0, cols.min() - pad), min(width, cols.max() + pad + 1)
        alpha, residual = _fit_lines(rgb[y0:y1, x0:x1])  # [h, w, K] on the raw pixels
        colours = pixel_colour[rows, cols]
        core = alpha[rows - y0, cols - x0, colours] >= 0.75
        mean_rgb = rgb[rows[core], cols[core]].mean(0) if core.sum() >= 3 else rgb[rows, cols].mean(0)
        mean_alpha, mean_residual = _fit_lines(mean_rgb)
        colour = int(np.where(mean_alpha > 0.1, mean_residual, np.inf).argmin())
        if (colours == colour).mean() < MIN_CONSISTENCY:
            continue
        window = member[y0:y1, x0:x1]
        # objects lie on white: most of a ring around the component must be near-white
        ring = _dilate(window, pad) & ~_dilate(window, 1)
        around = smooth[y0:y1, x0:x1][ring]  # [n, 3]
        around_alpha = (around - _WHITE) @ _DIRECTIONS[colour] / _DIRECTION_NORM2[colour]
        white = (np.linalg.norm(around - _WHITE, axis=-1) <= MAX_WHITE_DISTANCE) & (around_alpha <= MAX_RING_ALPHA)
        if ring.any() and white.mean() < MIN_WHITE_SURROUND:
            continue
        # the component and the background around it (anti-aliased edges), not other components
        near = _dilate(window, pad) & ((components[y0:y1, x0:x1] == 0) | window)
        ink = np.clip((alpha[..., colour] - 0.1) / 0.8, 0.0, 1.0)
        ink = np.where(near & (residual[..., colour] <= 2 * MAX_RESIDUAL), ink, 0.0)
        if ink.sum() < min_area / 2:
            continue
        shape, side, centre, fit = _fit_shape(ink.astype(np.float32))
        centre = (x0 + centre[0], y0 + centre[1])
        if fit < MIN_FIT or side > MAX_SIDE_FRACTION * canvas:
            continue
        centre_fraction = (float(centre[0] / width), float(centre[1] / height))
        found.append((float(ink.sum()), JudgedObject(
            colour=_NAMES[colour],
            shape=shape,
            size="small" if side / canvas < _SIZE_SPLIT else "large",
            position=_nearest_position(centre_fraction),
            centre=centre_fraction,
            side=side / canvas,
            fit=fit,
        )))
    objects = [obj for _, obj in sorted(found, key=lambda pair: -pair[0])]
    relation = relation_between(objects[0].centre, objects[1].centre) if len(objects) >= 2 else None
    return Judgement(objects, relation)


def judge_batch(images) -> list[Judgement]:
    """Judge a [B, 3, H, W] tensor in [-1, 1] or a sequence of images."""
    if isinstance(images, torch.Tensor) and images.ndim == 4:
        images = list(images)
    return [judge(image) for image in images]


# ----------------------------------------------------------------------------------------------------
# scoring


def _find(judgement: Judgement, colour: str | None, shape: str, exclude: int | None = None) -> int | None:
    """The first judged object of that colour (any, for None) and shape other than ``exclude``."""
    for i, obj in enumerate(judgement.objects):
        if i != exclude and colour in (None, obj.colour) and obj.shape == shape:
            return i
    return None


def pair_checks(judgement: Judgement, meta: dict) -> dict[str, bool]:
    """A pair scene: ``objects`` (both colour-shape objects found), ``relation`` (found, and standing as the caption
    says), ``shapes`` (both shapes found, whatever their colours), ``all`` (the same as ``relation``)."""
    wanted = meta["objects"]
    first = _find(judgement, wanted[0]["colour"], wanted[0]["shape"])
    second = None if first is None else _find(judgement, wanted[1]["colour"], wanted[1]["shape"], first)
    found = first is not None and second is not None
    relation = found and relation_between(judgement.objects[first].centre,
                                           judgement.objects[second].centre) == meta["relation"]
    shape = _find(judgement, None, wanted[0]["shape"])
    shapes = shape is not None and _find(judgement, None, wanted[1]["shape"], shape) is not None
    return {"objects": found, "relation": relation, "shapes": shapes, "all": relation}


def count_checks(judgement: Judgement, meta: dict) -> dict[str, bool]:
    """A count scene ("three red circles"): ``count`` (exactly the named number of objects found), ``colour`` and
    ``shape`` (every object found has the named colour / shape, and there is one), ``all`` (the three)."""
    target, found = meta["objects"][0], judgement.objects
    colour = bool(found) and all(obj.colour == target["colour"] for obj in found)
    shape = bool(found) and all(obj.shape == target["shape"] for obj in found)
    count = judgement.count == meta.get("count", len(meta["objects"]))
    return {"count": count, "colour": colour, "shape": shape, "all": count and colour and shape}


def score(judgements: Sequence[Judgement], metas: Sequence[dict]) -> dict[str, float]:
    """Accuracy of judged images against the metadata of the captions they were made from.

    Single-object scenes (the largest judged object is "the" object): ``colour_acc``, ``shape_acc``,
    ``colour_shape_acc`` over ``n_single``; ``size_acc`` over the ``n_named_size`` captions that named
    the size, ``position_acc`` over the ``n_named_position`` that named the position. Pair scenes:
    ``pair_acc`` (both colour-shape objects found and their relation right), ``pair_objects_acc`` (both
    found) over ``n_pair``. Count scenes: ``count_scene_acc`` (every object the named colour and shape, exactly the
    named number; :func:`count_checks`) over ``n_count``. Every scene: ``count_acc`` (as many objects as the meta has) and
    ``mean_objects``. An accuracy is present only when its count is positive.
    """
    if len(judgements) != len(metas):
        raise ValueError(f"got {len(judgements)} judgements for {len(metas)} metas")
    tallies = {key: 0 for key in ("colour", "shape", "colour_shape", "size", "position", "pair", "pair_objects",
                                  "count_scene")}
    counts = {"n_single": 0, "n_named_size": 0, "n_named_position": 0, "n_pair": 0, "n_count": 0}
    count_right = 0
    total_objects = 0
    for judgement, meta in zip(judgements, metas):
        wanted = meta["objects"]
        count_right += judgement.count == len(wanted)
        total_objects += judgement.count
        if meta["scene"] == "pair":
            counts["n_pair"] += 1
            checks = pair_checks(judgement, meta)
            tallies["pair_objects"] += checks["objects"]
            tallies["pair"] += checks["relation"]
            continue
        if meta["scene"] == "count":
            counts["n_count"] += 1
            tallies["count_scene"] += count_checks(judgement, meta)["all"]
            continue
        counts["n_single"] += 1
        target = wanted[0]
        got = judgement.objects[0] if judgement.objects else None
        colour_ok = got is not None and got.colour == target["colour"]
        shape_ok = got is not None and got.shape == target["shape"]
        tallies["colour"] += colour_ok
        tallies["shape"] += shape_ok
        tallies["colour_shape"] += colour_ok and shape_ok
        if meta.get("named_size"):
            counts["n_named_size"] += 1
            tallies["size"] += got is not None and got.size == target["size"]
        if meta.get("named_position"):
            counts["n_named_position"] += 1
            tallies["position"] += got is not None and got.position == target["position"]
    n = len(metas)
    result: dict[str, float] = {"n": n, **counts}
    if n:
        result["count_acc"] = count_right / n
        result["mean_objects"] = total_objects / n
    for key, over in (("colour", "n_single"), ("shape", "n_single"), ("colour_shape", "n_single"),
                      ("size", "n_named_size"), ("position", "n_named_position"),
                      ("pair", "n_pair"), ("pair_objects", "n_pair"), ("count_scene", "n_count")):
        if counts[over]:
            result[f"{key}_acc"] = tallies[key] / counts[over]
    return result
