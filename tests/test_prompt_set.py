"""The balanced prompt set, the caption parser and shapes' hard-negative twins."""

from collections import Counter

import pytest
import torch

from unclip.data.shapes import (
    DEFAULT_HELDOUT,
    POSITIONS,
    RELATIONS,
    ShapeObject,
    ShapesDataset,
    generate_item,
    parse_caption,
    render,
)
from unclip.eval.judge import judge, judge_batch
from unclip.eval.prompt_set import balanced_scenes, fidelity_report, format_table, judge_prompts


@pytest.mark.parametrize("split", ["train", "val", "heldout"])
def test_parse_caption_reads_back_every_attribute_a_generated_caption_names(split):
    for i in range(400):
        item = generate_item(i, split=split, pair_fraction=0.3)
        parsed = parse_caption(item.caption)
        assert parsed is not None, item.caption
        meta = item.meta
        assert (parsed["scene"], parsed["relation"]) == (meta["scene"], meta["relation"])
        assert (parsed["named_size"], parsed["named_position"]) == (meta["named_size"], meta["named_position"])
        for got, want in zip(parsed["objects"], meta["objects"], strict=True):
            assert (got["colour"], got["shape"]) == (want["colour"], want["shape"])
            if meta["named_size"] or meta["scene"] == "pair":
                assert got["size"] == want["size"]
            if meta["named_position"] or meta["scene"] == "pair":
                assert got["position"] == want["position"]


@pytest.mark.parametrize("caption", ["a violet hexagon", "a red circle and a blue square", "a large red circle on the left",
                                     "a red circle to the left of a red square", "a large red circle above a blue square",
                                     "", "   ", "a red circle at the top to the left of a blue square"])
def test_parse_caption_refuses_what_the_data_set_cannot_draw(caption):
    assert parse_caption(caption) is None


def test_parse_caption_is_lenient_about_case_spacing_and_a_full_stop():
    parsed = parse_caption("  A Small  RED circle At the Top.")
    assert parsed["objects"] == [{"colour": "red", "shape": "circle", "size": "small", "position": "top"}]
    assert parse_caption("a red circle at the top")["objects"][0]["size"] == "small"  # only small objects stand off-centre


def test_balanced_set_gives_every_value_its_share_and_is_a_function_of_the_seed():
    sets = balanced_scenes()
    val, heldout, pair = sets["val"], sets["heldout"], sets["pair"]
    cells = Counter((s.meta["objects"][0]["colour"], s.meta["objects"][0]["shape"], s.meta["objects"][0]["size"],
                     s.meta["objects"][0]["position"]) for s in val)
    assert len(val) == 168 and len(cells) == 168  # every composition in every size-position cell, once
    positions = Counter(s.meta["objects"][0]["position"] for s in val)
    assert positions == {"centre": 56, **{p: 28 for p in POSITIONS if p != "centre"}}
    assert {(o["colour"], o["shape"]) for s in heldout for o in s.meta["objects"]} == set(DEFAULT_HELDOUT)
    assert all(not {(o["colour"], o["shape"]) for o in s.meta["objects"]} & set(DEFAULT_HELDOUT) for s in val + pair)
    assert Counter(s.meta["relation"] for s in pair) == {r: 16 for r in RELATIONS}
    for scene in val + heldout:  # every single-object prompt names size and position
        assert parse_caption(scene.caption)["objects"][0]["position"] == scene.meta["objects"][0]["position"]
    assert [s.caption for s in balanced_scenes(seed=0)["pair"]] == [s.caption for s in pair]
    assert [s.caption for s in balanced_scenes(seed=1)["pair"]] != [s.caption for s in pair]
    with pytest.raises(ValueError, match="'train'"):
        balanced_scenes({"train": 4})


@pytest.mark.parametrize("n", [12, 20, 50])
def test_a_smaller_balanced_set_still_gives_every_cell_its_share(n):
    scenes = balanced_scenes({"val": n, "heldout": n})
    for split in ("val", "heldout"):
        cells = Counter((s.meta["objects"][0]["size"], s.meta["objects"][0]["position"]) for s in scenes[split])
        assert len(cells) == 6 and max(cells.values()) - min(cells.values()) <= 1, cells


def test_report_per_value_counts_right_and_wrong_images():
    scenes = balanced_scenes({"val": 12, "pair": 8})
    val = scenes["val"]
    images = [s.render(32) for s in val]
    top = next(i for i, s in enumerate(val) if s.meta["objects"][0]["position"] == "top")
    obj = val[top].objects[0]
    images[top] = render([ShapeObject(obj.colour, obj.shape, "small", "bottom", POSITIONS["bottom"])], 32)
    report = fidelity_report(judge_batch(images), [s.meta for s in val], prefix="val/")
    assert report["val/n"] == 12 and report["val/colour"] == 1.0 and report["val/position"] == 11 / 12
    n_top = report["val/n/position=top"]
    assert report["val/position=top"] == (n_top - 1) / n_top and report["val/position=top/all"] == (n_top - 1) / n_top
    assert report["val/position=left"] == 1.0
    pairs = scenes["pair"]
    swapped = [render(list(reversed([ShapeObject(o.colour, o.shape, o.size, o.position, o.centre) for o in s.objects])), 32)
               for s in pairs]  # the same image: drawing order does not matter
    pair_report = fidelity_report(judge_batch(swapped), [s.meta for s in pairs], prefix="pair/")
    assert pair_report["pair/all"] == 1.0 and pair_report["pair/relation=above"] == 1.0
    table = format_table({**report, **pair_report})
    assert "val" in table and "pair relation: left of 100%" in table


def test_prompts_outside_the_vocabulary_are_listed_not_counted():
    prompts = ["a violet hexagon", "a small red circle at the top"]
    images = [render([ShapeObject("red", "circle", "small", "top", POSITIONS["top"])], 32)] * 2
    report = judge_prompts(images, prompts)
    assert report["out_of_vocabulary"] == ["a violet hexagon"]
    assert report["n"] == 1 and report["all"] == 1.0


def test_twins_change_one_named_attribute_within_the_split_and_leave_items_unchanged():
    plain = ShapesDataset(split="train", length=200, pair_fraction=0.3)
    twins = ShapesDataset(split="train", length=200, pair_fraction=0.3, twins=True)
    kinds = Counter()
    for i in range(200):
        item, twin = plain[i], twins[i]
        assert torch.equal(item["image"], twin["image"]) and item["caption"] == twin["caption"]
        said, shown = parse_caption(twin["twin_caption"]), judge(twin["twin_image"])
        assert said is not None and twin["twin_caption"] != item["caption"]
        for obj in said["objects"]:
            assert (obj["colour"], obj["shape"]) not in DEFAULT_HELDOUT
        original = parse_caption(item["caption"])
        if said["scene"] == "pair":
            found = {(o.colour, o.shape, o.position) for o in shown.objects}
            assert found == {(o["colour"], o["shape"], o["position"]) for o in said["objects"]}
            kinds["relation" if said["relation"] != original["relation"] else "binding"] += 1
        else:
            got, want = shown.objects[0], said["objects"][0]
            assert (got.colour, got.shape) == (want["colour"], want["shape"])
            before = original["objects"][0]
            changed = [k for k in ("colour", "shape", "size", "position")
                       if None not in (want[k], before[k]) and want[k] != before[k]]
            assert len(changed) == 1, (item["caption"], twin["twin_caption"])
            kinds[changed[0]] += 1
    assert set(kinds) == {"relation", "binding", "colour", "shape", "size", "position"}


def test_contrastive_loss_contrasts_the_twins_too(micro_clip):
    from unclip.clip import ContrastiveLoss

    data = ShapesDataset(split="train", length=8, image_size=32, pair_fraction=0.3, twins=True)
    batch = {key: [data[i][key] for i in range(4)] for key in ("image", "caption", "twin_image", "twin_caption")}
    batch["image"], batch["twin_image"] = torch.stack(batch["image"]), torch.stack(batch["twin_image"])
    with_twins = ContrastiveLoss()(micro_clip, batch)["loss"]
    merged = {"image": torch.cat([batch["image"], batch["twin_image"]]),
              "caption": batch["caption"] + batch["twin_caption"]}
    assert torch.allclose(with_twins, ContrastiveLoss()(micro_clip, merged)["loss"])
    alone = ContrastiveLoss()(micro_clip, {"image": batch["image"], "caption": batch["caption"]})["loss"]
    assert not torch.allclose(with_twins, alone)


def test_name_probability_changes_only_how_often_captions_name_size_and_position():
    default = ShapesDataset(split="train", length=300, pair_fraction=0.2)
    named = ShapesDataset(split="train", length=300, pair_fraction=0.2, name_probability=0.9)
    never = ShapesDataset(split="train", length=50, name_probability=0.0)
    share = {}
    for name, data in (("default", default), ("named", named)):
        metas = [data[i]["meta"] for i in range(300)]
        share[name] = sum(m["named_position"] for m in metas if m["scene"] == "single") / sum(
            m["scene"] == "single" for m in metas)
    assert 0.5 < share["default"] < 0.7 and share["named"] > 0.85
    for i in range(300):
        a, b = default[i], named[i]
        assert torch.equal(a["image"], b["image"])  # the same scenes, only the captions say more
        assert (parse_caption(a["caption"])["objects"][0]["colour"] == parse_caption(b["caption"])["objects"][0]["colour"])
    assert not any(never[i]["meta"]["named_position"] or never[i]["meta"]["named_size"] for i in range(50))
    with pytest.raises(ValueError, match=r"name_probability must be in \[0, 1\], got 1.5"):
        ShapesDataset(name_probability=1.5)
