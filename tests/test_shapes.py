"""The shapes generator keeps to docs/data.md: geometry, palette, splits, captions, determinism."""

import hashlib
import json
import re
import time
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from unclip.data.shapes import (
    COLOURS,
    DEFAULT_HELDOUT,
    POSITIONS,
    SHAPES,
    SIZES,
    ShapeObject,
    ShapesDataset,
    class_prompts,
    collate,
    generate_item,
    parse_caption,
    render,
    write_folder,
)

SIDE = {"small": 0.25, "large": 0.5}
POSITION_WORDS = {
    "centre": ("in the centre", "in the middle", "in the center"),
    "left": ("on the left", "on the left side"),
    "right": ("on the right", "on the right side"),
    "top": ("at the top", "in the upper part"),
    "bottom": ("at the bottom", "in the lower part"),
}
RELATION_WORDS = {"left of": "to the left of", "right of": "to the right of", "above": "above", "below": "below"}


def inside(shape, dx, dy, half):
    """docs/data.md's geometry, written out independently: is (dx, dy) from the bbox centre inside?"""
    if shape == "square":
        return (np.abs(dx) <= half) & (np.abs(dy) <= half)
    if shape == "circle":
        return dx**2 + dy**2 <= half**2
    if shape == "diamond":  # corners at top/bottom/left/right
        return np.abs(dx) + np.abs(dy) <= half
    # upright isosceles triangle, apex top centre, flat base at the bottom, width = height
    return (dy <= half) & (np.abs(dx) <= (dy + half) / 2)


def pixel_classes(obj, size, margin=0.3, k=7):
    """Per pixel: +1 where the pixel (grown by ``margin``) is entirely inside the shape, -1 entirely
    outside, 0 on the edge. Sampled on a k x k grid including the corners of the grown pixel."""
    cx, cy = obj.centre[0] * size, obj.centre[1] * size
    half = SIDE[obj.size] * size / 2
    ticks = np.linspace(-margin, 1 + margin, k)
    px = np.arange(size)[:, None] + ticks  # [size, k]
    dx = px[None, :, None, :] - cx  # [1, W, 1, k]
    dy = px[:, None, :, None] - cy  # [H, 1, k, 1]
    hit = inside(obj.shape, dx, dy, half)  # [H, W, k, k]
    return np.where(hit.all((2, 3)), 1, np.where(hit.any((2, 3)), 0, -1))


def object_list(meta):
    return [ShapeObject(o["colour"], o["shape"], o["size"], o["position"], tuple(o["centre"])) for o in meta["objects"]]


def test_palette_and_vocabulary_are_shapes_md():
    assert list(COLOURS.items()) == [
        ("red", (220, 40, 40)), ("orange", (245, 140, 20)), ("yellow", (235, 200, 20)), ("green", (40, 160, 60)),
        ("cyan", (20, 190, 200)), ("blue", (40, 70, 220)), ("purple", (140, 50, 190)), ("pink", (245, 120, 190)),
    ]
    assert SHAPES == ("circle", "square", "triangle", "diamond")
    assert SIZES == ("small", "large")
    assert POSITIONS == {"centre": (0.5, 0.5), "left": (0.25, 0.5), "right": (0.75, 0.5),
                         "top": (0.5, 0.25), "bottom": (0.5, 0.75)}
    assert set(DEFAULT_HELDOUT) == {("purple", "triangle"), ("orange", "circle"), ("cyan", "square"),
                                    ("pink", "diamond")}


@pytest.mark.parametrize("size", [16, 40, 64])
def test_render_is_exact_geometry_anti_aliased(size):
    """Pixels wholly inside a shape are exactly the palette colour, wholly outside exactly white,
    and the edge is anti-aliased (intermediate values)."""
    rng = np.random.default_rng(size)
    for shape in SHAPES:
        for obj_size, position in [("large", "centre")] + [("small", p) for p in POSITIONS]:
            jitter = rng.uniform(-0.03, 0.03, 2)
            centre = (POSITIONS[position][0] + jitter[0], POSITIONS[position][1] + jitter[1])
            colour = list(COLOURS)[rng.integers(len(COLOURS))]
            obj = ShapeObject(colour, shape, obj_size, position, centre)
            image = np.asarray(render([obj], size)).astype(int)
            classes = pixel_classes(obj, size)
            assert (image[classes == 1] == COLOURS[colour]).all(), (shape, obj_size, position)
            assert (image[classes == -1] == 255).all(), (shape, obj_size, position)
            edge = image[classes == 0]
            mixed = ~((edge == 255).all(-1) | (edge == COLOURS[colour]).all(-1))
            assert mixed.sum() >= size // 16, "the edge is not anti-aliased"


def test_items_match_their_meta():
    """Across splits, sizes and scenes: centre pixel, bbox, border, background, large only at centre."""
    checked = 0
    for size in (16, 24, 32, 64, 128):
        for split in ("train", "val", "heldout"):
            for index in range(40 if size <= 64 else 8):
                item = generate_item(index, split=split, image_size=size, pair_fraction=0.4)
                image = np.asarray(item.image).astype(int)
                assert item.image.size == (size, size) and item.image.mode == "RGB"
                border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])
                assert (border == 255).all()
                claimed = np.zeros((size, size), bool)
                for obj in item.meta["objects"]:
                    side = SIDE[obj["size"]] * size
                    cx, cy = obj["centre"][0] * size, obj["centre"][1] * size
                    assert abs(obj["centre"][0] - POSITIONS[obj["position"]][0]) <= 0.03 + 1e-9
                    assert abs(obj["centre"][1] - POSITIONS[obj["position"]][1]) <= 0.03 + 1e-9
                    if obj["size"] == "large":
                        assert obj["position"] == "centre"
                    if size >= 24:  # the pixel at the shape's centroid is exactly the palette colour
                        y = cy + side / 6 if obj["shape"] == "triangle" else cy
                        assert tuple(image[int(y), int(cx)]) == COLOURS[obj["colour"]], item.meta
                    # the non-white pixels around this object span its bbox (side, centre) to ~1 px
                    y0, y1 = max(0, int(cy - side / 2) - 2), int(cy + side / 2) + 3
                    x0, x1 = max(0, int(cx - side / 2) - 2), int(cx + side / 2) + 3
                    ys, xs = np.nonzero((image[y0:y1, x0:x1] != 255).any(-1))
                    width, height = xs.max() - xs.min() + 1, ys.max() - ys.min() + 1
                    assert abs(width - side) <= 2 and abs(height - side) <= 2, (item.meta, width, height)
                    assert abs(x0 + (xs.min() + xs.max() + 1) / 2 - cx) <= 1
                    assert abs(y0 + (ys.min() + ys.max() + 1) / 2 - cy) <= 1
                    claimed[y0:y1, x0:x1] = True
                assert (image[~claimed] == 255).all(), "the background must be exactly white"
                checked += 1
    assert checked > 400


def collect_metas(split, n, **kwargs):
    return [generate_item(i, split=split, **kwargs).meta for i in range(n)]


def test_heldout_pairs_only_in_heldout_split():
    heldout = set(DEFAULT_HELDOUT)
    seen_train = set()
    for split in ("train", "val"):
        for meta in collect_metas(split, 600, image_size=16, pair_fraction=0.5):
            for obj in meta["objects"]:
                assert (obj["colour"], obj["shape"]) not in heldout, (split, meta)
                seen_train.add((obj["colour"], obj["shape"]))
    assert len(seen_train) == 32 - len(heldout)  # every other combination does occur
    seen_heldout = set()
    for meta in collect_metas("heldout", 300, image_size=16, pair_fraction=0.5):
        for obj in meta["objects"]:
            assert (obj["colour"], obj["shape"]) in heldout, meta
            seen_heldout.add((obj["colour"], obj["shape"]))
    assert seen_heldout == heldout


def test_custom_heldout_list_and_its_validation():
    custom = [["red", "circle"], ["blue", "square"]]  # lists, as from a YAML config
    for meta in collect_metas("train", 300, image_size=16, pair_fraction=0.3, heldout=custom):
        assert all((o["colour"], o["shape"]) not in {("red", "circle"), ("blue", "square")} for o in meta["objects"])
    found = {(o["colour"], o["shape"]) for m in collect_metas("heldout", 60, image_size=16, heldout=custom)
             for o in m["objects"]}
    assert found == {("red", "circle"), ("blue", "square")}
    with pytest.raises(ValueError, match="mauve"):
        ShapesDataset(heldout=[("mauve", "circle")])
    with pytest.raises(ValueError, match="hexagon"):
        generate_item(0, heldout=[("red", "hexagon")])
    with pytest.raises(ValueError, match="two colours"):  # a pair needs two held-out colours
        ShapesDataset(split="heldout", pair_fraction=0.5, heldout=[("red", "circle"), ("red", "square")])


def test_pair_scenes():
    pairs = [m for m in collect_metas("train", 300, image_size=16, pair_fraction=1.0)]
    assert all(m["scene"] == "pair" for m in pairs)
    relations = set()
    for meta in pairs:
        a, b = meta["objects"]
        assert a["colour"] != b["colour"] and a["size"] == b["size"] == "small"
        assert {a["position"], b["position"]} in ({"left", "right"}, {"top", "bottom"})
        expected = {"left": "left of", "right": "right of", "top": "above", "bottom": "below"}[a["position"]]
        assert meta["relation"] == expected
        relations.add(meta["relation"])
    assert relations == {"left of", "right of", "above", "below"}
    for meta in collect_metas("heldout", 100, image_size=16, pair_fraction=1.0):
        a, b = meta["objects"]
        assert a["colour"] != b["colour"]


def test_captions_name_what_the_meta_says():
    synonyms_used = set()
    for split in ("train", "heldout"):
        for index in range(400):
            item = generate_item(index, split=split, image_size=16, pair_fraction=0.3)
            caption, meta = item.caption, item.meta
            assert caption == caption.lower() and caption == caption.strip() and "  " not in caption
            for article, word in re.findall(r"\b(an?) (\w+)", caption):  # "an orange", "a red"
                assert article == ("an" if word[0] in "aeiou" else "a"), caption
            assert json.loads(json.dumps(meta)) == meta  # JSON-serialisable as is
            for obj in meta["objects"]:
                assert f"{obj['colour']} {obj['shape']}" in caption
                assert (f"{obj['size']} {obj['colour']}" in caption) == meta["named_size"]
            if meta["scene"] == "pair":
                assert meta["named_position"] is False
                first, second = (f"{o['colour']} {o['shape']}" for o in meta["objects"])
                assert f"{first} {RELATION_WORDS[meta['relation']]} " in caption
                assert caption.index(first) < caption.index(second)
            else:
                phrases = [p for p in POSITION_WORDS[meta["objects"][0]["position"]] if caption.endswith(p)]
                assert bool(phrases) == meta["named_position"], caption
                synonyms_used.update(phrases)
    # every synonym of docs/data.md occurs ("on the left" is a suffix of nothing else, so count exactly)
    assert {"in the centre", "in the middle", "in the center", "on the left side", "in the upper part"} <= synonyms_used


def test_determinism_and_disjoint_streams():
    a = generate_item(7, split="train", seed=3, image_size=32, pair_fraction=0.5)
    b = ShapesDataset("train", length=10, image_size=32, pair_fraction=0.5, seed=3)[7]
    c = generate_item(7, split="train", seed=3, image_size=32, pair_fraction=0.5)
    assert a.image.tobytes() == c.image.tobytes() and a.caption == c.caption and a.meta == c.meta
    assert b["caption"] == a.caption and b["meta"] == a.meta
    streams = {}
    for split in ("train", "val"):
        streams[split] = [generate_item(i, split=split, image_size=32).image.tobytes() for i in range(20)]
    streams["seed1"] = [generate_item(i, split="train", seed=1, image_size=32).image.tobytes() for i in range(20)]
    assert sum(x == y for x, y in zip(streams["train"], streams["val"])) <= 2
    assert sum(x == y for x, y in zip(streams["train"], streams["seed1"])) <= 2
    # the single scenes of a stream do not move when pair_fraction changes
    for i in range(20):
        with_pairs = generate_item(i, split="train", image_size=32, pair_fraction=0.3)
        if with_pairs.meta["scene"] == "single":
            assert with_pairs.image.tobytes() == streams["train"][i]


def test_stream_is_pinned():
    """The same items on every machine and every version: changing the stream must be deliberate."""
    digest = hashlib.sha256()
    for split in ("train", "val", "heldout"):
        for i in range(6):
            item = generate_item(i, split=split, image_size=32, pair_fraction=0.5)
            digest.update(item.image.tobytes())
            digest.update(item.caption.encode())
    assert digest.hexdigest() == "cb446a29f82eed0044afd9abbf278ee0f962297ec741cf222e8e16efd89f3d64"


@pytest.mark.parametrize("bad", [0, 8, 12, 15, 20, 264, 512, 64.0, "64", True])
def test_image_size_validation(bad):
    with pytest.raises(ValueError, match=r"16 to 256.*" + repr(bad).replace(".", r"\.")):
        ShapesDataset(image_size=bad)
    with pytest.raises(ValueError, match="16 to 256"):
        generate_item(0, image_size=bad)


@pytest.mark.parametrize("kwargs, word", [({"split": "test"}, "split"), ({"pair_fraction": 1.5}, "pair_fraction"),
                                          ({"jitter": 0.1}, "jitter"), ({"length": 0}, "length")])
def test_config_validation_names_the_field(kwargs, word):
    with pytest.raises(ValueError, match=word):
        ShapesDataset(**kwargs)


def test_dataset_tensors_and_collate():
    dataset = ShapesDataset("val", length=12, image_size=32, pair_fraction=0.5, seed=2)
    assert len(dataset) == 12
    item = dataset[3]
    assert item["image"].shape == (3, 32, 32) and item["image"].dtype == torch.float32
    reference = np.array(generate_item(3, split="val", image_size=32, pair_fraction=0.5, seed=2).image)
    expected = torch.from_numpy(reference).permute(2, 0, 1).float() / 127.5 - 1
    assert torch.equal(item["image"], expected)
    assert item["image"].min() >= -1 and item["image"].max() == 1  # white is exactly 1
    assert torch.equal(dataset[-1]["image"], dataset[11]["image"])
    with pytest.raises(IndexError):
        dataset[12]
    loader = torch.utils.data.DataLoader(dataset, batch_size=5, collate_fn=collate)
    batches = list(loader)
    assert [b["image"].shape[0] for b in batches] == [5, 5, 2]
    assert len(batches[0]["caption"]) == 5 and batches[0]["meta"][3] == dataset[3]["meta"]


def test_write_folder(tmp_path):
    out = write_folder(tmp_path / "shapes", 5, split="heldout", image_size=16, pair_fraction=0.5, seed=4)
    assert sorted(p.name for p in out.iterdir()) == [f"{i:06d}.png" for i in range(5)] + ["captions.jsonl"]
    lines = [json.loads(line) for line in (out / "captions.jsonl").read_text().splitlines()]
    assert [line["file"] for line in lines] == [f"{i:06d}.png" for i in range(5)]
    for i, line in enumerate(lines):
        item = generate_item(i, split="heldout", image_size=16, pair_fraction=0.5, seed=4)
        assert line["caption"] == item.caption and line["meta"] == item.meta
        assert Image.open(out / line["file"]).tobytes() == item.image.tobytes()  # PNG is lossless


def test_class_prompts():
    prompts = class_prompts()
    assert len(prompts) == 32 and len({(c, s) for c, s, _ in prompts}) == 32
    assert ("red", "circle", "a red circle") in prompts
    assert ("orange", "square", "an orange square") in prompts


def test_rendering_is_fast_enough_for_on_the_fly_training():
    dataset = ShapesDataset(length=200, image_size=64, pair_fraction=0.3)
    dataset[0]
    start = time.perf_counter()
    for i in range(200):
        dataset[i]
    per_item = (time.perf_counter() - start) / 200
    assert per_item < 0.01, f"{per_item * 1e3:.2f} ms per 64 px item (target < 1 ms; 10 ms allows a busy machine)"


CORNER_CENTRES = {(0.25, 0.25), (0.75, 0.25), (0.25, 0.75), (0.75, 0.75)}
COUNT_WORDS = {"two": 2, "three": 3, "four": 4, "2": 2, "3": 3, "4": 4}


def test_count_scenes_keep_to_shapes_md():
    seen = {"numbers": set(), "templates": set(), "combos": set()}
    for split in ("train", "val", "heldout"):
        for index in range(150):
            item = generate_item(index, split=split, image_size=32, count_fraction=1.0)
            meta, caption = item.meta, item.caption
            objects = meta["objects"]
            assert meta["scene"] == "count" and meta["count"] == len(objects) and 2 <= len(objects) <= 4
            assert (meta["relation"], meta["named_size"], meta["named_position"]) == (None, False, False)
            assert len({(o["colour"], o["shape"], o["size"]) for o in objects}) == 1 and objects[0]["size"] == "small"
            corners = set()
            for obj in objects:  # distinct corners, jittered by at most 0.03
                corner = min(CORNER_CENTRES, key=lambda c: abs(c[0] - obj["centre"][0]) + abs(c[1] - obj["centre"][1]))
                assert max(abs(corner[0] - obj["centre"][0]), abs(corner[1] - obj["centre"][1])) <= 0.03 + 1e-9
                corners.add(corner)
            assert len(corners) == len(objects)
            heldout = (objects[0]["colour"], objects[0]["shape"]) in DEFAULT_HELDOUT
            assert heldout == (split == "heldout"), (split, caption)
            # "three red circles", "a picture of 2 blue squares", "there are four green triangles": no size, no place
            words = caption.split()
            number = next(w for w in words if w in COUNT_WORDS)
            assert COUNT_WORDS[number] == len(objects)
            assert caption.endswith(f"{number} {objects[0]['colour']} {objects[0]['shape']}s"), caption
            seen["numbers"].add(number)
            seen["templates"].add(caption[: caption.index(number)])
            seen["combos"].add((split, objects[0]["colour"], objects[0]["shape"]))
            image = np.asarray(item.image).astype(int)
            assert (np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]]) == 255).all()
    assert seen["numbers"] == set(COUNT_WORDS) and seen["templates"] == {"", "a picture of ", "there are "}
    assert len(seen["combos"]) == 2 * 28 + 4


def test_count_fraction_leaves_every_other_item_unchanged():
    """With count_fraction=0 the stream is byte for byte the one before count scenes existed (images, captions,
    metas, twins; the hashes were taken from the code of that time), and a count_fraction moves no pair."""
    digest = hashlib.sha256()
    for split in ("train", "val"):
        for pair_fraction in (0.0, 0.2, 0.5):
            data = ShapesDataset(split, length=8, image_size=32, pair_fraction=pair_fraction, twins=True)
            for i in range(8):
                item = data[i]
                digest.update(item["image"].numpy().tobytes())
                digest.update(item["twin_image"].numpy().tobytes())
                digest.update(item["caption"].encode())
                digest.update(item["twin_caption"].encode())
                digest.update(json.dumps(item["meta"], sort_keys=True).encode())
    assert digest.hexdigest() == "1a0902e3978bb86aaaaeede12146488a1163ad430e1499872dd6d1194de43946"
    digest = hashlib.sha256()
    for pair_fraction in (0.0, 0.5):
        data = ShapesDataset("heldout", length=8, image_size=32, pair_fraction=pair_fraction)
        for i in range(8):
            item = data[i]
            digest.update(item["image"].numpy().tobytes())
            digest.update(item["caption"].encode())
            digest.update(json.dumps(item["meta"], sort_keys=True).encode())
    assert digest.hexdigest() == "61e01674c6d7ed70c5974b6774626d463616d55b2c36f58ceb679c60893c9871"
    scenes = set()
    for i in range(60):
        before = generate_item(i, split="val", image_size=16, pair_fraction=0.3)
        after = generate_item(i, split="val", image_size=16, pair_fraction=0.3, count_fraction=0.3)
        scenes.add(after.meta["scene"])
        if after.meta["scene"] != "count":  # pairs stay pairs; singles stay singles
            assert after.image.tobytes() == before.image.tobytes() and after.caption == before.caption
            assert after.meta == before.meta
        else:
            assert before.meta["scene"] == "single"
    assert scenes == {"single", "pair", "count"}


@pytest.mark.parametrize("kwargs, words", [
    ({"count_fraction": 1.5}, ["count_fraction", "1.5"]),
    ({"count_fraction": -0.1}, ["count_fraction", "-0.1"]),
    ({"pair_fraction": 0.6, "count_fraction": 0.5}, ["pair_fraction=0.6", "count_fraction=0.5", "<= 1"]),
])
def test_count_fraction_validation_names_the_values(kwargs, words):
    for make in (lambda: ShapesDataset(**kwargs), lambda: generate_item(0, **kwargs)):
        with pytest.raises(ValueError) as error:
            make()
        for word in words:
            assert word in str(error.value)


@pytest.mark.parametrize("split", ["train", "heldout"])
def test_count_twins_change_the_number_or_the_object_within_the_split(split):
    data = ShapesDataset(split, length=120, image_size=32, count_fraction=1.0, twins=True)
    kinds = Counter()
    for i in range(len(data)):
        item = data[i]
        before, after = parse_caption(item["caption"]), parse_caption(item["twin_caption"])
        assert after is not None and after["scene"] == "count", item["twin_caption"]
        obj, was = after["objects"][0], before["objects"][0]
        assert ((obj["colour"], obj["shape"]) in DEFAULT_HELDOUT) == (split == "heldout")
        changed = [k for k, a, b in (("count", after["count"], before["count"]), ("colour", obj["colour"], was["colour"]),
                                     ("shape", obj["shape"], was["shape"])) if a != b]
        assert len(changed) == 1, (item["caption"], item["twin_caption"])
        kinds[changed[0]] += 1
        twin = np.asarray(item["twin_image"].permute(1, 2, 0))
        assert not torch.equal(item["image"], item["twin_image"]) and (twin[0] == 1).all()  # border stays white
    assert kinds["count"] > kinds["colour"] + kinds["shape"]
    assert set(kinds) == ({"count", "colour", "shape"} if split == "train" else {"count"})


def test_write_folder_takes_count_fraction(tmp_path):
    out = write_folder(tmp_path / "counts", 6, image_size=16, count_fraction=1.0)
    lines = [json.loads(line) for line in (out / "captions.jsonl").read_text().splitlines()]
    assert [line["meta"]["scene"] for line in lines] == ["count"] * 6
    assert all(parse_caption(line["caption"])["count"] == line["meta"]["count"] for line in lines)


def test_a_held_out_single_with_no_possible_twin_is_a_clear_error_not_an_index_error():
    # The held-out split's compositions share no colour or shape: a single whose caption names neither size nor
    # position has nothing its twin could change. Asking for twins there names the caption and the way out.
    dataset = ShapesDataset(split="heldout", length=64, twins=True, image_size=16)
    errors = []
    for i in range(64):
        try:
            dataset[i]
        except ValueError as error:
            errors.append(str(error))
    assert errors and all("no hard-negative twin" in e and "meant for the train split" in e for e in errors)
