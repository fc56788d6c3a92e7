"""The emoji data set (names, split, rendering, caches, font lookup) and CLIP retrieval metrics."""

import os
import pickle
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from unclip.clip.evaluation import retrieval_recall
from unclip.config import build
from unclip.data import emoji as emoji_data
from unclip.data.emoji import (
    EmojiDataset,
    clear_memory_cache,
    emoji_names,
    find_font,
    list_emoji,
    readable_name,
    render_all,
    render_emoji,
)
from unclip.data.shapes import collate
from unclip.eval.clip_retrieval import clip_score, derangement, retrieval_metrics, shuffled_clip_score

SIZE = 16


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One disk cache for the module: the kept list and the 16 px images are made once."""
    path = tmp_path_factory.mktemp("emoji-cache")
    clear_memory_cache()
    yield path
    clear_memory_cache()


@pytest.fixture(scope="module")
def everything(cache):
    return {e.emoji: e for e in list_emoji("all", cache_dir=cache)}


def test_names_are_readable_cldr_names(everything):
    assert everything["🍎"].name == "red apple" and everything["🍎"].names == ("red apple", "apple")
    assert everything["🏄🏻\u200d♀️"].name == "woman surfing: light skin tone"
    assert everything["👨🏿\u200d🦰"].name == "man: dark skin tone, red hair"
    assert everything["👩\u200d❤️\u200d💋\u200d👨"].names == ("kiss: woman, man", "couplekiss man woman")
    assert everything["🇲🇼"].names[:2] == ("flag: Malawi", "Malawi")
    assert everything["#️⃣"].names == ("keycap: #", "hash")
    assert everything["😁"].names == ("beaming face with smiling eyes", "grin")
    # ":kiss:" is an alias of the kiss mark but the name of the couple kissing: it goes to neither as an alias
    assert everything["💋"].names == ("kiss mark",) and everything["💏"].name == "kiss"
    assert readable_name(":man_medium-light_skin_tone_bald:") == "man: medium-light skin tone, bald"
    assert readable_name(":family_man_woman_boy:") == "family: man, woman, boy"
    for entry in everything.values():
        assert "_" not in entry.name and entry.name == entry.names[0]
        assert len(set(entry.names)) == len(entry.names)


def test_kept_emoji_count_versions_and_split(everything, cache):
    assert 3400 <= len(everything) <= 3800
    assert all(e.version <= 15.0 for e in everything.values())
    assert "🐦\u200d🔥" not in everything  # phoenix: Emoji 15.1
    assert "🙂\u200d↔️" not in everything  # head shaking horizontally: 15.1
    assert "🍎︎" not in everything and "☺" not in everything  # not fully qualified
    train, val = list_emoji("train", cache_dir=cache), list_emoji("val", cache_dir=cache)
    assert len(train) + len(val) == len(everything)
    assert not {e.name for e in train} & {e.name for e in val}
    assert 0.08 <= len(val) / len(everything) <= 0.12
    # the split is a fixed hash of the name: these were observed and must never move
    assert {e.name for e in val} >= {"alien monster", "blue heart", "crab", "cherry blossom"}
    assert {e.name for e in train} >= {"red apple", "grinning face", "dog"}
    assert emoji_names("val", cache_dir=cache) == [e.name for e in val]


def test_items_images_and_colour(cache, everything):
    train = EmojiDataset("train", SIZE, cache_dir=cache)
    val = EmojiDataset("val", SIZE, cache_dir=cache)
    assert len(val) == len(list_emoji("val", cache_dir=cache))  # one item per held-out emoji
    assert len(train) == sum(len(e.names) for e in list_emoji("train", cache_dir=cache))
    item = val[0]
    assert item["image"].dtype == torch.float32 and item["image"].shape == (3, SIZE, SIZE)
    assert item["caption"] == item["meta"]["name"] and item["meta"]["names"][0] == item["meta"]["name"]
    assert item["meta"]["emoji"] in everything
    apple = [train[i] for i in range(len(train)) if train.items[i][1] in ("red apple", "apple")]
    assert [a["caption"] for a in apple] == ["red apple", "apple"] and torch.equal(apple[0]["image"], apple[1]["image"])

    images = render_all(SIZE, cache_dir=cache)
    assert images.shape == (len(everything), SIZE, SIZE, 3) and images.dtype == np.uint8
    corners = images[:, [0, 0, -1, -1], [0, -1, 0, -1]]
    assert corners.min() >= 200 and corners.mean() > 253  # white background (at 16 px the margin is thin)
    ink = (images < 235).any(axis=-1).mean(axis=(1, 2))
    assert ink.min() > 0.03  # nothing blank
    flat = images.reshape(len(images), -1)
    assert len(np.unique(flat[:: 7], axis=0)) == len(flat[:: 7])  # different emoji, different images

    apple_image = render_emoji("🍎", 32).astype(int)
    r, g, b = apple_image[..., 0], apple_image[..., 1], apple_image[..., 2]
    glyph = (apple_image < 235).any(axis=-1)
    red = (r > 150) & (r > g + 60) & (r > b + 60)
    assert red[glyph].mean() > 0.6
    batch = collate([val[i] for i in range(4)])
    assert batch["image"].shape == (4, 3, SIZE, SIZE) and batch["image"].min() >= -1 and batch["image"].max() <= 1


def test_rendering_is_deterministic_and_the_disk_cache_is_used(cache, monkeypatch):
    images = render_all(SIZE, cache_dir=cache)
    row = [e.emoji for e in list_emoji("all", cache_dir=cache)].index("🦀")
    assert np.array_equal(render_emoji("🦀", SIZE), render_emoji("🦀", SIZE))
    assert np.array_equal(render_emoji("🦀", SIZE), images[row])

    clear_memory_cache()  # as a second process would start
    monkeypatch.setattr(emoji_data, "render_emoji", _fail)
    monkeypatch.setattr(emoji_data, "draws_one_glyph", _fail)
    again = EmojiDataset("all", SIZE, cache_dir=cache, aliases=False)
    assert np.array_equal(((again[row]["image"].permute(1, 2, 0) + 1) * 127.5).round().numpy(), images[row])


def _fail(*args, **kwargs):
    raise AssertionError("rendered although the disk cache holds the result")


def test_pickles_without_images_and_loads_in_workers(cache):
    dataset = EmojiDataset("val", SIZE, cache_dir=cache)
    first = dataset[0]
    assert len(pickle.dumps(dataset)) < 200_000  # the images are not shipped to workers
    loader = torch.utils.data.DataLoader(dataset, batch_size=8, num_workers=1, collate_fn=collate)
    batch = next(iter(loader))
    assert torch.equal(batch["image"][0], first["image"]) and batch["caption"][0] == first["caption"]


def test_limit_spreads_a_fixed_sample_and_config_builds(cache, monkeypatch):
    sample = EmojiDataset("train", SIZE, cache_dir=cache, aliases=False, limit=64)
    assert len(sample) == 64 and len({item[1] for item in sample.items}) == 64
    assert {e.split for e in sample.entries} == {"train"}
    assert len({e.name.split()[0] for e in sample.entries}) > 20  # spread, not 64 neighbours in name order
    assert [e.emoji for e in sample.entries] == [e.emoji for e in EmojiDataset(
        "train", SIZE, cache_dir=cache, aliases=False, limit=64).entries]

    from conftest import CONF
    from omegaconf import OmegaConf

    monkeypatch.setenv("UNCLIP_EMOJI_CACHE", str(cache))
    node = OmegaConf.to_container(OmegaConf.merge({"data": OmegaConf.load(CONF / "data" / "emoji.yaml")},
                                                  {"data": {"image_size": SIZE}}), resolve=True)["data"]
    data = build(node)
    assert len(data["val"]) == len(list_emoji("val", cache_dir=cache))
    assert len(data["train_names"]) == 64 and data["train_names"][0]["caption"] == data["train_names"].entries[0].name


def test_a_missing_font_says_how_to_install_it(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="apt-get install fonts-noto-color-emoji") as info:
        EmojiDataset("train", SIZE, font_path=tmp_path / "missing.ttf", cache_dir=tmp_path)
    assert "missing.ttf" in str(info.value) and "font_path" in str(info.value)
    monkeypatch.setenv("UNCLIP_EMOJI_FONT", str(tmp_path / "nope.ttf"))
    with pytest.raises(FileNotFoundError, match="UNCLIP_EMOJI_FONT='.*nope.ttf'"):
        find_font()
    monkeypatch.delenv("UNCLIP_EMOJI_FONT")
    installed = find_font()
    monkeypatch.setattr(emoji_data, "_fc_match", lambda: None)
    monkeypatch.setattr(emoji_data, "FONT_DIRS", (str(tmp_path),))
    with pytest.raises(FileNotFoundError, match="noto-emoji/releases"):
        find_font()
    # a font dropped into a font folder is found there
    (tmp_path / "sub").mkdir()
    os.symlink(installed, tmp_path / "sub" / "NotoColorEmoji.ttf")
    assert find_font() == tmp_path / "sub" / "NotoColorEmoji.ttf"


def test_a_config_naming_a_missing_emoji_cache_dir_is_refused_creating_nothing(micro_clip, tmp_path):
    import json

    from unclip.checkpoint import CheckpointError, load_stage, save_stage

    deep = tmp_path / "anywhere" / "deep" / "cache"
    message = (f"emoji cache_dir '{deep}' is not an existing folder; create it, or leave cache_dir unset to cache in "
               "$UNCLIP_EMOJI_CACHE or ~/.cache/unclip/emoji")
    with pytest.raises(FileNotFoundError) as info:
        build({"_target_": "unclip.data.emoji.EmojiDataset", "split": "val", "image_size": SIZE,
               "cache_dir": str(deep)})
    assert str(info.value) == message
    # a stage's config.json edited to name the data set: loading it made the folders wherever it said
    stage = save_stage(tmp_path / "clip", micro_clip, stage="clip", space=micro_clip.space)
    config = json.loads((stage / "config.json").read_text())
    config["model"] = {"_target_": "unclip.data.emoji.EmojiDataset", "cache_dir": str(deep)}
    (stage / "config.json").write_text(json.dumps(config))
    with pytest.raises((FileNotFoundError, CheckpointError)):
        load_stage(stage)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip"]


def test_an_unsupported_sequence_or_missing_glyph_is_not_kept():
    assert emoji_data.draws_one_glyph("🍎")
    assert not emoji_data.draws_one_glyph("🍎🍐")  # two glyphs
    assert not emoji_data.draws_one_glyph("🍎\u200d🍐")  # a ZWJ sequence the font does not know
    assert not emoji_data.draws_one_glyph("\U0001FAFF")  # unassigned: .notdef
    assert not emoji_data.draws_one_glyph("A")  # the emoji font has no letters


# ----------------------------------------------------------------------------------------------------
# retrieval metrics


class LookupClip:
    """A constructed ClipEncoder: a text's embedding is looked up, an image's is read from its pixels."""

    def __init__(self, text_embeds: dict[str, torch.Tensor]):
        self.text_embeds = text_embeds

    def encode_text(self, texts):
        return SimpleNamespace(embed=torch.stack([self.text_embeds[t] for t in texts]))

    def encode_image(self, images):
        return torch.nn.functional.normalize(images[:, 0, 0, :], dim=-1)


def _images_showing(embeds: torch.Tensor) -> torch.Tensor:
    images = torch.zeros(len(embeds), 3, 2, embeds.shape[1])
    images[:, 0, 0, :] = embeds
    return images


def test_retrieval_is_perfect_when_every_image_shows_its_text():
    texts = [f"emoji {i}" for i in range(12)]
    clip = LookupClip({t: torch.eye(12)[i] for i, t in enumerate(texts)})
    images = _images_showing(torch.eye(12))
    metrics = retrieval_metrics(clip, images, texts, batch_size=5)
    assert metrics == {"image_to_text_R@1": 1.0, "image_to_text_R@5": 1.0,
                       "text_to_image_R@1": 1.0, "text_to_image_R@5": 1.0}
    assert clip_score(clip, images, texts) == pytest.approx(1.0)
    assert shuffled_clip_score(clip, images, texts, seed=3) == pytest.approx(0.0)
    # swapping two images costs exactly those two pairs their R@1
    swapped = images[[1, 0] + list(range(2, 12))]
    assert retrieval_metrics(clip, swapped, texts)["image_to_text_R@1"] == pytest.approx(10 / 12)


def test_duplicate_texts_count_as_correct_and_ties_as_misses():
    texts = ["cat", "cat", "dog", "fish"]
    clip = LookupClip({"cat": torch.eye(3)[0], "dog": torch.eye(3)[1], "fish": torch.eye(3)[2]})
    nudge = 0.01 * torch.tensor([[0, 1, 0], [0, 0, 1], [0, 0, 0], [0, 0, 0]])  # the two cats differ a little
    images = _images_showing(torch.eye(3)[[0, 0, 1, 2]] + nudge)
    metrics = retrieval_metrics(clip, images, texts)
    assert metrics["image_to_text_R@1"] == 1.0 and metrics["text_to_image_R@1"] == 1.0
    tied = retrieval_metrics(clip, _images_showing(torch.ones(4, 3)), texts)  # every image equally close
    assert tied["image_to_text_R@1"] == 0.0 and tied["image_to_text_R@5"] == 1.0


def test_random_embeddings_retrieve_at_chance():
    generator = torch.Generator().manual_seed(0)
    texts = [f"emoji {i}" for i in range(300)]
    clip = LookupClip({t: torch.nn.functional.normalize(torch.randn(16, generator=generator), dim=0) for t in texts})
    images = _images_showing(torch.randn(300, 16, generator=generator))
    metrics = retrieval_metrics(clip, images, texts)
    assert metrics["image_to_text_R@1"] < 0.03 and metrics["text_to_image_R@5"] < 0.06
    assert abs(clip_score(clip, images, texts)) < 0.1


def test_matched_pairs_score_above_shuffled_with_a_micro_clip(micro_clip):
    torch.manual_seed(0)
    images = torch.rand(8, 3, 32, 32) * 2 - 1
    texts = [f"a photo of emoji number {i}" for i in range(8)]
    # with distinct captions it is the same recall the CLIP trainer reports
    with torch.no_grad():
        expected = retrieval_recall(micro_clip.encode_image(images), micro_clip.encode_text(texts).embed, ks=(1, 5))
    assert retrieval_metrics(micro_clip, images, texts) == pytest.approx(expected)
    # one caption for all: whatever the CLIP, every retrieval is right
    assert set(retrieval_metrics(micro_clip, images, ["an emoji"] * 8).values()) == {1.0}
    # constructed: each image is the one its caption's embedding points at, so matched beats shuffled
    text_embeds = micro_clip.encode_text(texts).embed.detach()
    clip = LookupClip(dict(zip(texts, text_embeds)))
    matched = clip_score(clip, _images_showing(text_embeds), texts)
    assert matched == pytest.approx(1.0, abs=1e-5)
    assert shuffled_clip_score(clip, _images_showing(text_embeds), texts, seed=1) < matched - 0.01


def test_derangement_moves_every_item_and_is_seeded():
    for n in (2, 3, 10):
        order = derangement(n, seed=5)
        assert sorted(order) == list(range(n)) and all(order[i] != i for i in range(n))
    assert derangement(10, 1) == derangement(10, 1) != derangement(10, 2)
    with pytest.raises(ValueError, match="at least 2"):
        derangement(1, 0)
    with pytest.raises(ValueError, match="2 images but 3 texts"):
        clip_score(LookupClip({}), torch.zeros(2, 3, 2, 2), ["a", "b", "c"])


def test_a_clip_with_nan_embeddings_scores_no_retrieval():
    texts = [f"emoji {i}" for i in range(12)]
    clip = LookupClip({t: torch.full((12,), float("nan")) for t in texts})
    metrics = retrieval_metrics(clip, _images_showing(torch.full((12, 12), float("nan"))), texts)
    assert metrics == {"image_to_text_R@1": 0.0, "image_to_text_R@5": 0.0,
                       "text_to_image_R@1": 0.0, "text_to_image_R@5": 0.0}
    clip = LookupClip({t: torch.eye(12)[i] for i, t in enumerate(texts)})
    images = _images_showing(torch.eye(12))
    images[3] = float("nan")  # one image NaN: its pair a miss both ways, the others still found
    metrics = retrieval_metrics(clip, images, texts)
    assert metrics["image_to_text_R@1"] == pytest.approx(11 / 12) and metrics["text_to_image_R@1"] == 0.0


def test_on_a_fresh_machine_the_default_cache_folder_is_created(monkeypatch, tmp_path):
    """No ~/.cache/unclip/emoji yet (a fresh machine, `make demo-emoji`): the data set makes the folder and caches
    there, instead of refusing its own default as if a config had named a missing folder."""
    monkeypatch.delenv(emoji_data.CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "fresh-home-cache"))
    default = tmp_path / "fresh-home-cache" / "unclip" / "emoji"
    data = EmojiDataset("val", image_size=SIZE, limit=4)
    assert default.is_dir() and data.cache_dir == str(default) and len(data) == 4
    assert any(default.glob("emoji-*.json"))  # the kept list cached there
