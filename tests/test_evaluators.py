"""The data set decides how it is evaluated: the evaluator a data config names, stage by stage."""

from types import SimpleNamespace

import pytest
import torch
from conftest import CONF
from hydra import compose, initialize_config_dir
from stages import micro_stages

from unclip.clip.evaluation import embed_images, embed_texts, retrieval_recall
from unclip.data.shapes import ShapesDataset
from unclip.eval.captions import CaptionsEvaluator
from unclip.eval.shapes import SAMPLE_PROMPTS, ShapesEvaluator
from unclip.pipelines import GenerationSettings, UnCLIPPipeline

COLOURS = ("red", "green", "blue")


class TemplateCaptions(torch.utils.data.Dataset):
    """Flat colour images captioned by a template: 4 images share each caption ("a red image")."""

    def __len__(self):
        return 12

    def __getitem__(self, i):
        image = -torch.ones(3, 8, 8)
        image[i % 3] = 1.0
        return {"image": image, "caption": f"a {COLOURS[i % 3]} image", "meta": {}}


class ColourClip:
    """A CLIP that sees only colour: the image's brightest channel, the caption's colour word."""

    device = torch.device("cpu")

    def encode_image(self, images):
        return torch.nn.functional.one_hot(images.mean((2, 3)).argmax(1), 3).float()

    def encode_text(self, texts):
        index = torch.tensor([next(i for i, c in enumerate(COLOURS) if c in t) for t in texts])
        return SimpleNamespace(embed=torch.nn.functional.one_hot(index, 3).float())


def test_retrieval_on_template_captions_counts_identical_captions_as_one_class():
    data, clip = TemplateCaptions(), ColourClip()
    metrics = CaptionsEvaluator({"val": data}).clip_metrics(clip)
    assert metrics["image_to_text_R@1_val"] == metrics["text_to_image_R@1_val"] == 1.0
    # item by item (each image's own caption the only right one), a perfect CLIP scored far below that
    images = torch.stack([data[i]["image"] for i in range(12)])
    captions = [data[i]["caption"] for i in range(12)]
    per_item = retrieval_recall(embed_images(clip, images), embed_texts(clip, captions))
    assert per_item["image_to_text_R@1"] < 0.5


def test_the_prior_is_scored_by_the_label_the_evaluator_gives():
    shapes = ShapesEvaluator({"val": ShapesDataset(split="val", length=4)})
    meta = {"scene": "single", "objects": [{"colour": "red", "shape": "circle"}]}
    assert shapes.prior_label(meta, "a large red circle at the top") == ("red", "circle")
    assert shapes.prior_label({"scene": "pair"}, "a red circle left of a blue square") is None
    assert CaptionsEvaluator({"val": TemplateCaptions()}).prior_label({}, "a red image") == "a red image"


def test_decoded_images_are_judged_by_pixels_on_shapes_and_by_clip_elsewhere():
    clip, _, decoder, _ = micro_stages()
    shapes = ShapesEvaluator({"val": ShapesDataset(split="val", length=4, image_size=32)})
    captions = CaptionsEvaluator({"val": TemplateCaptions()})
    settings = dict(guidance_scales=[3.0], steps=2)
    by_pixels = shapes.decoder_metrics(decoder, clip, {"val": 4, "heldout": 2}, **settings)
    assert set(by_pixels) == {"colour_acc_g3_val", "shape_acc_g3_val", "colour_shape_acc_g3_val",
                              "found_one_object_g3_val"}  # heldout: not one of this evaluator's splits
    by_clip = captions.decoder_metrics(decoder, clip, {"val": 4}, **settings)
    assert set(by_clip) == {"image_cosine_g3_val", "shuffled_image_cosine_g3_val", "clip_score_g3_val",
                            "shuffled_clip_score_g3_val"}


def test_pipeline_metrics_and_sample_prompts_follow_the_data(tmp_path):
    clip, prior, decoder, upsampler = micro_stages()
    pipe = UnCLIPPipeline(clip=clip, prior=prior, decoder=decoder, upsamplers=[upsampler],
                          settings=GenerationSettings(prior_steps=2, decoder_steps=2, upsampler_steps=2))
    shapes = ShapesEvaluator({"val": ShapesDataset(split="val", length=4)},
                             pipeline_items={"val": 2, "heldout": 1, "pair": 1, "edits": 1})
    metrics = shapes.pipeline_metrics(pipe, seed=0, prefix="p_")
    assert {"p_val_colour_shape_acc", "p_heldout_colour_shape_acc", "p_pair_pair_acc",
            "p_variations_keep_colour_shape", "p_interpolate_ends_right", "p_text_diff_0.5_blue_circle"} <= set(metrics)
    assert not any("variations" in key for key in shapes.pipeline_metrics(pipe, seed=0, edits=False))
    assert not any(key.startswith("fidelity") for key in metrics)  # not asked for
    balanced = ShapesEvaluator({"val": ShapesDataset(split="val", length=4)},
                               pipeline_items={"fidelity": {"val": 6, "pair": 4}})
    metrics = balanced.pipeline_metrics(pipe, seed=0)
    assert metrics["fidelity/val/n"] == 6 and metrics["fidelity/pair/n"] == 4
    assert {f"fidelity/val/position={p}" for p in ("top", "bottom", "left", "right", "centre")} <= set(metrics)
    assert {"fidelity/pair/relation", "fidelity_variations/val/position", "fidelity_variations/pair/all"} <= set(metrics)
    summary = balanced.summary(metrics)
    assert "text to image" in summary and "decoded true embeddings" in summary and "val position:" in summary
    assert not any(k.startswith("fidelity") for k in balanced.pipeline_metrics(pipe, seed=0, fidelity=False))
    fewer_decoded = ShapesEvaluator({"val": ShapesDataset(split="val", length=4)},
                                    pipeline_items={"fidelity": {"val": 6}, "fidelity_variations": {"val": 3, "pair": 2}})
    metrics = fewer_decoded.pipeline_metrics(pipe, seed=0)
    assert metrics["fidelity/val/n"] == 6 and "fidelity/pair/n" not in metrics
    assert metrics["fidelity_variations/val/n"] == 3 and metrics["fidelity_variations/pair/n"] == 2
    only_decoded = ShapesEvaluator({"val": ShapesDataset(split="val", length=4)},
                                   pipeline_items={"fidelity_variations": {"val": 2}}).pipeline_metrics(pipe, seed=0)
    assert only_decoded["fidelity_variations/val/n"] == 2 and not any(k.startswith("fidelity/") for k in only_decoded)
    assert shapes.sample_prompts() == list(SAMPLE_PROMPTS)
    captions = CaptionsEvaluator({"val": TemplateCaptions()}, pipeline_items={"val": 4, "heldout": 3})
    assert set(captions.pipeline_metrics(pipe, seed=0)) == {
        "val_image_cosine", "val_shuffled_image_cosine", "val_clip_score", "val_shuffled_clip_score"}
    assert captions.sample_prompts() == ["a red image", "a green image", "a blue image"]  # its captions, each once


def test_the_pipeline_evaluation_names_what_it_has_when_asked_for_what_it_has_not():
    val = {"val": ShapesDataset(split="val", length=4)}
    with pytest.raises(ValueError, match=r"\['val', 'heldout', 'pair', 'edits', 'fidelity', 'fidelity_variations'\], not \['train'\]"):
        ShapesEvaluator(val, pipeline_items={"train": 4})
    with pytest.raises(ValueError, match=r"the balanced prompt set has the splits \['val', 'heldout', 'pair', 'pair_heldout', "
                                         r"'pair_mixed', 'count', 'count_heldout'\], not \['test'\]"):
        ShapesEvaluator(val, pipeline_items={"fidelity": {"test": 4}})
    with pytest.raises(ValueError, match=r"the balanced prompt set has the splits \['val', 'heldout', 'pair', 'pair_heldout', "
                                         r"'pair_mixed', 'count', 'count_heldout'\], not \['test'\]"):
        ShapesEvaluator(val, pipeline_items={"fidelity_variations": {"test": 4}})


def test_prompts_outside_the_vocabulary_generate_and_are_reported_not_counted():
    clip, prior, decoder, upsampler = micro_stages()
    pipe = UnCLIPPipeline(clip=clip, prior=prior, decoder=decoder, upsamplers=[upsampler],
                          settings=GenerationSettings(prior_steps=2, decoder_steps=2, upsampler_steps=2))
    prompts = ["a violet hexagon", "a small red circle at the top"]
    images = pipe.generate(prompts, seed=0)
    assert len(images) == 2
    metrics = ShapesEvaluator({"val": ShapesDataset(split="val", length=4)}).prompt_metrics(images, prompts)
    assert metrics["grid/out_of_vocabulary"] == ["a violet hexagon"]
    assert metrics["grid/n"] == 1 and "grid/position=top" in metrics  # the other prompt, judged


def test_count_prompts_outside_two_to_four_generate_and_are_reported_not_counted():
    """Issue 28's bad input: "five red circles" is drawn, then listed as outside the vocabulary; "three red circles"
    is judged as a count scene."""
    clip, prior, decoder, upsampler = micro_stages()
    pipe = UnCLIPPipeline(clip=clip, prior=prior, decoder=decoder, upsamplers=[upsampler],
                          settings=GenerationSettings(prior_steps=2, decoder_steps=2, upsampler_steps=2))
    prompts = ["five red circles", "three red circles", "1 red circle"]
    images = pipe.generate(prompts, seed=0)
    assert len(images) == 3
    metrics = ShapesEvaluator({"val": ShapesDataset(split="val", length=4)}).prompt_metrics(images, prompts)
    assert metrics["grid/out_of_vocabulary"] == ["five red circles", "1 red circle"]
    assert metrics["grid/n"] == 1 and metrics["grid/n/count=3"] == 1 and "grid/count" in metrics


def test_the_balanced_set_reports_counts_held_out_pairs_and_genevals_categories():
    clip, prior, decoder, upsampler = micro_stages()
    pipe = UnCLIPPipeline(clip=clip, prior=prior, decoder=decoder, upsamplers=[upsampler],
                          settings=GenerationSettings(prior_steps=2, decoder_steps=2, upsampler_steps=2))
    items = {"val": 6, "pair": 4, "pair_heldout": 4, "pair_mixed": 4, "count": 3, "count_heldout": 3}
    evaluator = ShapesEvaluator({"val": ShapesDataset(split="val", length=4)}, pipeline_items={"fidelity": items})
    metrics = evaluator.pipeline_metrics(pipe, seed=0, prefix="p_", edits=False)
    for split, n in items.items():
        assert metrics[f"p_fidelity/{split}/n"] == n
    assert {"p_fidelity/count/count=2", "p_fidelity/count_heldout/count=4/all", "p_fidelity/pair_mixed/objects",
            "p_fidelity/pair_heldout/shapes"} <= set(metrics)
    categories = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
    assert metrics["p_fidelity/count/all"] == metrics["p_geneval/counting"]
    assert metrics["p_geneval/overall"] == pytest.approx(sum(metrics[f"p_geneval/{c}"] for c in categories) / 6)
    summary = evaluator.summary({**metrics, "generator": "unclip"}, prefix="p_")
    assert "count_heldout" in summary and "pair_heldout" in summary
    assert "| unclip (shapes, the pixel judge) |" in summary and "| DALL-E 2 (published) | 0.52 | 0.94 |" in summary


class _AttributeClip:
    """A stand-in CLIP that embeds what a shapes image shows (judged from its pixels) and what a caption says, as
    counts of (colour, shape, position) triples: ``bound=False`` forgets which shape went with which colour (and
    place), but not which colour is where."""

    def __init__(self, bound: bool):
        from unclip.data.shapes import COLOURS, POSITIONS, SHAPES

        self.bound = bound
        self.index = {key: i for i, key in enumerate((c, s, p) for c in COLOURS for s in SHAPES for p in POSITIONS)}

    def _embed(self, triples):
        vector = torch.zeros(len(self.index))
        if not self.bound:  # every colour with every shape of the scene
            triples = [(c, s, p) for c, _, p in triples for _, s, _ in triples]
        for triple in triples:
            vector[self.index[triple]] += 1
        return vector

    def encode_image(self, images):
        from unclip.eval.judge import judge_batch

        return torch.stack([self._embed([(o.colour, o.shape, o.position) for o in j.objects]) for j in judge_batch(images)])

    def encode_text(self, captions):
        from unclip.data.shapes import pair_position, parse_caption

        rows = []
        for caption in captions:
            meta = parse_caption(caption)
            places = pair_position(meta["relation"])
            rows.append(self._embed([(o["colour"], o["shape"], p) for o, p in zip(meta["objects"], places)]))
        return SimpleNamespace(embed=torch.stack(rows))


def test_clip_binding_counts_a_pair_right_only_when_its_caption_beats_every_swapped_twin():
    from unclip.eval.clip_shapes import binding_captions, binding_inputs, binding_metrics
    from unclip.eval.prompt_set import balanced_scenes

    scenes = balanced_scenes({"pair": 8})["pair"]
    caption, colours, shapes, order = binding_captions(scenes[0], seed=0)
    (a, b), relation = scenes[0].objects, scenes[0].meta["relation"]
    assert (a.colour, a.shape, b.colour, b.shape) == tuple(
        v for o in parse(caption)["objects"] for v in (o["colour"], o["shape"]))
    assert [(o["colour"], o["shape"]) for o in parse(colours)["objects"]] == [(b.colour, a.shape), (a.colour, b.shape)]
    assert [(o["colour"], o["shape"]) for o in parse(shapes)["objects"]] == [(a.colour, b.shape), (b.colour, a.shape)]
    assert [(o["colour"], o["shape"]) for o in parse(order)["objects"]] == [(b.colour, b.shape), (a.colour, a.shape)]
    assert parse(order)["relation"] == relation  # the same words, the objects named the other way round

    bound = binding_metrics(_AttributeClip(bound=True), *binding_inputs(scenes, 64))
    assert bound["pair_binding"] == 1.0 and bound["pair_binding_beats_order_reversed"] == 1.0
    unbound = binding_metrics(_AttributeClip(bound=False), *binding_inputs(scenes, 64))
    assert unbound["pair_binding_beats_shapes_swapped"] == 0.0  # a tie with the twin is not a win
    assert unbound["pair_binding_beats_colours_swapped"] == unbound["pair_binding_beats_order_reversed"] == 1.0
    one_shape = [s for s in scenes if s.objects[0].shape == s.objects[1].shape]  # no shapes-swapped twin to lose to
    assert 0 < len(one_shape) < len(scenes) and unbound["pair_binding"] == len(one_shape) / len(scenes)


def parse(caption):
    from unclip.data.shapes import parse_caption

    return parse_caption(caption)


def test_a_dalle_pipeline_is_evaluated_on_captioned_data_and_on_shapes_without_the_edits_it_cannot_make():
    """`train/evaluate.py pipeline=dalle data=folder ...`: the captions' CLIP agreement (the evaluator scores under the
    pipeline's precision, which DallePipeline has too), and on shapes only what it supports (no variations)."""
    from dalle_stages import dalle_stages

    from unclip.pipelines import DallePipeline

    pipe = DallePipeline(*dalle_stages())
    captions = CaptionsEvaluator({"val": TemplateCaptions()}, pipeline_items={"val": 4})
    metrics = captions.pipeline_metrics(pipe, seed=0)
    assert set(metrics) == {"val_image_cosine", "val_shuffled_image_cosine", "val_clip_score", "val_shuffled_clip_score"}
    assert all(-1 <= value <= 1 for value in metrics.values())
    shapes = ShapesEvaluator({"val": ShapesDataset(split="val", length=4, image_size=16)},
                             pipeline_items={"val": 2, "edits": 1, "fidelity": {"val": 6}})
    metrics = shapes.pipeline_metrics(pipe, seed=0)  # edits=True asked, but a DALL-E pipeline makes no edits
    assert "val_colour_shape_acc" in metrics and metrics["fidelity/val/n"] == 6
    assert not any("variations" in key or "interpolate" in key or "text_diff" in key for key in metrics)
    counted = ShapesEvaluator({"val": ShapesDataset(split="val", length=4, image_size=16)},
                              pipeline_items={"fidelity": {"val": 3, "pair": 2, "count": 3}})
    metrics = counted.pipeline_metrics(pipe, seed=0)  # GenEval's categories for DALL-E 1 too
    assert {f"geneval/{c}" for c in ("single_object", "two_object", "counting", "colors", "position", "color_attr",
                                     "overall")} <= set(metrics)
    assert "| dalle (shapes, the pixel judge) |" in counted.summary({**metrics, "generator": "dalle"})


def test_the_decoder_stage_evaluates_with_the_generation_sampler(monkeypatch):
    # train/decoder.py's evaluation and previews sample as the pipeline will (generation.decoder_sampler / _spacing),
    # not DDIM regardless: a decoder trained for DPM-Solver++ at 10 steps is judged at what it will be used with.
    clip, _, decoder, _ = micro_stages()
    calls = []
    original = type(decoder).sample

    def spy(self, *args, **kwargs):
        calls.append((kwargs["sampler"], kwargs["spacing"], kwargs["steps"]))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(decoder), "sample", spy)
    shapes = ShapesEvaluator({"val": ShapesDataset(split="val", length=2, image_size=32)})
    shapes.decoder_metrics(decoder, clip, {"val": 2}, guidance_scales=[3.0], steps=3, sampler="dpmpp_2m",
                           spacing="karras")
    assert calls == [("dpmpp_2m", "karras", 3)]
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        for job, key in (("train_decoder", "decoder"), ("train_upsampler", "upsampler")):
            cfg = compose(config_name=job, overrides=[f"generation.{key}_sampler=dpmpp_2s",
                                                      f"generation.{key}_spacing=karras"])
            assert (cfg.evaluation.sampler, cfg.evaluation.spacing) == ("dpmpp_2s", "karras")
