"""A fixed prompt set balanced over every attribute value of `shapes`, and a report per attribute value.

A pipeline's accuracy on captions drawn like the training data hides what it cannot do: most captions that name a
position name the centre, and large objects are always centred. This prompt set names every attribute and
gives each value its share:

* ``val``: single objects of the training compositions, every (colour-shape pair, size-position cell) once,
  the cells being large-centre and small at each of the five positions (168 scenes);
* ``heldout``: the held-out colour-shape pairs (docs/data.md) in every cell (24 scenes, repeated with other
  captions and jitter);
* ``pair``: two small objects of the training compositions, each of the four relations equally often;
* ``pair_heldout``: the same with two held-out compositions, ``pair_mixed`` with one held-out and one training
  composition (in either order): composition the model never saw, in a scene of two;
* ``count``: 2, 3 or 4 objects of one training composition ("three red circles"), each number equally often and the
  compositions in rounds; ``count_heldout``: the same of the held-out compositions.

Captions come from docs/data.md's templates and synonyms (always naming size and position for single objects), each
scene with its rendered image, so that the same set measures text -> image and image -> image (variations).
Everything is a function of the seed; each split draws from a random stream of its own, so adding a split moves no
other split's prompts.

The report (:func:`fidelity_report`) gives, per split, the share of images with each attribute right and with all
of them right, and the same per attribute value (``position=top``, ``relation=above``, ``count=3``, ...).
:func:`geneval_scores` reads GenEval's six categories (Ghosh et al. 2023) off such a report, :func:`geneval_table`
prints them beside the published rows.
"""

from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass
from typing import Sequence

import torch
from PIL import Image

from unclip.data.shapes import (
    COUNTS,
    DEFAULT_HELDOUT,
    POSITIONS,
    RELATIONS,
    ShapeObject,
    ShapesConfig,
    allowed_combos,
    count_caption,
    count_meta,
    count_objects,
    jittered_centre,
    pair_caption,
    pair_meta,
    pair_position,
    parse_caption,
    render,
    single_caption,
    single_meta,
)
from unclip.eval.judge import Judgement, count_checks, judge_batch, pair_checks

SINGLE_CELLS = (("large", "centre"),) + tuple(("small", position) for position in POSITIONS)
SPLITS = ("val", "heldout", "pair", "pair_heldout", "pair_mixed", "count", "count_heldout")
DEFAULT_COUNTS = {"val": 168, "heldout": 48, "pair": 64, "pair_heldout": 24, "pair_mixed": 24, "count": 36,
                  "count_heldout": 24}
SINGLE_ATTRIBUTES = ("colour", "shape", "size", "position")


@dataclass(frozen=True)
class Scene:
    """A prompt with the scene it describes."""

    caption: str
    meta: dict
    objects: tuple[ShapeObject, ...]

    def render(self, image_size: int) -> Image.Image:
        return render(self.objects, image_size)


def _single_scenes(combos, n: int, rng: random.Random, jitter: float) -> list[Scene]:
    scenes = []
    while len(scenes) < n:  # rounds of the whole grid, cells interleaved: any n has every cell equally often (+-1)
        columns = [rng.sample(list(combos), len(combos)) for _ in SINGLE_CELLS]
        round_ = [(column[i], cell) for i in range(len(combos)) for column, cell in zip(columns, SINGLE_CELLS)]
        for (colour, shape), (size, position) in round_[: n - len(scenes)]:
            obj = ShapeObject(colour, shape, size, position, jittered_centre(rng, position, jitter))
            caption = single_caption(rng, obj, named_size=True, named_position=True)
            scenes.append(Scene(caption, single_meta(obj, True, True), (obj,)))
    return scenes


def _draw_pair(combos):
    """Two compositions of ``combos`` of different colours."""
    def draw(rng: random.Random):
        first = rng.choice(combos)
        return first, rng.choice([combo for combo in combos if combo[0] != first[0]])
    return draw


def _draw_mixed(heldout, train_combos):
    """A held-out and a training composition of another colour, in either order."""
    def draw(rng: random.Random):
        first = rng.choice(heldout)
        second = rng.choice([combo for combo in train_combos if combo[0] != first[0]])
        return (first, second) if rng.random() < 0.5 else (second, first)
    return draw


def _pair_scenes(draw, n: int, rng: random.Random, jitter: float) -> list[Scene]:
    scenes = []
    for i in range(n):
        relation = RELATIONS[i % len(RELATIONS)]
        first, second = draw(rng)
        objects = tuple(
            ShapeObject(colour, shape, "small", position, jittered_centre(rng, position, jitter))
            for (colour, shape), position in zip((first, second), pair_position(relation))
        )
        named_size = rng.random() < 0.5
        caption = pair_caption(rng, objects, relation, named_size)
        scenes.append(Scene(caption, pair_meta(objects, relation, named_size), objects))
    return scenes


def _count_scenes(combos, n: int, rng: random.Random, jitter: float) -> list[Scene]:
    scenes, order = [], []
    for i in range(n):  # the numbers in turn; the compositions in shuffled rounds
        if not order:
            order = rng.sample(list(combos), len(combos))
        colour, shape = order.pop()
        objects = count_objects(rng, colour, shape, COUNTS[i % len(COUNTS)], jitter)
        scenes.append(Scene(count_caption(rng, colour, shape, len(objects)), count_meta(objects), tuple(objects)))
    return scenes


def _split_scenes(split: str, n: int, rng: random.Random, heldout, jitter: float) -> list[Scene]:
    train_combos = allowed_combos("train", heldout)
    if split == "pair":
        return _pair_scenes(_draw_pair(train_combos), n, rng, jitter)
    if split == "pair_heldout":
        if len({colour for colour, _ in heldout}) < 2:
            raise ValueError(f"the split pair_heldout needs held-out compositions of two colours, got {heldout}; "
                             "set its count to 0")
        return _pair_scenes(_draw_pair(heldout), n, rng, jitter)
    if split == "pair_mixed":
        return _pair_scenes(_draw_mixed(heldout, train_combos), n, rng, jitter)
    if split in ("count", "count_heldout"):
        return _count_scenes(train_combos if split == "count" else heldout, n, rng, jitter)
    return _single_scenes(train_combos if split == "val" else heldout, n, rng, jitter)


def balanced_scenes(counts: dict[str, int] | None = None, *, seed: int = 0, heldout=DEFAULT_HELDOUT,
                    jitter: float = 0.03) -> dict[str, list[Scene]]:
    """The balanced prompt set: ``{split: [Scene, ...]}`` for the splits with a positive count."""
    counts = dict(DEFAULT_COUNTS if counts is None else counts)
    unknown = sorted(set(counts) - set(SPLITS))
    if unknown:
        raise ValueError(f"the balanced prompt set has the splits {list(SPLITS)}, not {unknown}")
    config = ShapesConfig(split="heldout", heldout=heldout, jitter=jitter)  # validates heldout and jitter
    sets = {}
    for split, n in counts.items():
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"the count of split {split!r} must be an int >= 0, got {n!r}")
        if n == 0:
            continue
        rng = random.Random(f"balanced/{seed}/{split}")
        sets[split] = _split_scenes(split, n, rng, config.heldout, config.jitter)
    return sets


# ----------------------------------------------------------------------------------------------------
# judging


def judge_scene(judgement: Judgement, meta: dict) -> dict[str, bool]:
    """Which of the attributes ``meta`` names the judged image has right, and ``all`` of them.

    Single objects: ``colour``, ``shape``, and ``size`` / ``position`` where named (the largest judged object
    is the object) and ``object`` (colour and shape both right). Pairs: ``objects`` (both colour-shape objects
    found), ``shapes`` (both shapes found, whatever their colours), ``relation`` (found, and standing as the caption
    says), ``all`` (the same as ``relation``). Count scenes: ``count``, ``colour``, ``shape``, ``all``
    (:func:`unclip.eval.judge.pair_checks`, :func:`unclip.eval.judge.count_checks`).
    """
    if meta["scene"] == "pair":
        return pair_checks(judgement, meta)
    if meta["scene"] == "count":
        return count_checks(judgement, meta)
    target, got = meta["objects"][0], judgement.objects[0] if judgement.objects else None
    result = {"colour": got is not None and got.colour == target["colour"],
              "shape": got is not None and got.shape == target["shape"]}
    if meta.get("named_size", True) and target.get("size"):
        result["size"] = got is not None and got.size == target["size"]
    if meta.get("named_position", True) and target.get("position"):
        result["position"] = got is not None and got.position == target["position"]
    result["all"] = all(result.values())
    result["object"] = result["colour"] and result["shape"]
    return result


def fidelity_report(judgements: Sequence[Judgement], metas: Sequence[dict], prefix: str = "") -> dict[str, float]:
    """Accuracy per attribute and per attribute value, for one split's judged images and their metas.

    Keys (each prefixed): ``n``; ``<attribute>`` and ``all`` (share right); ``<attribute>=<value>`` (share with
    that attribute right among the scenes whose target has that value) and ``<attribute>=<value>/all`` (all
    right among them), with ``n/<attribute>=<value>``. Single objects: attributes colour, shape, size, position.
    Pairs: objects, shapes, relation, all, and ``relation=<value>``. Count scenes: count, colour, shape, all, and
    ``count=<n>``.
    """
    if len(judgements) != len(metas):
        raise ValueError(f"got {len(judgements)} judgements for {len(metas)} metas")
    right: dict[str, list[bool]] = defaultdict(list)
    for judgement, meta in zip(judgements, metas):
        checks = judge_scene(judgement, meta)
        for attribute, ok in checks.items():
            right[attribute].append(ok)
        if meta["scene"] == "pair":
            values = {"relation": meta["relation"]}
        elif meta["scene"] == "count":
            values = {"count": meta["count"]}
        else:
            values = {a: meta["objects"][0].get(a) for a in SINGLE_ATTRIBUTES}
        for attribute, value in values.items():
            if value is None:
                continue
            key = f"{attribute}={value}"
            right[key].append(checks.get(attribute, checks["all"]))
            right[f"{key}/all"].append(checks["all"])
    report: dict[str, float] = {f"{prefix}n": len(metas)}
    for key, oks in sorted(right.items()):
        report[f"{prefix}{key}"] = sum(oks) / len(oks)
        if "=" in key and not key.endswith("/all"):
            report[f"{prefix}n/{key}"] = len(oks)
    return report


def judge_prompts(images, prompts: Sequence[str], prefix: str = "") -> dict:
    """Judge images made from any prompts: each prompt is read with :func:`unclip.data.shapes.parse_caption`;
    those outside the data set's vocabulary are listed under ``<prefix>out_of_vocabulary`` and not counted."""
    metas = [parse_caption(prompt) for prompt in prompts]
    keep = [i for i, meta in enumerate(metas) if meta is not None]
    report: dict = {f"{prefix}out_of_vocabulary": [prompts[i] for i, m in enumerate(metas) if m is None]}
    if keep:
        judged = judge_batch([images[i] for i in keep])
        report.update(fidelity_report(judged, [metas[i] for i in keep], prefix))
    return report


def format_table(report: dict, splits: Sequence[str] = SPLITS, prefix: str = "") -> str:
    """A short text table of a report's headline numbers, one row per split, then the position and relation values."""
    columns = ("colour", "shape", "size", "position", "objects", "relation", "count", "all")
    lines = ["split         " + "".join(f"{c:>10}" for c in columns) + "         n"]
    for split in splits:
        p = f"{prefix}{split}/"
        if f"{p}n" not in report:
            continue
        cells = "".join(f"{report[p + c]:>10.0%}" if p + c in report else f"{'-':>10}" for c in columns)
        lines.append(f"{split:<14}{cells}{report[p + 'n']:>10}")
    for split, attribute, values in (("val", "position", POSITIONS), ("heldout", "position", POSITIONS),
                                     ("pair", "relation", RELATIONS), ("count", "count", COUNTS),
                                     ("count_heldout", "count", COUNTS)):
        p = f"{prefix}{split}/"
        found = [(v, report[f"{p}{attribute}={v}"]) for v in values if f"{p}{attribute}={v}" in report]
        if found:
            lines.append(f"{split} {attribute}: " + ", ".join(f"{v} {acc:.0%}" for v, acc in found))
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------
# GenEval's categories

# GenEval (Ghosh et al. 2023, djghosh13/geneval): each category the share of images right, the overall score their
# plain mean. Ours are read off the balanced set's report: (category, split, check).
GENEVAL_CATEGORIES = (
    ("single_object", "val", "object"),  # the one object's colour and shape
    ("two_object", "pair", "shapes"),  # both objects present (GenEval: by class, whatever the colours)
    ("counting", "count", "all"),  # exactly the number, every object the named colour and shape
    ("colors", "val", "colour"),
    ("position", "pair", "relation"),
    ("color_attr", "pair", "objects"),  # both colours on the right shapes
)
GENEVAL_TITLES = {"overall": "overall", "single_object": "single object", "two_object": "two objects",
                  "counting": "counting", "colors": "colours", "position": "position",
                  "color_attr": "colour attribution"}
# The published rows (GenEval's paper and DALL-E 3's): natural-image prompts judged by an object detector, another
# domain and another judge than ours; only the overall score is given here where the others are not at hand.
GENEVAL_PUBLISHED = {
    "DALL-E 2": {"overall": 0.52, "single_object": 0.94, "two_object": 0.66, "counting": 0.49, "colors": 0.77,
                 "position": 0.10, "color_attr": 0.19},
    "SD 1.5": {"overall": 0.43},
    "SDXL": {"overall": 0.55},
    "DALL-E 3": {"overall": 0.67},
    "minDALL-E (a DALL-E 1)": {"overall": 0.23},
}


def geneval_scores(report: dict, prefix: str = "") -> dict[str, float]:
    """GenEval's six categories read off a balanced-set report (keys ``<prefix><split>/<check>``, e.g. the demo's
    ``fidelity/val/colour``) and ``overall``, their mean (only when all six are there). A category whose split is
    missing from the report is left out."""
    scores = {name: float(report[f"{prefix}{split}/{check}"]) for name, split, check in GENEVAL_CATEGORIES
              if f"{prefix}{split}/{check}" in report}
    if len(scores) == len(GENEVAL_CATEGORIES):
        scores["overall"] = sum(scores.values()) / len(scores)
    return scores


def geneval_table(scores: dict[str, float], name: str = "this pipeline") -> str:
    """A markdown table of GenEval-style ``scores`` (:func:`geneval_scores`) with the published rows beside."""
    columns = list(GENEVAL_TITLES)

    def row(title: str, values: dict) -> str:
        return "| " + " | ".join([title, *(f"{values[c]:.2f}" if c in values else "" for c in columns)]) + " |"

    lines = ["| model | " + " | ".join(GENEVAL_TITLES[c] for c in columns) + " |", "|---" * (len(columns) + 1) + "|",
             row(f"{name} (shapes, the pixel judge)", scores)]
    lines += [row(f"{model} (published)", values) for model, values in GENEVAL_PUBLISHED.items()]
    lines.append("Published rows: GenEval on natural-image prompts judged by an object detector -- another domain "
                 "and another judge, the same categories.")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------
# whole pipelines


def _in_batches(fn, items: Sequence, batch_size: int, seed: int) -> list:
    out = []
    for start in range(0, len(items), batch_size):
        out += fn(items[start : start + batch_size], seed + start)
    return out


def text_to_image_fidelity(pipe, sets: dict[str, list[Scene]], *, seed: int = 0, batch_size: int = 64,
                           prefix: str = "fidelity/", images_out: dict | None = None, **settings) -> dict:
    """Generate one image per prompt of each split (``pipe.generate``) and report per attribute value; the images
    of each split also land in ``images_out[split]`` where given."""
    report = {}
    for split, scenes in sets.items():
        images = _in_batches(lambda chunk, s: pipe.generate([sc.caption for sc in chunk], seed=s, **settings),
                             scenes, batch_size, seed)
        if images_out is not None:
            images_out[split] = images
        report.update(fidelity_report(judge_batch(images), [sc.meta for sc in scenes], prefix=f"{prefix}{split}/"))
    return report


def variations_fidelity(pipe, sets: dict[str, list[Scene]], *, seed: int = 0, batch_size: int = 64,
                        prefix: str = "fidelity_variations/", **settings) -> dict:
    """Decode the true CLIP image embeddings of each scene's rendered image (no caption, as ``variations``) and
    report per attribute value: what the decoder keeps of what the embedding holds."""
    from unclip.images import from_pil

    size = pipe.clip.space.image_size

    def decode(chunk, s):
        with torch.no_grad():
            embeds = pipe.clip.encode_image(from_pil([sc.render(size) for sc in chunk]).to(pipe.device)).float()
        return pipe.decode(embeds, seed=s, **settings)

    report = {}
    for split, scenes in sets.items():
        images = _in_batches(decode, scenes, batch_size, seed)
        report.update(fidelity_report(judge_batch(images), [sc.meta for sc in scenes], prefix=f"{prefix}{split}/"))
    return report
