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
from unclip.eval.prompt_set import (
    balanced_scenes,
    fidelity_report,
    format_table,
    geneval_scores,
    geneval_table,
    judge_prompts,
)


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


@pytest.mark.parametrize("split", ["train", "heldout"])
def test_parse_caption_reads_count_captions_back(split):
    for i in range(150):
        item = generate_item(i, split=split, pair_fraction=0.2, count_fraction=0.4)
        parsed, meta = parse_caption(item.caption), item.meta
        assert parsed is not None, item.caption
        assert parsed["scene"] == meta["scene"] and parsed.get("count") == meta.get("count")
        assert [(o["colour"], o["shape"]) for o in parsed["objects"]] == [(o["colour"], o["shape"]) for o in meta["objects"]]
    assert parse_caption("There are 3 red circles.")["count"] == 3
    assert parse_caption("a picture of four green triangles")["objects"] == [
        {"colour": "green", "shape": "triangle", "size": "small", "position": None}] * 4


@pytest.mark.parametrize("caption", ["five red circles", "one red circle", "1 red circle", "5 red circles",
                                     "there are ten blue squares", "two red circle", "three violet circles",
                                     "three red circles on the left", "three large red circles"])
def test_parse_caption_refuses_numbers_and_count_scenes_the_data_set_cannot_draw(caption):
    assert parse_caption(caption) is None


def test_the_new_splits_are_balanced_hold_out_what_they_say_and_move_no_old_prompt():
    counts = {"val": 20, "pair": 12, "count": 36, "count_heldout": 24, "pair_heldout": 24, "pair_mixed": 24}
    sets = balanced_scenes(counts, seed=0)
    old = balanced_scenes({"val": 20, "pair": 12}, seed=0)
    for split in ("val", "pair"):  # a split's prompts do not depend on which other splits are asked for
        assert [(s.caption, s.meta) for s in sets[split]] == [(s.caption, s.meta) for s in old[split]]
    heldout = set(DEFAULT_HELDOUT)
    for split in ("count", "count_heldout"):
        assert Counter(s.meta["count"] for s in sets[split]) == {n: counts[split] // 3 for n in (2, 3, 4)}
        combos = Counter((s.meta["objects"][0]["colour"], s.meta["objects"][0]["shape"]) for s in sets[split])
        assert (set(combos) <= heldout) == (split == "count_heldout") and (set(combos) & heldout) == (
            set(combos) if split == "count_heldout" else set())
        assert max(combos.values()) - min(combos.values()) <= 1  # the compositions in rounds
    assert len({(s.meta["objects"][0]["colour"], s.meta["objects"][0]["shape"]) for s in sets["count"]}) == 28
    for split in ("pair_heldout", "pair_mixed"):
        assert Counter(s.meta["relation"] for s in sets[split]) == {r: 6 for r in RELATIONS}
        for scene in sets[split]:
            held = [(o["colour"], o["shape"]) in heldout for o in scene.meta["objects"]]
            assert held == [True, True] if split == "pair_heldout" else sorted(held) == [False, True], scene.caption
            assert scene.meta["objects"][0]["colour"] != scene.meta["objects"][1]["colour"]
    assert {tuple((o["colour"], o["shape"]) in heldout for o in s.meta["objects"]) for s in sets["pair_mixed"]} == {
        (True, False), (False, True)}  # the held-out object first and second
    for split, scenes in sets.items():  # every prompt parses back to its scene, and its render is judged right
        for scene in scenes:
            parsed = parse_caption(scene.caption)
            assert parsed is not None and parsed["scene"] == scene.meta["scene"], scene.caption
            assert [(o["colour"], o["shape"]) for o in parsed["objects"]] == [
                (o["colour"], o["shape"]) for o in scene.meta["objects"]]
            assert parsed.get("count") == scene.meta.get("count") and parsed["relation"] == scene.meta["relation"]
        report = fidelity_report(judge_batch([s.render(32) for s in scenes]), [s.meta for s in scenes])
        assert report["all"] == 1.0, (split, report)
    with pytest.raises(ValueError, match="pair_heldout needs held-out compositions of two colours"):
        balanced_scenes({"pair_heldout": 4}, heldout=[("red", "circle"), ("red", "square")])


def test_geneval_scores_read_the_six_categories_off_a_report():
    report = {"fidelity/val/object": 0.9, "fidelity/val/colour": 0.95, "fidelity/pair/shapes": 0.8,
              "fidelity/pair/relation": 0.6, "fidelity/pair/objects": 0.7, "fidelity/count/all": 0.25,
              "fidelity/val/all": 0.5, "fidelity/count_heldout/all": 0.0}
    scores = geneval_scores(report, prefix="fidelity/")
    assert scores == pytest.approx({"single_object": 0.9, "two_object": 0.8, "counting": 0.25, "colors": 0.95,
                                    "position": 0.6, "color_attr": 0.7, "overall": 4.2 / 6})
    partial = geneval_scores({k: v for k, v in report.items() if "/count/" not in k}, prefix="fidelity/")
    assert "counting" not in partial and "overall" not in partial  # no mean of five passed off as GenEval's
    table = geneval_table(scores, name="unclip").splitlines()
    assert table[0] == ("| model | overall | single object | two objects | counting | colours | position | "
                        "colour attribution |")
    assert table[2] == "| unclip (shapes, the pixel judge) | 0.70 | 0.90 | 0.80 | 0.25 | 0.95 | 0.60 | 0.70 |"
    assert table[3] == "| DALL-E 2 (published) | 0.52 | 0.94 | 0.66 | 0.49 | 0.77 | 0.10 | 0.19 |"
    assert table[4:8] == ["| SD 1.5 (published) | 0.43 |  |  |  |  |  |  |", "| SDXL (published) | 0.55 |  |  |  |  |  |  |",
                          "| DALL-E 3 (published) | 0.67 |  |  |  |  |  |  |",
                          "| minDALL-E (a DALL-E 1) (published) | 0.23 |  |  |  |  |  |  |"]
    assert "another domain and another judge" in table[-1]


def test_judged_pairs_and_counts_give_genevals_categories_exactly():
    sets = balanced_scenes({"val": 4, "pair": 4, "count": 3})
    images = {split: [s.render(32) for s in scenes] for split, scenes in sets.items()}
    first = sets["pair"][0].objects  # the second object's colour wrong: two objects yes, colour attribution no
    recoloured = next(c for c in ("red", "blue") if c not in (first[0].colour, first[1].colour))
    images["pair"][0] = render([first[0], ShapeObject(recoloured, first[1].shape, "small", first[1].position,
                                                      first[1].centre)], 32)
    images["count"][1] = render(sets["count"][1].objects[:-1], 32)  # one object too few
    report = {}
    for split, scenes in sets.items():
        report.update(fidelity_report(judge_batch(images[split]), [s.meta for s in scenes], prefix=f"{split}/"))
    scores = geneval_scores(report)
    assert scores == pytest.approx({"single_object": 1.0, "colors": 1.0, "two_object": 1.0, "color_attr": 0.75,
                                    "position": 0.75, "counting": 2 / 3, "overall": (3 + 0.75 + 0.75 + 2 / 3) / 6})
    assert report["count/count=3"] == 0.0 and report["count/count=2/all"] == 1.0
    assert "count count: 2 100%, 3 0%, 4 100%" in format_table(report, splits=list(sets))
