"""Unconditional generation (``pipe.unconditional``) in both pipelines, and its judgement on ``shapes``
(``unclip.eval.unconditional``): valid scenes, attribute frequencies against the training data's."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from dalle_stages import save_dalle_stages
from PIL import Image
from stages import save_micro_pipeline

from unclip.data.shapes import ShapeObject, ShapesDataset, render
from unclip.eval.captions import CaptionsEvaluator
from unclip.eval.shapes import ShapesEvaluator
from unclip.eval.unconditional import (
    compare,
    read_scene,
    total_variation,
    training_captions,
    unconditional_metrics,
    unconditional_table,
)
from unclip.pipelines import DallePipeline, UnCLIPPipeline
from unclip.pipelines.base import caption_bank_scores
from unclip.prior import PassthroughPrior

FAST = dict(prior_steps=3, decoder_steps=3, upsampler_steps=2)
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    return save_micro_pipeline(tmp_path_factory.mktemp("stages"))


@pytest.fixture(scope="module")
def pipe(stages):
    return UnCLIPPipeline.from_pretrained(**stages, device="cpu")


@pytest.fixture(scope="module")
def dalle(tmp_path_factory):
    return DallePipeline.from_pretrained(**save_dalle_stages(tmp_path_factory.mktemp("dalle")), device="cpu")


@pytest.fixture(scope="module")
def training():
    return ShapesDataset("train", length=100_000, image_size=32, pair_fraction=0.2, count_fraction=0.1)


def _sizes(module, name: str, monkeypatch) -> list[int]:
    """The batch sizes ``module.<name>`` is called with, from now on."""
    sizes, original = [], getattr(module, name)
    monkeypatch.setattr(module, name, lambda first, *a, **kw: sizes.append(len(first)) or original(first, *a, **kw))
    return sizes


# -- the pipelines ---------------------------------------------------------------------------------------------
def test_unclip_unconditional_is_seeded_and_made_in_chunks_of_max_batch(pipe, monkeypatch):
    images = pipe.unconditional(3, seed=0, **FAST)
    assert len(images) == 3 and all(isinstance(i, Image.Image) and i.size == (32, 32) for i in images)
    a = pipe.unconditional(5, seed=1, output="tensor", **FAST)
    assert torch.equal(a, pipe.unconditional(5, seed=1, output="tensor", **FAST))
    assert not torch.equal(a, pipe.unconditional(5, seed=2, output="tensor", **FAST))
    assert not torch.equal(a[0], a[1])  # each sample its own noise
    decoded = _sizes(pipe.decoder, "sample", monkeypatch)
    chunked = pipe.unconditional(5, seed=1, output="tensor", max_batch=2, **FAST)
    assert chunked.shape == (5, 3, 32, 32) and decoded == [2, 2, 1]
    assert torch.equal(chunked[:2], pipe.unconditional(2, seed=1, output="tensor", max_batch=2, **FAST))


def test_unclip_unconditional_samples_the_priors_learned_null_and_decodes_without_a_caption(pipe, monkeypatch):
    # the prior's null: any caption dropped (guidance 0, one candidate) gives the same embeddings
    caption = pipe.clip.encode_text(["a red circle", "three blue squares"])
    dropped = pipe.prior.sample(caption, steps=3, guidance_scale=0.0, num_candidates=1,
                                generator=torch.Generator().manual_seed(0))
    null = pipe.prior.sample_unconditional(2, steps=3, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(null, dropped, atol=1e-5, rtol=0)
    assert torch.allclose(null.norm(dim=-1), torch.ones(2), atol=1e-4)
    captions = []
    sample = pipe.decoder.sample
    monkeypatch.setattr(pipe.decoder, "sample", lambda embed, text=None, **kw: captions.append(text) or
                        sample(embed, text, **kw))
    pipe.unconditional(2, seed=0, **FAST)
    assert captions == [None]  # the decoder's null caption


def test_dalle_unconditional_is_seeded_and_made_in_chunks_of_max_batch(dalle, monkeypatch):
    images = dalle.unconditional(3, seed=0)
    assert len(images) == 3 and all(isinstance(i, Image.Image) and i.size == (16, 16) for i in images)
    a = dalle.unconditional(5, seed=1, output="tensor")
    assert torch.equal(a, dalle.unconditional(5, seed=1, output="tensor"))
    assert not torch.equal(a, dalle.unconditional(5, seed=2, output="tensor"))
    drawn = _sizes(dalle.dvae, "decode", monkeypatch)
    chunked = dalle.unconditional(5, seed=1, output="tensor", max_batch=2)
    assert chunked.shape == (5, 3, 16, 16) and drawn == [2, 2, 1]
    assert torch.equal(chunked[:2], dalle.unconditional(2, seed=1, output="tensor", max_batch=2))
    # the null caption: all padding, whatever the CLIP's empty caption tokenizes to
    tokens = dalle.transformer.sample_unconditional(2, generator=torch.Generator().manual_seed(0))
    assert tokens.shape == (2, dalle.transformer.image_length)


BANK = ["a red circle", "a small blue square at the top", "a green triangle to the left of a red diamond",
        "three purple circles"]


def _record_ranking(monkeypatch) -> list:
    """(candidates, scores) of every ranked chunk of unconditional candidates, from now on."""
    import unclip.pipelines.base as base

    ranked, original = [], base.caption_bank_scores
    monkeypatch.setattr(base, "caption_bank_scores", lambda clip, images, bank: ranked.append(
        (images.clone(), original(clip, images, bank))) or ranked[-1][1])
    return ranked


def test_dalle_unconditional_rerank_keeps_of_every_k_candidates_the_one_a_bank_caption_describes_best(dalle):
    candidates = dalle.unconditional(6, seed=3, output="tensor")  # the same draws as 2 images x 3 candidates
    scores = caption_bank_scores(dalle.clip, candidates, dalle._caption_bank(BANK, 8))
    kept = dalle.unconditional(2, seed=3, rerank=3, captions=BANK, output="tensor")
    assert torch.equal(kept, candidates[scores.view(2, 3).argmax(dim=1) + torch.tensor([0, 3])])
    assert scores.view(2, 3).argmax(dim=1).tolist() != [0, 0]  # not the first candidates (the test can tell)
    # each score is the image's similarity to its best-matching caption of the bank (duplicates change nothing)
    embeds = dalle.clip.encode_image(candidates)
    bank = dalle.clip.encode_text(BANK).embed
    torch.testing.assert_close(scores, (embeds @ bank.T).max(dim=1).values, atol=1e-5, rtol=0)
    assert torch.equal(kept, dalle.unconditional(2, seed=3, rerank=3, captions=BANK * 2 + BANK[:1], output="tensor"))


def test_unclip_unconditional_rerank_ranks_before_the_upsamplers_and_in_parts_beyond_max_batch(pipe, monkeypatch):
    images = pipe.unconditional(2, seed=0, rerank=3, captions=BANK, output="tensor", **FAST)
    assert images.shape == (2, 3, 32, 32)
    assert torch.equal(images, pipe.unconditional(2, seed=0, rerank=3, captions=BANK, output="tensor", **FAST))
    ranked, upsampled = _record_ranking(monkeypatch), []
    monkeypatch.setattr(pipe, "_upsample", lambda low, config, generator: upsampled.append(low) or low * 0)
    pipe.unconditional(2, seed=0, rerank=3, captions=BANK, output="tensor", **FAST)
    [(candidates, scores)] = ranked  # all six candidates at the decoder's size, in one chunk
    assert candidates.shape == (6, 3, pipe.decoder.image_size, pipe.decoder.image_size)
    [low] = upsampled  # only the kept ones are upsampled
    assert torch.equal(low, candidates[scores.view(2, 3).argmax(dim=1) + torch.tensor([0, 3])])
    # a group larger than max_batch is ranked in parts, keeping the best so far: the same choice as at once
    ranked.clear(), upsampled.clear()
    pipe.unconditional(1, seed=5, rerank=3, captions=BANK, output="tensor", max_batch=2, **FAST)
    assert [len(c) for c, _ in ranked] == [2, 1]
    candidates = torch.cat([c for c, _ in ranked])
    assert torch.equal(upsampled[0][0], candidates[int(torch.cat([s for _, s in ranked]).argmax())])


def test_unclip_unconditional_prior_candidates_keep_the_prior_sample_a_bank_caption_describes_best(pipe, monkeypatch):
    drawn, decoded = [], []
    sample, decode = pipe.prior.sample_unconditional, pipe._decode
    monkeypatch.setattr(pipe.prior, "sample_unconditional", lambda n, **kw: drawn.append(sample(n, **kw)) or drawn[-1])
    monkeypatch.setattr(pipe, "_decode", lambda embeds, *a, **kw: decoded.append(embeds) or decode(embeds, *a, **kw))
    images = pipe.unconditional(2, seed=0, prior_candidates=3, captions=BANK, output="tensor", **FAST)
    assert images.shape == (2, 3, 32, 32)
    [embeds], [kept] = drawn, decoded  # 2 x 3 prior samples, 2 decoded
    scores = (embeds @ pipe._caption_bank(BANK, 8).T).max(dim=1).values.view(2, 3)
    assert torch.equal(kept, embeds[scores.argmax(dim=1) + torch.tensor([0, 3])])
    # the pipeline's own prior_candidates (for prompts) are not used without a bank, nor when not given with one
    drawn.clear(), decoded.clear()
    pipe.settings, before = pipe._settings({**FAST, "prior_candidates": 4}), pipe.settings
    try:
        pipe.unconditional(2, seed=0, output="tensor")
        pipe.unconditional(2, seed=0, rerank=2, captions=BANK, output="tensor")
    finally:
        pipe.settings = before
    assert [len(e) for e in drawn] == [2, 4]


@pytest.mark.parametrize("call,error,message", [
    (lambda p: p.unconditional(0), ValueError, "n must be a whole number >= 1, got 0"),
    (lambda p: p.unconditional(-2), ValueError, "n must be a whole number >= 1, got -2"),
    (lambda p: p.unconditional(2.5), ValueError, "n must be a whole number >= 1, got 2.5"),
    (lambda p: p.unconditional(["a red circle"]), TypeError,
     r"unconditional takes a number of images, not prompts \(got \['a red circle'\]\); .*generate\(prompts, n\)"),
    (lambda p: p.unconditional(2, prompts=["a red circle"]), TypeError, r"unknown generation settings \['prompts'\]"),
    (lambda p: p.unconditional(2, rerank=4), ValueError,
     r"no prompt to re-rank by, so rerank=4 needs a caption bank to compare with: captions=\[\.\.\.\]"),
    (lambda p: p.unconditional(2, rerank=0, captions=["a red circle"]), ValueError,
     "rerank must be a whole number >= 1, got 0"),
    (lambda p: p.unconditional(2, captions=["a red circle"]), ValueError, r"captions= .* needs rerank=k > 1"),
    (lambda p: p.unconditional(2, rerank=2, captions=["a red circle", " "]), ValueError,
     r"every prompt must be a non-empty string, got ' ' \(captions\)"),
    (lambda p: p.unconditional(2, output="png"), ValueError, "output must be one of"),
    (lambda p: p.generate(None), TypeError, r"got None; for images without a prompt, call unconditional\(n\)"),
])
@pytest.mark.parametrize("which", ["unclip", "dalle"])
def test_bad_requests_are_errors_naming_the_value(pipe, dalle, which, call, error, message):
    with pytest.raises(error, match=message):
        call(pipe if which == "unclip" else dalle)


def test_settings_that_need_a_prompt_or_untrained_nulls_are_refused_naming_them(pipe, dalle, monkeypatch):
    with pytest.raises(ValueError, match="prior_candidates=3 has nothing to act on"):
        pipe.unconditional(2, prior_candidates=3, **FAST)
    with pytest.raises(ValueError, match="guidance_scale=3.0 has nothing to act on"):
        dalle.unconditional(2, guidance_scale=3.0)
    assert dalle.unconditional(1, guidance_scale=None, rerank=1)  # the no-op values are fine
    with pytest.raises(ValueError, match=r"prior_candidates=3 has nothing to act on .*with a caption bank"):
        pipe.unconditional(2, rerank=2, prior_candidates=3, **FAST)
    passthrough = UnCLIPPipeline(clip=pipe.clip, prior=PassthroughPrior(), decoder=pipe.decoder)
    with pytest.raises(ValueError, match=r"the prior \(PassthroughPrior\) cannot sample without a prompt"):
        passthrough.unconditional(1)
    monkeypatch.setattr(pipe.prior, "cond_drop_prob", 0.0)
    with pytest.raises(ValueError, match=r"prior was trained without caption dropout \(cond_drop_prob=0\)"):
        pipe.unconditional(1, **FAST)
    monkeypatch.undo()
    monkeypatch.setattr(pipe.decoder, "caption_drop_prob", 0.0)
    with pytest.raises(ValueError, match=r"decoder was trained without caption dropout \(caption_drop_prob=0\)"):
        pipe.unconditional(1, **FAST)
    monkeypatch.setattr(dalle.transformer, "cond_drop_prob", 0.0)
    with pytest.raises(ValueError, match=r"transformer was trained without caption dropout \(cond_drop_prob=0\)"):
        dalle.unconditional(1)


# -- the judgement ---------------------------------------------------------------------------------------------
def test_real_scenes_are_read_as_valid_scenes_of_their_kind(training):
    for size in (32, 64):
        data = ShapesDataset("val", length=60, image_size=size, pair_fraction=0.3, count_fraction=0.3)
        items = [data[i] for i in range(len(data))]
        readings = [read_scene(item["image"]) for item in items]
        assert all(r.valid for r in readings), [r.reason for r in readings if not r.valid]
        assert [r.kind for r in readings] == [item["meta"]["scene"] for item in items]
        for reading, item in zip(readings, items):
            wanted = sorted((o["colour"], o["shape"], o["size"]) for o in item["meta"]["objects"])
            assert sorted((o.colour, o.shape, o.size) for o in reading.objects) == wanted
    readings = [read_scene(training[i]["image"]) for i in range(80)]
    metrics = compare(readings, readings, readings)
    assert metrics["unconditional/valid"] == 1.0 and metrics["unconditional/heldout"] == 0.0
    assert all(metrics[f"unconditional/tv/{a}"] == 0 for a in ("scene", "colour", "shape", "colour_shape"))


def _scene(*objects) -> Image.Image:
    return render([ShapeObject(c, s, size, pos, centre) for c, s, size, pos, centre in objects], 32)


@pytest.mark.parametrize("image,reason", [
    (Image.new("RGB", (32, 32), "white"), "empty"),
    (Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)), "empty"),
    (_scene(("red", "circle", "large", "left", (0.3, 0.5))), "placement"),  # large objects stand at the centre
    (_scene(("red", "circle", "small", "left", (0.25, 0.5)), ("red", "square", "small", "right", (0.75, 0.5))),
     "pair"),  # a pair's objects differ in colour
    (_scene(("red", "circle", "small", "top left", (0.25, 0.25)), ("red", "square", "small", "top right",
                                                                    (0.75, 0.25))), "count"),  # one shape in a count
    (_scene(*[("blue", "circle", "small", "centre", c) for c in ((0.25, 0.25), (0.75, 0.25), (0.25, 0.75),
                                                                 (0.75, 0.75), (0.5, 0.5))]), "objects"),  # 5
])
def test_what_no_scene_of_the_data_set_looks_like_is_invalid_with_its_reason(image, reason):
    reading = read_scene(image)
    assert not reading.valid and reading.kind is None and reading.reason == reason


def test_ink_off_the_objects_makes_a_scene_invalid():
    image = np.asarray(_scene(("green", "square", "small", "left", (0.25, 0.5)))).copy()
    assert read_scene(Image.fromarray(image)).valid
    image[2:30, 28:30] = 0  # a black bar the judge does not take for an object
    reading = read_scene(Image.fromarray(image))
    assert not reading.valid and reading.reason == "stray_ink"


def test_a_skewed_set_is_far_in_the_attribute_it_skews_and_heldout_compositions_are_counted(training):
    reference = [read_scene(training[i]["image"]) for i in range(200)]
    floor = [read_scene(training[i]["image"]) for i in range(200, 300)]
    circles = [read_scene(_scene((c, "circle", "small", "top", (0.5, 0.25))))
               for c in ("red", "blue", "green", "yellow", "pink") * 8]
    metrics = compare(circles, reference, floor)
    assert metrics["unconditional/tv/shape"] > 0.6 and metrics["unconditional/floor/tv/shape"] < 0.15
    assert metrics["unconditional/tv/shape"] > 2 * metrics["unconditional/tv/colour"]
    assert metrics["unconditional/scene/single"] == 1.0 and metrics["unconditional/tv/scene"] > 0.2
    assert metrics["unconditional/tv/position"] > 0.8  # all at the top
    assert metrics["unconditional/heldout"] == 0.0
    heldout = [read_scene(_scene(("purple", "triangle", "large", "centre", (0.5, 0.5))))] * 3 + circles[:1]
    assert compare(heldout, reference, floor)["unconditional/heldout"] == 0.75
    assert total_variation({"a": 1}, {"b": 3}) == 1.0 and total_variation({}, {}) == 0.0


def test_unconditional_metrics_compare_with_two_training_draws_and_print_a_table(training):
    samples = [training[50_000 + i]["image"] for i in range(24)] + [torch.ones(3, 32, 32)] * 8  # 8 blank
    metrics = unconditional_metrics(samples, training, reference=48)
    assert metrics["unconditional/n"] == 32 and metrics["unconditional/floor_n"] == 32
    assert metrics["unconditional/valid"] == 0.75 and metrics["unconditional/invalid/empty"] == 0.25
    assert metrics["unconditional/floor/valid"] == metrics["unconditional/reference/valid"] == 1.0
    assert metrics["unconditional/tv/scene"] >= 0.25  # the blank ones are "invalid" scenes
    assert metrics["unconditional/shuffled/tv/colour"] == metrics["unconditional/floor/tv/colour"]
    table = unconditional_table(metrics)
    assert "| valid scenes | 0.750 | 1.000 | 1.000 |" in table and "| colour x shape |" in table
    with pytest.raises(ValueError, match="got no unconditional samples"):
        unconditional_metrics([], training)
    with pytest.raises(ValueError, match="the training data has 10 items, fewer than the 48 \\+ 32"):
        unconditional_metrics(samples, ShapesDataset("train", length=10, image_size=32), reference=48)


def test_the_evaluators_judge_a_pipelines_samples_or_say_why_not(pipe, dalle, training):
    evaluator = ShapesEvaluator(splits={}, train=training)
    metrics = evaluator.unconditional_metrics(dalle, 4, reference=8)
    assert metrics["unconditional/n"] == 4 and "unconditional/tv/colour_shape" in metrics
    assert "| TV distance to the training reference |" in evaluator.summary(metrics)
    with pytest.raises(ValueError, match=r"built without its training split \(train=\)"):
        ShapesEvaluator(splits={}).unconditional_metrics(dalle, 4)
    ranked = evaluator.unconditional_metrics(dalle, 4, reference=8, rerank=2, captions=40)
    assert ranked["unconditional/rerank"] == 2 and 1 < ranked["unconditional/bank_captions"] <= 40
    assert "each the best of 2 by a bank of" in evaluator.summary(ranked)
    pipe.settings, before = pipe._settings(FAST), pipe.settings
    try:
        ranked = evaluator.unconditional_metrics(pipe, 2, reference=8, prior_candidates=2, captions=20)
    finally:
        pipe.settings = before
    assert (ranked["unconditional/rerank"], ranked["unconditional/prior_candidates"]) == (1, 2)
    assert "each its image embedding the best of 2 prior samples by a bank of" in evaluator.summary(ranked)
    bank = training_captions(training, 40, seed=0)
    assert len(bank) == 40 and bank == training_captions(training, 40, seed=0) != training_captions(training, 40, 1)
    with pytest.raises(ValueError, match="the training data has 10 items, fewer than the 40 captions"):
        training_captions(ShapesDataset("train", length=10, image_size=32), 40)
    with pytest.raises(NotImplementedError, match="CaptionsEvaluator cannot judge unconditional samples"):
        CaptionsEvaluator(splits={}, pipeline_items={}).unconditional_metrics(pipe, 4)


# -- the jobs --------------------------------------------------------------------------------------------------
def test_sample_job_draws_unconditional_samples(pipe, tmp_path):
    spec = importlib.util.spec_from_file_location("sample_job", ROOT / "train" / "sample.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    config = dict(mode="generate", num_images_per_prompt=4, seed=0, rerank=None, image=None, mask=None, strength=0.6,
                  negative_prompt=None, jumps=None, mix=[], unconditional=3)
    job.check_request(config, ["a red circle"])
    before, pipe.settings = pipe.settings, pipe._settings(FAST)
    try:
        images, made_by = job.sample(pipe, config, ["a red circle"])
        grid = job.write_samples(tmp_path, pipe, images, made_by, config)
    finally:
        pipe.settings = before
    records = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert [(r["prompt"], r["mode"], r["rerank"]) for r in records] == [(None, "unconditional", 1)] * 3
    assert Image.open(tmp_path / records[0]["file"]).size == (32, 32) and Image.open(grid).size[0] > 3 * 32
    for bad, shown in (({"mode": "variations"}, "mode=variations"),
                       ({"rerank": 4}, r"rerank=4, prior_candidates=None need captions_file=<a caption bank"),
                       ({"prior_candidates": 3}, r"rerank=None, prior_candidates=3 need captions_file="),
                       ({"prior_candidates": 0}, "prior_candidates must be a whole number >= 1, got 0"),
                       ({"rerank": 0, "captions_file": "x"}, "rerank must be a whole number >= 1, got 0"),
                       ({"unconditional": -1}, "unconditional must be a whole number >= 1, got -1")):
        with pytest.raises(ValueError, match=shown):
            job.check_request({**config, **bad}, [])
    with pytest.raises(FileNotFoundError, match=r"captions_file=.*nowhere.txt does not exist"):
        job.check_request({**config, "rerank": 2, "captions_file": str(tmp_path / "nowhere.txt")}, [])
    # re-ranked by a caption bank from a file: each image the best of 2
    bank = tmp_path / "captions.txt"
    bank.write_text("a red circle\n\nthree blue squares\n")
    ranked = {**config, "rerank": 2, "prior_candidates": 3, "captions_file": str(bank), "unconditional": 2}
    job.check_request(ranked, [])
    seen = []
    original = pipe.unconditional
    pipe.unconditional = lambda n, **kw: seen.append(kw) or original(n, **kw)
    try:
        pipe.settings = pipe._settings(FAST)
        images, made_by = job.sample(pipe, ranked, [])
        job.write_samples(tmp_path / "ranked", pipe, images, made_by, ranked)
    finally:
        pipe.settings = before
        del pipe.unconditional
    assert seen == [{"rerank": 2, "captions": ["a red circle", "three blue squares"], "prior_candidates": 3,
                     "seed": 0}] and len(images) == 2
    records = [json.loads(line) for line in (tmp_path / "ranked" / "samples.jsonl").read_text().splitlines()]
    assert [r["rerank"] for r in records] == [2, 2]
