"""Property tests: every shapes item keeps to docs/data.md, and every prompt becomes a valid token sequence.

Bounded (50 examples each, no example database) so that they run in seconds; the geometry helpers are
test_shapes.py's, which writes docs/data.md's geometry out independently of the generator.
"""

from __future__ import annotations

import json
import warnings
from functools import lru_cache

import numpy as np
import pytest
import torch
from conftest import MICRO_CLIP
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from test_shapes import POSITION_WORDS, RELATION_WORDS, object_list, pixel_classes

from unclip.clip import OpenClipEncoder
from unclip.clip.open_clip_encoder import _plain_text
from unclip.data.shapes import COLOURS, DEFAULT_HELDOUT, POSITIONS, SHAPES, SIZES, ShapesDataset, generate_item

BOUNDED = settings(max_examples=50, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


# -- the shapes generator ------------------------------------------------------------------------------
def check_objects(meta: dict, split: str) -> None:
    objects = meta["objects"]
    assert meta["scene"] in ("single", "pair") and len(objects) == (1 if meta["scene"] == "single" else 2)
    for obj in objects:
        assert obj["colour"] in COLOURS and obj["shape"] in SHAPES and obj["size"] in SIZES
        assert obj["position"] in POSITIONS
        for got, want in zip(obj["centre"], POSITIONS[obj["position"]]):
            assert abs(got - want) <= 0.03 + 1e-9, obj  # jitter of at most 0.03 canvas sides
        if obj["size"] == "large":
            assert obj["position"] == "centre", obj
        held_out = (obj["colour"], obj["shape"]) in DEFAULT_HELDOUT
        assert held_out == (split == "heldout"), (split, obj)
    if meta["scene"] == "pair":
        a, b = objects
        assert a["colour"] != b["colour"] and a["size"] == b["size"] == "small"
        assert {a["position"], b["position"]} in ({"left", "right"}, {"top", "bottom"})
        expected = {"left": "left of", "right": "right of", "top": "above", "bottom": "below"}[a["position"]]
        assert meta["relation"] == expected


def check_caption(caption: str, meta: dict) -> None:
    assert caption == caption.lower() == caption.strip() and "  " not in caption and caption.isascii()
    for obj in meta["objects"]:
        assert f"{obj['colour']} {obj['shape']}" in caption  # colour and shape are always named
        assert (f"{obj['size']} {obj['colour']} {obj['shape']}" in caption) == meta["named_size"]
    if meta["scene"] == "pair":
        first, second = (f"{o['colour']} {o['shape']}" for o in meta["objects"])
        assert f"{first} {RELATION_WORDS[meta['relation']]} " in caption and caption.endswith(second), caption
    else:
        named = any(caption.endswith(p) for p in POSITION_WORDS[meta["objects"][0]["position"]])
        assert named == meta["named_position"], caption


def check_pixels(image: np.ndarray, meta: dict) -> None:
    """Inside each shape exactly its colour, outside every shape exactly white, edges a mix of the two."""
    size = image.shape[0]
    outside = np.ones((size, size), bool)
    for obj in object_list(meta):
        classes = pixel_classes(obj, size)
        colour = np.array(COLOURS[obj.colour])
        assert (image[classes == 1] == colour).all(), obj
        edge = image[classes == 0]
        low, high = np.minimum(colour, 255), np.maximum(colour, 255)
        assert ((edge >= low - 1) & (edge <= high + 1)).all(), f"edge pixels not between {obj.colour} and white"
        outside &= classes == -1
    assert (image[outside] == 255).all(), "the background must be exactly white"


@BOUNDED
@given(
    split=st.sampled_from(["train", "val", "heldout"]),
    index=st.integers(0, 10**12),
    seed=st.integers(-(2**63), 2**63),
    image_size=st.integers(2, 32).map(lambda k: 8 * k),
    pair_fraction=st.floats(0.0, 1.0),
)
def test_every_item_keeps_to_shapes_md(split, index, seed, image_size, pair_fraction):
    item = generate_item(index, split=split, seed=seed, image_size=image_size, pair_fraction=pair_fraction)
    assert item.image.mode == "RGB" and item.image.size == (image_size, image_size)
    image = np.asarray(item.image).astype(int)
    border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])
    assert (border == 255).all(), "objects never touch the canvas border"
    assert json.loads(json.dumps(item.meta)) == item.meta
    check_objects(item.meta, split)
    check_caption(item.caption, item.meta)
    check_pixels(image, item.meta)
    again = generate_item(index, split=split, seed=seed, image_size=image_size, pair_fraction=pair_fraction)
    assert again.image.tobytes() == item.image.tobytes() and again.caption == item.caption


@BOUNDED
@given(index=st.integers(0, 10**6), seed=st.integers(-(2**31), 2**31), image_size=st.integers(2, 32).map(lambda k: 8 * k))
def test_dataset_tensors_are_the_items_in_minus_one_to_one(index, seed, image_size):
    dataset = ShapesDataset("val", length=index + 1, image_size=image_size, pair_fraction=0.5, seed=seed)
    item = dataset[index]
    reference = np.asarray(generate_item(index, split="val", seed=seed, image_size=image_size, pair_fraction=0.5).image)
    assert item["image"].shape == (3, image_size, image_size) and item["image"].dtype == torch.float32
    assert torch.equal(item["image"], torch.from_numpy(reference.astype(np.float32)).permute(2, 0, 1) / 127.5 - 1)


# -- prompts into the CLIP tokenizer and text encoder ------------------------------------------------------
@lru_cache(maxsize=1)
def encoder() -> OpenClipEncoder:
    torch.manual_seed(0)
    return OpenClipEncoder(model_cfg=MICRO_CLIP, name="micro").eval()


blank = st.text(st.characters(categories=["Zs", "Zl", "Zp", "Cc", "Cf"]), max_size=20)  # empty after strip
control = st.text(st.characters(categories=["Cc", "Cf", "Co", "Cn", "Mn", "So"]), max_size=30)
long = st.builds(lambda text, times: text * times, st.text(min_size=1, max_size=12), st.integers(20, 400))
prompts = st.one_of(st.text(), blank, control, long, st.builds(lambda a, b, c: a + b + c, st.text(), control, st.text()))


def token_row(text: str) -> tuple[torch.Tensor, bool]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tokens = encoder().tokenize([text])
    return tokens, any("truncated" in str(w.message) for w in caught)


def check_tokens(text: str) -> torch.Tensor:
    clip = encoder()
    tokenizer, length = clip.tokenizer, clip.context_length
    tokens, warned = token_row(text)
    assert tokens.shape == (1, length) and tokens.dtype == torch.long
    row = tokens[0]
    assert 0 <= int(row.min()) and int(row.max()) < MICRO_CLIP["text_cfg"]["vocab_size"]
    assert row[0] == tokenizer.sot_token_id and (row[1:] != tokenizer.sot_token_id).all()
    ends = (row == tokenizer.eot_token_id).nonzero().flatten()
    assert len(ends) == 1, f"{len(ends)} end tokens for {text!r}: {row.tolist()}"
    end = int(ends[0])
    assert (row[end + 1 :] == 0).all(), "only padding after the end token"
    words = len(tokenizer.encode(_plain_text(text)))  # special-token strings are removed first
    if warned:
        assert end == length - 1 and words + 2 > length
    else:
        assert end == words + 1, "a caption was truncated without a warning"
    return tokens


@BOUNDED
@given(text=prompts)
@example("")
@example(" \t\n\r\x0b\x0c\u00a0\u2028\u3000")
@example("\x00\x07\x1b[31m red circle \x7f")
@example("a small red circle on the left " * 40)
@example("ＡＢＣ ｆｕｌｌｗｉｄｔｈ 🟥🔺 \u200b\u200d e\u0301")
def test_any_prompt_becomes_a_valid_token_sequence_and_a_finite_embedding(text):
    tokens = check_tokens(text)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the truncation warning, checked above
        with torch.no_grad():
            condition = encoder().encode_text([text])
    assert torch.equal(condition.tokens, tokens)
    assert torch.isfinite(condition.embed).all() and torch.isfinite(condition.token_embeds).all()
    torch.testing.assert_close(condition.embed.norm(dim=-1), torch.ones(1))
    end = int((tokens[0] == encoder().tokenizer.eot_token_id).nonzero()[0])
    assert condition.mask[0].tolist() == [i <= end for i in range(encoder().context_length)]


@pytest.mark.parametrize("text", ["a red <end_of_text> circle", "<start_of_text>a blue square", "&lt;end_of_text&gt; x"])
def test_special_token_strings_in_a_prompt_are_plain_text(text):
    check_tokens(text)
