"""Text-to-image quality of a whole pipeline: on `shapes` prompts judged from the pixels; on other captioned
data by CLIP against shuffled pairs."""

from __future__ import annotations

import torch

from unclip.eval.clip_retrieval import clip_agreement
from unclip.eval.judge import judge_batch, score
from unclip.images import from_pil


def evaluate_text_to_image(pipe, captions: list[str], metas: list[dict], *, seed: int = 0, batch_size: int = 64,
                           prefix: str = "", **settings) -> dict:
    """Generate one image per caption and judge it against the caption's metadata.

    Keys (prefixed): colour_shape_acc, colour_acc, shape_acc, size_acc / position_acc (where the caption
    named them), pair_acc (both objects and the relation right), and their counts.
    """
    judgements = []
    for start in range(0, len(captions), batch_size):
        images = pipe.generate(captions[start : start + batch_size], seed=seed + start, **settings)
        judgements += judge_batch(from_pil(images))
    result = score(judgements, metas)
    return {f"{prefix}{key}": value for key, value in result.items()}


def _main_object(judgement):
    return (judgement.objects[0].colour, judgement.objects[0].shape) if judgement.objects else None


def _render(colour: str, shape: str, size: int):
    from unclip.data.shapes import POSITIONS, ShapeObject, render

    return render([ShapeObject(colour, shape, "large", "centre", POSITIONS["centre"])], size)


def evaluate_edits(pipe, images, metas: list[dict], *, seed: int = 0, **settings) -> dict:
    """Variations, interpolation and text diffs, judged from the pixels.

    * ``variations_keep_colour_shape``: share of variations (2 per source image) with the source's colour and
      shape; ``variations_differ``: share of sources whose two variations are not identical;
    * ``interpolate_ends_right``: a red circle -> blue square interpolation starts as the red circle and ends
      as the blue square (1 or 0), with ``interpolate_frames`` the judged (colour, shape) of every frame;
    * ``text_diff_<amount>_blue_circle``: share of red circles (of the given images' sizes and places: the
      red circle is re-rendered) that a diff from "a red circle" to "a blue circle" turns into a blue circle.
    """
    import numpy as np

    size = pipe.clip.space.image_size
    keep, differ, total = 0, 0, 0
    for i, (image, meta) in enumerate(zip(images, metas)):
        target = (meta["objects"][0]["colour"], meta["objects"][0]["shape"])
        variations = pipe.variations(image, n=2, seed=seed + i, **settings)
        judged = judge_batch(from_pil(variations))
        keep += sum(_main_object(j) == target for j in judged)
        total += len(judged)
        differ += not np.array_equal(np.asarray(variations[0]), np.asarray(variations[1]))
    metrics = {"variations_keep_colour_shape": keep / max(total, 1), "variations_differ": differ / max(len(images), 1)}
    frames = pipe.interpolate(_render("red", "circle", size), _render("blue", "square", size), steps=5, seed=seed, **settings)
    judged = [_main_object(j) for j in judge_batch(from_pil(frames))]
    metrics["interpolate_ends_right"] = float(judged[0] == ("red", "circle") and judged[-1] == ("blue", "square"))
    metrics["interpolate_frames"] = [" ".join(j) if j else "nothing" for j in judged]
    amounts = (0.25, 0.5, 0.75)
    hits = {a: 0 for a in amounts}
    sources = 8
    for i in range(sources):
        edits = pipe.text_diff(_render("red", "circle", size), "a red circle", "a blue circle", amounts=amounts,
                               seed=seed + i, **settings)
        for amount, j in zip(amounts, judge_batch(from_pil(edits))):
            hits[amount] += _main_object(j) == ("blue", "circle")
    for amount in amounts:
        metrics[f"text_diff_{amount:g}_blue_circle"] = hits[amount] / sources
    return metrics


def shapes_prompt_sets(counts: dict[str, int]) -> dict[str, dict]:
    """Evaluation prompts from `shapes`: ``val`` and ``heldout`` single objects, ``pair`` two-object scenes
    (each {"captions", "metas", "images"}), from seeds of their own."""
    from unclip.data.shapes import ShapesDataset

    datasets = {
        "val": ShapesDataset(split="val", length=max(1, counts.get("val", 0)), seed=1),
        "heldout": ShapesDataset(split="heldout", length=max(1, counts.get("heldout", 0)), seed=1),
        "pair": ShapesDataset(split="val", length=max(1, counts.get("pair", 0)), pair_fraction=1.0, seed=2),
    }
    sets = {}
    for name, dataset in datasets.items():
        if counts.get(name, 0) < 1:
            continue
        items = [dataset[i] for i in range(len(dataset))]
        sets[name] = {"captions": [it["caption"] for it in items], "metas": [it["meta"] for it in items],
                      "images": [it["image"] for it in items]}
    return sets


def evaluate_on_shapes(pipe, sets: dict[str, dict], *, seed: int = 0, prefix: str = "", **settings) -> dict:
    """Text-to-image accuracy per prompt set: ``<prefix><set>_<metric>`` (accuracies and counts)."""
    metrics = {}
    for name, prompt_set in sets.items():
        result = evaluate_text_to_image(pipe, prompt_set["captions"], prompt_set["metas"], seed=seed, **settings)
        for key, value in result.items():
            if key.endswith("_acc") or key.startswith("n_"):
                metrics[f"{prefix}{name}_{key}"] = value
    return metrics


def generate_for(pipe, captions: list[str], *, seed: int = 0, **settings) -> torch.Tensor:
    """One image per caption [N, 3, S, S] on the CPU, 64 prompts a call (seeds ``seed + start``)."""
    return torch.cat([
        pipe.generate(captions[i : i + 64], seed=seed + i, output="tensor", **settings).float().cpu()
        for i in range(0, len(captions), 64)
    ])


def evaluate_captions(pipe, captions: list[str], references, *, seed: int = 0, prefix: str = "",
                      generated: torch.Tensor | None = None, **settings) -> dict:
    """Text -> image on any captioned data, judged by the pipeline's CLIP: one image per caption (``generated``
    where the caller made them already, by :func:`generate_for`).

    ``references`` are the data set's real images of those captions ([N, 3, S, S] in [-1, 1]). Metrics
    (see :func:`unclip.eval.clip_retrieval.clip_agreement`): ``image_cosine`` (generated vs real image of the
    caption), ``clip_score`` (generated image vs caption), each beside its ``shuffled_*`` baseline.
    """
    if generated is None:
        generated = generate_for(pipe, captions, seed=seed, **settings)
    with pipe.autocast():
        metrics = clip_agreement(pipe.clip, generated, references.float(), captions, seed=seed)
    return {f"{prefix}{key}": value for key, value in metrics.items()}
