"""The pixel judge reads shapes images back: clean, degraded, and nothing where there is nothing."""

import random

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from unclip.data.shapes import (
    COLOURS,
    CORNERS,
    SHAPES,
    ShapeObject,
    ShapesDataset,
    collate,
    count_objects,
    generate_item,
    render,
)
from unclip.eval.judge import JudgedObject, Judgement, count_checks, judge, judge_batch, label_components, score

ATTRIBUTE_METRICS = ("colour_acc", "shape_acc", "colour_shape_acc", "size_acc", "position_acc", "pair_acc",
                     "count_acc")


def items(split, n, size, start=0):
    return [generate_item(i, split=split, image_size=size, pair_fraction=0.3) for i in range(start, start + n)]


def accuracies(images, metas):
    return score(judge_batch(images), metas)


@pytest.mark.parametrize("split", ["train", "val", "heldout"])
def test_clean_renders_are_read_back_exactly(split):
    batch = items(split, 210, 64)
    result = accuracies([item.image for item in batch], [item.meta for item in batch])
    assert result["n_pair"] > 30 and result["n_named_size"] > 50 and result["n_named_position"] > 50
    for metric in ATTRIBUTE_METRICS:
        assert result[metric] >= 0.99, (metric, result)


@pytest.mark.parametrize("size, n", [(16, 40), (32, 40), (128, 16), (256, 4)])
def test_any_image_size(size, n):
    batch = items("train", n, size) + items("heldout", n, size)
    result = accuracies([item.image for item in batch], [item.meta for item in batch])
    for metric in ATTRIBUTE_METRICS:
        assert result[metric] >= 0.99, (metric, result)


def gaussian_blur(image, rng):
    return image.filter(ImageFilter.GaussianBlur(radius=1))


def additive_noise(image, rng, std=0.1):  # std in the library's [-1, 1] units
    pixels = np.asarray(image, np.float32) / 127.5 - 1 + rng.normal(0, std, (image.height, image.width, 3))
    return Image.fromarray(np.rint((np.clip(pixels, -1, 1) + 1) * 127.5).astype(np.uint8))


def colour_shift(image, rng):
    shifted = np.asarray(image, np.float32) + rng.uniform(-15, 15, 3)
    return Image.fromarray(np.clip(np.rint(shifted), 0, 255).astype(np.uint8))


def grey_speckle(image, rng, fraction=0.05):
    pixels = np.array(image)
    hit = rng.random(pixels.shape[:2]) < fraction
    pixels[hit] = rng.integers(40, 220, (hit.sum(), 1))
    return Image.fromarray(pixels)


def everything(image, rng):
    return grey_speckle(colour_shift(additive_noise(gaussian_blur(image, rng), rng), rng), rng, 0.02)


@pytest.mark.parametrize("degrade", [gaussian_blur, additive_noise, colour_shift, grey_speckle, everything])
def test_degraded_renders(degrade):
    rng = np.random.default_rng(0)
    batch = items("train", 70, 64, start=1000) + items("heldout", 70, 64, start=1000)
    result = accuracies([degrade(item.image, rng) for item in batch], [item.meta for item in batch])
    for metric in ATTRIBUTE_METRICS:
        assert result[metric] >= 0.95, (degrade.__name__, metric, result)


def blank_and_noise_images(size, generator):
    yield "white", Image.new("RGB", (size, size), "white")
    for level in (0, 60, 128, 200, 240):
        yield f"grey {level}", Image.new("RGB", (size, size), (level, level, level))
    yield "uniform noise", Image.fromarray(np.random.default_rng(size).integers(0, 256, (size, size, 3), np.uint8))
    yield "gaussian noise", torch.randn(3, size, size, generator=generator).clamp(-1, 1)
    yield "weak noise", (0.3 * torch.randn(3, size, size, generator=generator)).clamp(-1, 1)
    yield "noisy white", (1 - 0.1 * torch.randn(3, size, size, generator=generator).abs())
    smooth = torch.randn(1, 3, size // 8, size // 8, generator=generator)
    yield "smooth noise", torch.nn.functional.interpolate(smooth, size=(size, size), mode="bilinear")[0].clamp(-1, 1)


@pytest.mark.parametrize("size", [16, 64, 256])
def test_nothing_is_found_where_nothing_is(size):
    generator = torch.Generator().manual_seed(size)
    for _ in range(3 if size < 256 else 1):
        for name, image in blank_and_noise_images(size, generator):
            judgement = judge(image)
            assert judgement.objects == [] and judgement.relation is None, (name, judgement)


def test_pairs_relation():
    left = ShapeObject("red", "circle", "small", "left", (0.26, 0.48))
    right = ShapeObject("blue", "square", "small", "right", (0.74, 0.52))
    judgement = judge(render([left, right], 64))
    first, second = judgement.objects
    assert {(first.colour, first.shape), (second.colour, second.shape)} == {("red", "circle"), ("blue", "square")}
    assert judgement.relation == ("left of" if first.colour == "red" else "right of")
    top = ShapeObject("green", "triangle", "small", "top", (0.5, 0.25))
    bottom = ShapeObject("pink", "diamond", "small", "bottom", (0.5, 0.75))
    judgement = judge(render([bottom, top], 32))
    assert judgement.relation == ("above" if judgement.objects[0].colour == "green" else "below")


def test_several_components_largest_first():
    big = ShapeObject("red", "circle", "large", "centre", (0.5, 0.5))
    speck = ShapeObject("blue", "square", "small", "top", (0.86, 0.14))  # off the grid, clear of the circle
    judgement = judge(render([speck, big], 64))
    assert judgement.count == 2
    assert (judgement.objects[0].colour, judgement.objects[0].shape, judgement.objects[0].size) == (
        "red", "circle", "large")
    assert judgement.objects[0].position == "centre"
    assert judgement.objects[0].centre == pytest.approx((0.5, 0.5), abs=0.5 / 64)
    assert judgement.objects[0].side == pytest.approx(0.5, abs=1.5 / 64)
    meta = {"scene": "single", "objects": [big.to_meta()], "relation": None, "named_size": True,
            "named_position": True}
    result = score([judgement], [meta])
    assert result["colour_shape_acc"] == 1.0 and result["count_acc"] == 0.0 and result["mean_objects"] == 2


def test_tensor_and_pil_inputs_agree():
    dataset = ShapesDataset("heldout", length=8, image_size=32, pair_fraction=0.5)
    batch = collate([dataset[i] for i in range(8)])
    from_tensors = judge_batch(batch["image"])
    from_bf16 = judge_batch(batch["image"].to(torch.bfloat16))
    from_pil = judge_batch([generate_item(i, split="heldout", image_size=32, pair_fraction=0.5).image
                            for i in range(8)])
    assert from_tensors == from_pil
    assert [[(o.colour, o.shape, o.size, o.position) for o in j.objects] for j in from_bf16] == [
        [(o.colour, o.shape, o.size, o.position) for o in j.objects] for j in from_pil]
    with pytest.raises(ValueError, match=r"\[3, H, W\]"):
        judge(torch.zeros(1, 32, 32))


def obj(colour, shape, size="small", position="centre", centre=(0.5, 0.5)):
    return JudgedObject(colour, shape, size, position, centre)


def test_score_counts_what_the_captions_named():
    def single(colour, shape, size, position, named_size, named_position):
        return {"scene": "single", "relation": None, "named_size": named_size, "named_position": named_position,
                "objects": [{"colour": colour, "shape": shape, "size": size, "position": position,
                             "centre": [0.5, 0.5]}]}

    metas = [
        single("red", "circle", "small", "left", True, True),
        single("blue", "square", "large", "centre", True, False),
        single("green", "triangle", "small", "top", False, True),
        single("pink", "diamond", "small", "bottom", False, False),
    ]
    judgements = [
        Judgement([obj("red", "circle", "small", "left")], None),  # all right
        Judgement([obj("blue", "circle", "small", "centre")], None),  # wrong shape and size
        Judgement([obj("green", "triangle", "small", "right")], None),  # wrong position
        Judgement([], None),  # nothing drawn
    ]
    result = score(judgements, metas)
    assert result["n_single"] == 4 and result["n_named_size"] == 2 and result["n_named_position"] == 2
    assert result["colour_acc"] == 0.75 and result["shape_acc"] == 0.5 and result["colour_shape_acc"] == 0.5
    assert result["size_acc"] == 0.5 and result["position_acc"] == 0.5
    assert result["count_acc"] == 0.75
    assert "pair_acc" not in result and result["n_pair"] == 0


def test_score_pairs_need_both_objects_and_the_relation():
    meta = {"scene": "pair", "relation": "left of", "named_size": False, "named_position": False, "objects": [
        {"colour": "red", "shape": "circle", "size": "small", "position": "left", "centre": [0.25, 0.5]},
        {"colour": "blue", "shape": "square", "size": "small", "position": "right", "centre": [0.75, 0.5]}]}
    red_left, blue_right = obj("red", "circle", centre=(0.25, 0.5)), obj("blue", "square", centre=(0.75, 0.5))
    red_right, blue_left = obj("red", "circle", centre=(0.75, 0.5)), obj("blue", "square", centre=(0.25, 0.5))
    judgements = [
        Judgement([blue_right, red_left], "right of"),  # right, whatever the judge's order
        Judgement([red_right, blue_left], "right of"),  # objects right, relation swapped
        Judgement([red_left, obj("blue", "circle", centre=(0.75, 0.5))], "left of"),  # a wrong shape
        Judgement([red_left], None),  # one missing
    ]
    result = score(judgements, [meta] * 4)
    assert result["n_pair"] == 4 and result["pair_objects_acc"] == 0.5 and result["pair_acc"] == 0.25
    assert "colour_acc" not in result
    with pytest.raises(ValueError, match="3 judgements for 4 metas"):
        score(judgements[:3], [meta] * 4)


def test_label_components_matches_flood_fill():
    rng = np.random.default_rng(0)
    for density in (0.2, 0.45, 0.6):
        mask = rng.random((23, 31)) < density
        labels, count = label_components(mask)
        # reference: flood fill with 8-connectivity
        reference = np.zeros(mask.shape, int)
        current = 0
        for start in zip(*np.nonzero(mask)):
            if reference[start]:
                continue
            current += 1
            stack = [start]
            reference[start] = current
            while stack:
                y, x = stack.pop()
                for dy in (-1, 0, 1):
                    for dx in (-1, 0, 1):
                        ny, nx = y + dy, x + dx
                        if 0 <= ny < 23 and 0 <= nx < 31 and mask[ny, nx] and not reference[ny, nx]:
                            reference[ny, nx] = current
                            stack.append((ny, nx))
        assert count == current
        assert ((labels > 0) == mask).all()
        # the same partition: labels map one-to-one onto the reference's
        pairs = set(zip(labels[mask].tolist(), reference[mask].tolist()))
        assert len(pairs) == count


def test_every_colour_and_shape_is_recognised_small_at_16px():
    for colour in COLOURS:
        for shape in ("circle", "square", "triangle", "diamond"):
            judgement = judge(render([ShapeObject(colour, shape, "small", "right", (0.77, 0.48))], 16))
            assert [(o.colour, o.shape, o.size, o.position) for o in judgement.objects] == [
                (colour, shape, "small", "right")]


@pytest.mark.parametrize("size", [32, 64])
def test_every_rendered_count_scene_is_counted_right(size):
    """Every colour, shape and number (2, 3, 4), at corners drawn at random with the jitter: exactly the number, each
    object the colour and shape; the data set's own count scenes too."""
    rng = random.Random(f"count-conformance/{size}")
    judgements, metas = [], []
    for colour in COLOURS:
        for shape in SHAPES:
            for n in (2, 3, 4):
                objects = count_objects(rng, colour, shape, n, jitter=0.03)
                judgements.append(judge(render(objects, size)))
                metas.append({"scene": "count", "objects": [o.to_meta() for o in objects], "count": n})
    for item in (generate_item(i, split=split, image_size=size, count_fraction=1.0)
                 for split in ("train", "heldout") for i in range(12)):
        judgements.append(judge(item.image))
        metas.append(item.meta)
    for judgement, meta in zip(judgements, metas):
        assert count_checks(judgement, meta) == {"count": True, "colour": True, "shape": True, "all": True}, meta
    result = score(judgements, metas)
    assert result["n_count"] == len(metas) == 8 * 4 * 3 + 24 and result["count_scene_acc"] == 1.0
    assert "colour_acc" not in result


def test_count_checks_need_the_number_and_every_object_right():
    meta = {"scene": "count", "count": 3, "objects": [{"colour": "red", "shape": "circle"}] * 3}
    red = [obj("red", "circle", centre=CORNERS[c]) for c in CORNERS]
    cases = [
        (Judgement(red[:3], None), {"count": True, "colour": True, "shape": True, "all": True}),
        (Judgement(red, None), {"count": False, "colour": True, "shape": True, "all": False}),  # one too many
        (Judgement(red[:2], None), {"count": False, "colour": True, "shape": True, "all": False}),  # one too few
        (Judgement(red[:2] + [obj("blue", "circle")], None), {"count": True, "colour": False, "shape": True,
                                                               "all": False}),
        (Judgement(red[:2] + [obj("red", "square")], None), {"count": True, "colour": True, "shape": False,
                                                              "all": False}),
        (Judgement([], None), {"count": False, "colour": False, "shape": False, "all": False}),
    ]
    for judgement, expected in cases:
        assert count_checks(judgement, meta) == expected
    result = score([j for j, _ in cases], [meta] * len(cases))
    assert result["n_count"] == 6 and result["count_scene_acc"] == 1 / 6 and result["count_acc"] == 3 / 6
