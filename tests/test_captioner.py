"""The captioner: DALL-E's transformer trained image-first ([image tokens | caption tokens]), its caption sampler,
DallePipeline.caption, the CLIP stage's decode, and the judge that parses captions against the scenes."""

import json
import os
import re
import subprocess
import sys
import warnings

import pytest
import torch
from conftest import ROOT
from dalle_stages import dalle_stages, save_dalle_stages, tiny_transformer

from unclip.checkpoint import load_stage, save_stage
from unclip.config import build
from unclip.data.shapes import ShapesDataset
from unclip.eval.captioning import caption_scores, caption_table, judge_caption, unparseable
from unclip.images import to_pil
from unclip.pipelines import DallePipeline

CAPTIONER = {"order": "image_first", "text_loss_weight": 1.0, "cond_drop_prob": 0.0}


def shapes_items(n: int, seed: int = 1) -> dict:
    data = ShapesDataset("val", length=n, image_size=16, pair_fraction=0.5, seed=seed)
    items = [data[i] for i in range(n)]
    return {"image": torch.stack([it["image"] for it in items]), "caption": [it["caption"] for it in items],
            "meta": [it["meta"] for it in items]}


def train(model, text, tokens, steps: int, lr: float) -> list[float]:
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        loss = model.training_loss(text, tokens)
        optimizer.zero_grad()
        loss["loss"].backward()
        optimizer.step()
        losses.append(float(loss["text_loss"]))
    return losses


@pytest.fixture(scope="module")
def stages():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a few shapes captions are longer than the micro CLIP's 16 tokens
        return dalle_stages()


@pytest.fixture(scope="module")
def scenes():
    return shapes_items(3)  # a pair, a pair, a single: captions of 13, 10 and 5 tokens


@pytest.fixture(scope="module")
def captioner(stages, scenes):
    """A tiny captioner that has learnt the three scenes' captions by heart (each from its image's tokens)."""
    clip, dvae, _ = stages
    torch.manual_seed(0)
    model = tiny_transformer(clip, dvae, **CAPTIONER)
    train(model, clip.tokenize(scenes["caption"]), dvae.encode(scenes["image"]).flatten(1), steps=120, lr=1e-2)
    return model.eval()


@pytest.fixture(scope="module")
def pipe(stages, captioner):
    clip, dvae, transformer = stages
    return DallePipeline(clip, dvae, transformer, captioner=captioner)


def test_image_first_training_lowers_the_text_loss_and_each_word_sees_the_image_and_the_words_before(stages):
    clip, dvae, _ = stages
    batch = shapes_items(8, seed=2)
    torch.manual_seed(0)
    model = tiny_transformer(clip, dvae, **CAPTIONER)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        text = clip.tokenize(batch["caption"])
    tokens = dvae.encode(batch["image"]).flatten(1)
    losses = train(model, text, tokens, steps=30, lr=3e-3)
    assert losses[-1] < 0.5 * losses[0], losses
    ids = model.text_ids(text[:1])
    text_logits, image_logits = model.logits(ids, tokens[:1])
    assert text_logits.shape[1] == model.text_length - 1 and image_logits.shape[1] == tokens.shape[1] - 1
    k = 3  # a different 3rd word changes the predictions of the words after it only
    changed = ids.clone()
    changed[0, k] = ids[0, k + 1]
    after, _ = model.logits(changed, tokens[:1])
    torch.testing.assert_close(after[:, :k], text_logits[:, :k])
    assert not torch.allclose(after[:, k:], text_logits[:, k:])
    other_image, _ = model.logits(ids, (tokens[:1] + 1) % dvae.codebook_size)
    assert not torch.allclose(other_image[:, 0], text_logits[:, 0])  # the first word is read off the image


def test_caption_sampling_is_seeded_stops_at_the_end_token_and_decodes_to_text(stages, scenes, captioner):
    clip, dvae, _ = stages
    tokens = dvae.encode(scenes["image"]).flatten(1)
    rows = captioner.sample_captions(tokens, top_k=1)
    assert clip.decode(rows) == scenes["caption"]
    lengths = [len(clip.tokenize([c])[0].nonzero()) - 1 for c in scenes["caption"]]  # after the start, end included
    assert rows.shape == (3, max(lengths)) and max(lengths) < captioner.text_length - 1  # stopped once all ended
    end = clip.tokenize([""])[0, 1]
    for row, n in zip(rows, lengths):
        assert row[n - 1] == end and not row[n:].any()  # the end token, then padding
    assert torch.equal(captioner.sample_captions(tokens, top_k=1, use_cache=False), rows)
    hot = {"temperature": 3.0, "top_k": 20}
    first = captioner.sample_captions(tokens, generator=torch.Generator().manual_seed(0), **hot)
    assert torch.equal(captioner.sample_captions(tokens, generator=torch.Generator().manual_seed(0), **hot), first)
    assert torch.equal(captioner.sample_captions(tokens, generator=torch.Generator().manual_seed(0), use_cache=False,
                                                 **hot), first)
    assert not torch.equal(captioner.sample_captions(tokens, generator=torch.Generator().manual_seed(1), **hot), first)
    assert all(isinstance(text, str) for text in clip.decode(first))


def test_caption_gives_n_captions_per_image_in_image_order_and_reranks_by_clip(pipe, scenes, monkeypatch):
    images = scenes["image"]
    captions = pipe.caption(images, n=2, top_k=1)
    assert captions == [c for c in scenes["caption"] for _ in range(2)]
    assert pipe.caption(to_pil(images), top_k=1) == scenes["caption"]  # PIL images, resized as complete() does
    assert pipe.caption(images[1], top_k=1) == scenes["caption"][1:2]  # one image [3, S, S]
    hot, k = {"temperature": 3.0, "top_k": 20}, 4
    candidates = pipe.caption(images, n=k, seed=0, **hot)  # the same draws, un-ranked
    assert len(candidates) == 3 * k and pipe.caption(images, n=k, seed=0, **hot) == candidates
    chosen = pipe.caption(images, seed=0, rerank=k, **hot)
    text = pipe.clip.encode_text(candidates).embed.view(3, k, -1)
    best = (text * pipe.clip.encode_image(images)[:, None]).sum(-1).argmax(dim=1)
    assert chosen == [candidates[i * k + int(b)] for i, b in enumerate(best)]
    drawn, sample = [], pipe.captioner.sample_captions
    monkeypatch.setattr(pipe.captioner, "sample_captions", lambda tokens, **kw: drawn.append(len(tokens)) or
                        sample(tokens, **kw))
    assert len(pipe.caption(images, seed=0, rerank=k, max_batch=5, **hot)) == 3 and drawn == [5, 5, 2]
    plain, unfiltered = pipe.caption(images, seed=0, **hot), pipe.caption(images, seed=0, temperature=3.0)
    pipe.settings.rerank, pipe.settings.top_k = k, 30  # its rerank does the same; its image top_k is not a caption's
    try:
        assert pipe.caption(images, seed=0, **hot) == chosen
        assert pipe.caption(images, seed=0, rerank=1, **hot) == plain != chosen  # the call wins
        assert pipe.caption(images, seed=0, rerank=1, temperature=3.0) == unfiltered
    finally:
        pipe.settings.rerank, pipe.settings.top_k = 1, None


def test_the_judge_parses_captions_against_the_scenes():
    single = {"scene": "single", "objects": [{"colour": "red", "shape": "circle", "size": "small",
                                             "position": "left"}], "relation": None}
    pair = {"scene": "pair", "relation": "left of", "objects": [
        {"colour": "red", "shape": "circle", "size": "small", "position": "left"},
        {"colour": "blue", "shape": "square", "size": "small", "position": "right"}]}
    count = {"scene": "count", "count": 3, "relation": None,
             "objects": [{"colour": "green", "shape": "triangle", "size": "small", "position": p}
                         for p in ("top left", "top right", "bottom left")]}
    judged = [
        ("a small red circle on the left", single),  # right, everything named
        ("there is a red circle", single),  # right: size and position left out
        ("a large red circle", single),  # the size wrong
        ("a red circle on the right", single),  # the position wrong
        ("a blue circle on the left", single),  # the colour wrong
        ("red red circle zzz", single),  # unparseable: wrong on every check
        ("a blue square to the right of a red circle", pair),  # right (the relation said the other way round)
        ("a red circle above a blue square", pair),  # both objects, the wrong relation
        ("a red circle to the left of a green square", pair),  # an object wrong
        ("three green triangles", count),
        ("a picture of 2 green triangles", count),  # the count wrong
        ("a green triangle", count),  # a single for a count scene: the wrong kind of scene
    ]
    captions, metas = [c for c, _ in judged], [m for _, m in judged]
    assert judge_caption(captions[0], single) == {"colour": True, "shape": True, "size": True, "position": True,
                                                  "all": True, "parsed": True, "scene": True}
    scores = caption_scores(captions, metas)
    assert scores["single/colour"] == 4 / 6 and scores["single/shape"] == 5 / 6
    assert scores["single/size"] == 1 / 2 and scores["single/size_named"] == 2 / 6  # among the captions naming it
    assert scores["single/position"] == 2 / 3 and scores["single/position_named"] == 3 / 6
    assert scores["single/all"] == 2 / 6 and scores["single/unparseable"] == 1 / 6 and scores["single/n"] == 6
    assert scores["pair/objects"] == 2 / 3 and scores["pair/relation"] == 1 / 3 and scores["pair/all"] == 1 / 3
    assert scores["count/count"] == 1 / 3 and scores["count/colour"] == 2 / 3 and scores["count/all"] == 1 / 3
    assert scores["all"] == 4 / 12 and scores["unparseable"] == 1 / 12 and scores["scene"] == 10 / 12
    assert unparseable(captions) == ["red red circle zzz"]
    table = caption_table({"val k=1": scores})
    assert "| single colour | 67% |" in table and "| pair relation | 33% |" in table and "| n | 12 |" in table
    with pytest.raises(ValueError, match="2 captions for 1 scenes; give one caption per scene"):
        caption_scores(captions[:2], metas[:1])


@pytest.mark.parametrize("call,message", [
    (lambda p, s, c: DallePipeline(*s).caption(torch.zeros(1, 3, 16, 16)),
     "this DALL-E pipeline has no captioner stage; load one with DallePipeline.from_pretrained(..., captioner=RUN_DIR)"),
    (lambda p, s, c: p.caption(torch.zeros(2, 3, 20, 20)),
     "the captioner reads 16x16 images (its dVAE's image_size), got an image tensor of 20x20; resize it"),
    (lambda p, s, c: DallePipeline(s[0], s[1], s[2], captioner=s[2]),
     "the captioner has order=text_first, but a pipeline's captioner must have order=image_first"),
    (lambda p, s, c: DallePipeline(s[0], s[1], c),
     "the transformer has order=image_first, but a pipeline's transformer must have order=text_first"),
    (lambda p, s, c: c.sample(s[0].tokenize(["a red circle"])),
     "sampling images for captions needs a transformer of order=text_first, but this one's is image_first (a "
     "captioner"),
    (lambda p, s, c: s[2].sample_captions(torch.zeros(1, 16, dtype=torch.long)),
     "sampling captions for images needs a transformer of order=image_first, but this one's is text_first"),
    (lambda p, s, c: p.caption(torch.zeros(1, 3, 16, 16), guidance_scale=3.0),
     "caption takes the settings ['temperature', 'top_k', 'top_p', 'rerank', 'max_batch'], not ['guidance_scale']"),
    (lambda p, s, c: p.caption(torch.zeros(1, 3, 16, 16), top_k=len(c.vocabulary) + 1),
     "top_k must be an int in [1, VOCAB] (the vocabulary size) or None, got VOCAB+1"),
    (lambda p, s, c: p.caption(torch.zeros(1, 3, 16, 16), n=0), "n must be a whole number >= 1, got 0"),
    (lambda p, s, c: tiny_transformer(s[0], s[1], order="sideways"),
     "order must be one of ('text_first', 'image_first') (text_first: images from captions, image_first: a "
     "captioner), got 'sideways'"),
])
def test_bad_input_is_an_error_naming_the_values(pipe, stages, captioner, call, message):
    size = len(captioner.vocabulary)  # the captioner's text vocabulary (special ids included) bounds top_k
    message = message.replace("VOCAB+1", str(size + 1)).replace("VOCAB", str(size))
    with pytest.raises(ValueError, match=re.escape(message)):
        call(pipe, stages, captioner)


def test_a_saved_captioner_keeps_its_order_and_a_transformer_saved_before_orders_loads_text_first(
        pipe, captioner, scenes, tmp_path):
    saved = save_stage(tmp_path / "captioner", captioner, stage="dalle", space=None)
    loaded = load_stage(saved, stage="dalle").model
    assert loaded.order == "image_first" and loaded.config["order"] == "image_first"
    old = {key: value for key, value in pipe.transformer.config.items() if key != "order"}
    assert build(old).order == "text_first"
    stages = save_dalle_stages(tmp_path / "stages")
    whole = DallePipeline.from_pretrained(**stages, captioner=saved, device="cpu")
    out = whole.save_pretrained(tmp_path / "pipe")
    assert json.loads((out / "pipeline.json").read_text())["stages"]["captioner"] == "captioner"
    again = DallePipeline.from_pretrained(out, device="cpu")
    images = scenes["image"]
    assert again.captioner.order == "image_first"
    assert again.caption(images, top_k=1) == whole.caption(images, top_k=1) == scenes["caption"]
    plain = DallePipeline.from_pretrained(**stages, device="cpu").save_pretrained(tmp_path / "plain")
    assert DallePipeline.from_pretrained(plain).captioner is None  # a pipeline saved without one has none ...
    joined = DallePipeline.from_config({"path": str(plain), "captioner": str(saved)}, device="cpu")
    assert joined.caption(images, top_k=1) == scenes["caption"]  # ... and a job's pipeline.captioner joins it


def test_the_clip_stages_decode_undoes_tokenize(stages, tmp_path):
    from test_clip_local import make_hf_clip

    from unclip.clip import HFClipEncoder

    captions = ["a small red circle on the left", "there are 3 blue squares", ""]
    hf = HFClipEncoder(str(make_hf_clip(tmp_path / "hf")))
    for clip in (stages[0], hf):
        tokens = clip.tokenize(captions)
        assert clip.decode(tokens) == captions
        assert clip.decode(tokens[:, 1:]) == captions  # without the start token, as a captioner's rows are
        assert clip.decode(tokens[:, :4].tolist()) == ["a small red", "there are 3", ""]  # no end token: all of it


def _job(args: list[str]) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


@pytest.mark.slow
def test_train_dalle_trains_a_captioner_that_train_caption_judges(tmp_path):
    stages = save_dalle_stages(tmp_path / "stages")
    run = tmp_path / "captioner"
    out = _job(["train/dalle.py", "dalle=captioner", "data.image_size=16", "data.pair_fraction=0.5",
                "data.val.length=16", "data.heldout.length=8", "trainer.batch_size=8", "trainer.max_steps=4",
                "trainer.warmup_steps=2", "trainer.progress=false", "trainer.preview_every=4", "dalle.width=32",
                "dalle.depth=1", "dalle.heads=2", "dalle.text_length=16", "vocabulary_items=64",
                "evaluation.val_items=8", "evaluation.sample_items=4", f"clip_checkpoint={stages['clip']}",
                f"dvae_checkpoint={stages['dvae']}", f"hydra.run.dir={run}"])
    metrics = json.loads(out.strip().splitlines()[-1])
    assert {"val_text_loss", "caption/all", "caption/unparseable", "caption/n"} <= set(metrics)
    assert "colour_shape_acc" not in metrics  # captions judged, not images
    assert load_stage(run, stage="dalle").model.order == "image_first"
    previews = sorted(run.glob("**/dalle-00000004.txt"))
    assert previews and len(previews[0].read_text().splitlines()) == 8
    judged = tmp_path / "judged"
    out = _job(["train/caption.py", f"pipeline.clip={stages['clip']}", f"pipeline.dvae={stages['dvae']}",
                f"pipeline.transformer={stages['transformer']}", f"pipeline.captioner={run}", "items.val=4",
                "items.pair=2", "items.heldout=2", "items.count=2", "rerank=[1,2]", f"hydra.run.dir={judged}"])
    assert "| check | val k=1 | val k=2 | heldout k=1 |" in out and "| n | 4 | 4 | 2 | 2 | 2 | 2 | 2 | 2 |" in out
    metrics = json.loads(out.strip().splitlines()[-1])
    assert {"val/k1/all", "pair/k2/pair/relation", "count/k1/count/count", "heldout/k2/unparseable"} <= set(metrics)
    assert len((judged / "captions.jsonl").read_text().splitlines()) == 2 * (4 + 2 + 2 + 2)
