"""data.caption_noise: a share of the training captions replaced by web-like garbage, and the CLIP-score filter of
train/embed.py that drops the pairs whose caption says nothing of their image."""

from __future__ import annotations

import io
import json
import math
import os
import re
import subprocess
import sys
import tarfile
from collections import Counter

import pytest
import torch
from conftest import CONF, ROOT
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from unclip.checkpoint import save_stage
from unclip.config import build
from unclip.data import (
    EmbeddingShards,
    ImageFolderDataset,
    ShapesDataset,
    WebDatasetSource,
    write_embedding_shards,
    write_folder,
)
from unclip.data.caption_noise import KINDS, SHARES, mojibake
from unclip.data.embeddings import clip_scores, filter_embedding_shards
from unclip.data.shapes import collate, parse_caption

SIZE = 16


def _noised(items) -> list[dict]:
    return [item for item in items if item["meta"]["caption_noised"]]


def _within_binomial(count: int, n: int, p: float) -> bool:
    return abs(count - n * p) <= 4 * math.sqrt(n * p * (1 - p))


def test_the_share_of_garbage_captions_holds_on_shapes_and_every_kind_appears_in_its_share():
    n, fraction = 1500, 0.4
    items = [ShapesDataset("train", length=n, image_size=SIZE, pair_fraction=0.2, count_fraction=0.1,
                           caption_noise=fraction)[i] for i in range(n)]
    noised = _noised(items)
    assert _within_binomial(len(noised), n, fraction), len(noised)
    kinds = Counter(item["meta"]["caption_noise_kind"] for item in noised)
    assert set(kinds) == set(KINDS)
    for kind in KINDS:
        assert _within_binomial(kinds[kind], len(noised), SHARES[kind]), kinds
    assert all(item["meta"]["caption_noise_kind"] is None for item in items if not item["meta"]["caption_noised"])
    by_kind = {kind: [item["caption"] for item in noised if item["meta"]["caption_noise_kind"] == kind]
               for kind in KINDS}
    ids = r"(IMG|DSC|DSCN|P)_\d{4}\.(JPG|jpg|jpeg)|\d{8}_\d{6}\.jpg|[0-9a-f]{12,32}|[0-9a-f]{8}(-[0-9a-f]{4}){3}-[0-9a-f]{12}"
    assert all(re.fullmatch(ids, caption) for caption in by_kind["id"]), by_kind["id"][:5]
    assert all(re.match(r"https?://\S+$", caption) for caption in by_kind["url"])
    assert all("Ã" in caption or "Ð" in caption or "Î" in caption or "æ" in caption for caption in by_kind["mojibake"])
    assert all(re.search(r"(?i)price|buy|deal|win|wholesale|sale", caption) for caption in by_kind["spam"])
    # the garbage says nothing a shapes caption says; "other" is another scene's caption, as a mismatched pair
    assert all(parse_caption(c) is None for kind in ("id", "url", "mojibake", "spam") for c in by_kind[kind])
    assert all(parse_caption(caption) is not None for caption in by_kind["other"])
    assert mojibake("Café 🍮") == "CafÃ© ðŸ®"


def test_no_noise_changes_nothing_and_the_same_items_are_noised_in_every_build():
    clean = ShapesDataset("train", length=40, image_size=SIZE, pair_fraction=0.2)
    zero = ShapesDataset("train", length=40, image_size=SIZE, pair_fraction=0.2, caption_noise=0.0)
    for i in range(40):
        a, b = clean[i], zero[i]
        assert a.keys() == b.keys() and a["caption"] == b["caption"] and a["meta"] == b["meta"]
        assert torch.equal(a["image"], b["image"]) and "caption_noised" not in b["meta"]
    first, again = (ShapesDataset("train", length=40, image_size=SIZE, pair_fraction=0.2, caption_noise=0.3)
                    for _ in range(2))
    order = [17, 3, 39, 0, 17]  # any order, any worker: the caption is the item's own
    assert [first[i]["caption"] for i in range(40)] == [again[i]["caption"] for i in range(40)]
    assert [first[i]["meta"] for i in order] == [again[i]["meta"] for i in order]
    assert [first[i]["caption"] for i in order] == [first[i]["caption"] for i in order]
    for i in range(40):  # the images stay; a noised item's caption is garbage, the others' their own
        assert torch.equal(first[i]["image"], clean[i]["image"])
        assert first[i]["meta"]["caption_noised"] or first[i]["caption"] == clean[i]["caption"]
    more = ShapesDataset("train", length=40, image_size=SIZE, pair_fraction=0.2, caption_noise=0.6)
    assert {i for i in range(40) if first[i]["meta"]["caption_noised"]} < {i for i in range(40) if
                                                                        more[i]["meta"]["caption_noised"]}


def test_the_share_holds_on_a_folder_and_its_val_captions_stay_clean(tmp_path):
    root = write_folder(tmp_path / "images", 300, image_size=SIZE, pair_fraction=0.2)
    train = ImageFolderDataset(root, image_size=SIZE, split="train", val_fraction=0.2, caption_noise=0.25)
    clean = ImageFolderDataset(root, image_size=SIZE, split="train", val_fraction=0.2)
    items = [train[i] for i in range(len(train))]
    noised = _noised(items)
    assert _within_binomial(len(noised), len(items), 0.25), (len(noised), len(items))
    assert [item["caption"] for item in items if not item["meta"]["caption_noised"]] == [
        clean[i]["caption"] for i in range(len(clean)) if not items[i]["meta"]["caption_noised"]]
    again = ImageFolderDataset(root, image_size=SIZE, split="train", val_fraction=0.2, caption_noise=0.25)
    assert [again[i]["caption"] for i in range(len(again))] == [item["caption"] for item in items]
    # through the data config, as a job builds it: the train split noised, val and the evaluator's splits not
    data = _data_config("data=folder", f"data.root={root}", "data.val_fraction=0.2", "data.image_size=16",
                        "data.caption_noise=0.25")
    assert data["train"]["caption_noise"] == 0.25 and "caption_noise" not in data["val"]
    val, clean_val = build(data["val"]), ImageFolderDataset(root, image_size=SIZE, split="val", val_fraction=0.2)
    assert [val[i] for i in range(len(val))] and all(
        val[i]["caption"] == clean_val[i]["caption"] and "caption_noised" not in val[i]["meta"] for i in range(len(val)))


def test_webdataset_shards_get_the_same_garbage_for_a_sample_in_any_order(tmp_path):
    root = write_folder(tmp_path / "images", 240, image_size=SIZE)
    with tarfile.open(tmp_path / "shard-0.tar", "w") as tar:
        for line in (root / "captions.jsonl").read_text().splitlines():
            record = json.loads(line)
            key = record["file"].rsplit(".", 1)[0]
            for member, data in ((f"{key}.png", (root / record["file"]).read_bytes()),
                                 (f"{key}.txt", record["caption"].encode())):
                info = tarfile.TarInfo(member)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    shard = str(tmp_path / "shard-0.tar")
    clean = {item["meta"]["key"]: item["caption"] for item in WebDatasetSource(shard, image_size=SIZE, shuffle_buffer=0)}
    stream = WebDatasetSource(shard, image_size=SIZE, shuffle_buffer=64, caption_noise=0.3).stream()
    epochs = [list(stream) for _ in range(2)]  # two epochs: two shuffled orders
    assert [item["meta"]["key"] for item in epochs[0]] != [item["meta"]["key"] for item in epochs[1]]
    noised = _noised(epochs[0])
    assert len(epochs[0]) == 240 and _within_binomial(len(noised), 240, 0.3)
    again = {item["meta"]["key"]: item for item in epochs[1]}
    firsts = {epochs[0][0]["meta"]["key"], epochs[1][0]["meta"]["key"]}  # no sample before: "other" becomes "spam"
    for item in epochs[0]:
        if item["meta"]["key"] in firsts:
            continue
        same = again[item["meta"]["key"]]
        assert item["meta"]["caption_noise_kind"] == same["meta"]["caption_noise_kind"]
        if not item["meta"]["caption_noised"]:
            assert item["caption"] == same["caption"] == clean[item["meta"]["key"]]
        elif item["meta"]["caption_noise_kind"] != "other":  # "other": the sample read before it, in this order
            assert item["caption"] == same["caption"] != clean[item["meta"]["key"]]
        else:
            assert item["caption"] in clean.values()


def _data_config(*overrides: str) -> dict:
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        config = compose(config_name="train_clip", overrides=list(overrides))
    return OmegaConf.to_container(config.data, resolve=True)


def test_shapes_val_held_out_and_the_evaluators_captions_are_never_noised():
    data = _data_config("data=shapes_pairs", "data.caption_noise=0.4")
    assert data["train"]["caption_noise"] == 0.4
    for split in ("val", "heldout"):
        assert "caption_noise" not in data[split]
        assert data["evaluator"]["splits"][split] == data[split]
        built, clean = build(data[split]), build(_data_config("data=shapes_pairs")[split])
        assert all(built[i]["caption"] == clean[i]["caption"] and "caption_noised" not in built[i]["meta"]
                   for i in range(64))


@pytest.mark.parametrize("value", [1.0, 1.5, -0.1, "0.2", True])
def test_caption_noise_outside_0_to_1_is_refused_naming_the_value_and_the_source(value, tmp_path):
    with pytest.raises(ValueError, match=re.escape(
            f"caption_noise must be in [0, 1) (the share of training captions replaced by garbage), got {value!r} "
            "for ShapesDataset(split='train'); set data.caption_noise to e.g. 0.2, or 0 for clean captions")):
        ShapesDataset("train", length=8, image_size=SIZE, caption_noise=value)
    root = write_folder(tmp_path / "images", 8, image_size=SIZE)
    with pytest.raises(ValueError, match=re.escape(f"got {value!r} for ImageFolderDataset(split='train')")):
        ImageFolderDataset(root, image_size=SIZE, val_fraction=0.2, caption_noise=value)


def test_noising_a_split_that_judges_the_model_is_refused():
    with pytest.raises(ValueError, match=re.escape(
            "caption_noise=0.2 for ShapesDataset(split='val'): only training captions are noised, not split 'val' "
            "(its captions judge the model); give caption_noise to the train split only")):
        ShapesDataset("val", length=8, image_size=SIZE, caption_noise=0.2)


def _shards(tmp_path, micro_clip, n: int = 32):
    out = tmp_path / "train"
    data = ShapesDataset("train", length=n, image_size=32, pair_fraction=0.2, caption_noise=0.5)
    write_embedding_shards(out, micro_clip, data, collate_fn=collate, shard_size=8, batch_size=8, progress=False)
    return out


def test_the_clip_score_filter_drops_the_lowest_scoring_pairs_and_counts_the_garbage_among_them(micro_clip, tmp_path):
    out = _shards(tmp_path, micro_clip)
    before = EmbeddingShards(out)
    scores = clip_scores(before)
    report = filter_embedding_shards(out, drop_fraction=0.25, shard_size=8)
    after = EmbeddingShards(out)
    dropped = set(scores.argsort()[:8].tolist())
    assert len(after) == 24 and after.captions == [c for i, c in enumerate(before.captions) if i not in dropped]
    assert clip_scores(after).min() >= max(scores[i] for i in dropped)
    noised = [bool(meta["caption_noised"]) for meta in before.metas]
    assert report["filter_kept"] == 24 and report["filter_dropped"] == 8
    assert report["filter_noised"] == sum(noised) and report["filter_dropped_noised"] == sum(noised[i] for i in dropped)
    assert report["filter_threshold"] == pytest.approx(float(clip_scores(after).min()))
    threshold = float(clip_scores(after).median())
    report = filter_embedding_shards(out, min_clip_score=threshold, shard_size=8)
    assert clip_scores(EmbeddingShards(out)).min() >= threshold and report["filter_dropped"] > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train"]  # rewritten whole, nothing left beside it


def test_a_filter_that_would_drop_every_pair_or_a_bad_setting_is_refused(micro_clip, tmp_path):
    out = _shards(tmp_path, micro_clip, 8)
    with pytest.raises(ValueError, match=r"filter\.drop_fraction must be in \[0, 1\) \(the share of training pairs "
                                         r"with the lowest CLIP score dropped\), got 1\.0"):
        filter_embedding_shards(out, drop_fraction=1.0)
    with pytest.raises(ValueError, match=r"filter\.min_clip_score must be a cosine in \[-1, 1\] or null \(no "
                                         r"threshold\), got 2"):
        filter_embedding_shards(out, min_clip_score=2)
    with pytest.raises(ValueError, match=r"the filter \(min_clip_score=1\.0, drop_fraction=0\.0\) drops all 8 pairs "
                                         r".*; lower min_clip_score"):
        filter_embedding_shards(out, min_clip_score=1.0)
    assert len(EmbeddingShards(out)) == 8  # left whole


@pytest.mark.slow
def test_embed_with_noise_and_the_filter_reports_the_garbage_it_dropped_and_keeps_val_clean(micro_clip, tmp_path):
    clip = save_stage(tmp_path / "clip", micro_clip, stage="clip", space=micro_clip.space)
    run = tmp_path / "embed"
    proc = subprocess.run(
        [sys.executable, "train/embed.py", f"hydra.run.dir={run}", f"clip_checkpoint={clip}", "data.image_size=32",
         "data.caption_noise=0.5", "filter.drop_fraction=0.25", "splits.train=32", "splits.val=16", "splits.heldout=8",
         "batch_size=16", "shard_size=16", "bf16=false"],
        cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((run / "metrics.json").read_text())
    assert (metrics["items_train"], metrics["filter_dropped"], metrics["items_val"]) == (24, 8, 16)
    assert 0 <= metrics["filter_dropped_noised"] <= min(8, metrics["filter_noised"]) and metrics["filter_noised"] > 0
    assert metrics["noised_train"] == metrics["filter_noised"] - metrics["filter_dropped_noised"]
    assert "noised_val" not in metrics
    assert "the CLIP-score filter" in proc.stdout
    assert not any("caption_noised" in meta for meta in EmbeddingShards(run / "val").metas)
    assert any(meta["caption_noised"] for meta in EmbeddingShards(run / "train").metas)
