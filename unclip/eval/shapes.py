"""How `shapes` is evaluated: every stage judged from the pixels (unclip.eval.judge) or by class."""

from __future__ import annotations

from functools import cached_property

import torch

from unclip.configurable import register
from unclip.data.shapes import DEFAULT_HELDOUT
from unclip.eval.clip_shapes import ShapesClipEvaluator
from unclip.eval.decoder import psnr
from unclip.eval.evaluator import DataEvaluator
from unclip.eval.judge import judge_batch, score
from unclip.eval.pipeline import evaluate_edits, evaluate_on_shapes, shapes_prompt_sets
from unclip.eval.prompt_set import (
    balanced_scenes,
    format_table,
    geneval_scores,
    geneval_table,
    judge_prompts,
    judge_scene,
    text_to_image_fidelity,
    variations_fidelity,
)
from unclip.eval.unconditional import training_captions, unconditional_metrics, unconditional_table
from unclip.images import from_pil, resize

# The demo's sample grid: training compositions, held-out ones (purple triangle, orange circle, ...), pair scenes.
SAMPLE_PROMPTS = (
    "a red circle",
    "a large blue square in the middle",
    "a small green triangle at the top",
    "there is a yellow diamond on the left",
    "a purple triangle",
    "an orange circle",
    "a cyan square at the bottom",
    "a small pink diamond on the right",
    "a red circle to the left of a blue square",
    "a green triangle above a yellow circle",
    "a purple triangle to the right of an orange circle",  # two held-out compositions in one scene
    "three blue squares",
)
# What pipeline_items may name: the caption-like prompt sets (val, heldout, pair), the edits' images, the
# balanced prompt set's scenes per split (fidelity: {val, heldout, pair, pair_heldout, pair_mixed, count,
# count_heldout}; unclip.eval.prompt_set) and, where they should differ, those whose true image embeddings are decoded
# (fidelity_variations; default: fidelity's).
# the balanced set's splits whose images the distribution metrics compare (FID depends on the count: the splits added
# later, pairs of held-out objects and count scenes, are left out so that the numbers stay comparable with older runs)
DISTRIBUTION_SPLITS = ("val", "heldout", "pair")
EDITS = ("decode", "variations", "interpolate", "text_diff")  # what the edits' evaluation asks the pipeline for
PIPELINE_ITEMS = ("val", "heldout", "pair", "edits", "fidelity", "fidelity_variations")
DEFAULT_PIPELINE_ITEMS = {"val": 64, "heldout": 32, "pair": 32, "edits": 8,
                          "fidelity": {"val": 120, "heldout": 48, "pair": 48, "pair_heldout": 24, "pair_mixed": 24,
                                       "count": 36, "count_heldout": 24}}


@register
class ShapesEvaluator(DataEvaluator):
    """CLIP: zero-shot colour x shape classification and retrieval; prior: retrieval of an image of the
    prompt's colour and shape; decoder and pipeline: the pixel judge's accuracies (pipeline: on prompt sets
    of their own, ``val``, ``heldout`` and ``pair``, plus ``edits`` variations, interpolations, text diffs)."""

    retrieval_kind = "colour_shape"

    def __init__(self, splits: dict, pipeline_items: dict | None = None, clip_items: int = 512,
                 prompts: list[str] | None = None, metrics: dict | None = None, train=None):
        pipeline_items = dict(DEFAULT_PIPELINE_ITEMS if pipeline_items is None else pipeline_items)
        unknown = sorted(set(pipeline_items) - set(PIPELINE_ITEMS))
        if unknown:
            raise ValueError(f"shapes evaluates the pipeline on {list(PIPELINE_ITEMS)}, not {unknown}")
        for key in ("fidelity", "fidelity_variations"):
            if pipeline_items.get(key):
                balanced_scenes(dict(pipeline_items[key]))  # a split it does not have is an error now, not later
        super().__init__(splits, pipeline_items, clip_items, metrics)
        self.prompts = list(prompts or SAMPLE_PROMPTS)
        self.train = train  # the training split (a ShapesDataset): what unconditional samples are compared with

    @cached_property
    def _clip_evaluator(self) -> ShapesClipEvaluator:
        return ShapesClipEvaluator(self.splits, max_items=self.clip_items)

    def clip_metrics(self, encoder) -> dict:
        return self._clip_evaluator(encoder)

    def prior_label(self, meta: dict | None, caption: str):
        if not meta or meta.get("scene") != "single":
            return None
        obj = meta["objects"][0]
        return obj["colour"], obj["shape"]

    def score_decoded(self, samples: torch.Tensor, batch: dict, clip) -> dict:
        judged = score(judge_batch(samples), batch["meta"])
        metrics = {key: judged[key] for key in ("colour_acc", "shape_acc", "colour_shape_acc") if key in judged}
        metrics["found_one_object"] = judged.get("count_acc", float("nan"))
        return metrics

    @cached_property
    def _prompt_sets(self) -> dict:
        return shapes_prompt_sets(self.pipeline_items)

    def pipeline_metrics(self, pipe, *, seed: int, prefix: str = "", edits: bool = True,
                         fidelity: bool = True) -> dict:
        """Text-to-image accuracy on the prompt sets; (``fidelity``) the balanced prompt set per attribute value,
        text to image (``fidelity/<split>/...``; GenEval's categories read off it, ``geneval/<category>``,
        :func:`unclip.eval.prompt_set.geneval_scores`) and (with ``edits``) decoded from the true image embeddings
        (``fidelity_variations/<split>/...``, on ``pipeline_items["fidelity_variations"]`` scenes where given); then
        (``edits``; they do not use the prior) variations, interpolation and text diffs of ``pipeline_items["edits"]``
        val images. Edits are skipped where the pipeline cannot make them (``pipe.supports``: DALL-E only
        generates)."""
        edits = edits and pipe.supports(*EDITS)
        sets = self._prompt_sets
        metrics = evaluate_on_shapes(pipe, sets, seed=seed, prefix=prefix)
        prompted = self.pipeline_items.get("fidelity")
        decoded = self.pipeline_items.get("fidelity_variations") or prompted
        if fidelity and prompted:
            scenes, images = balanced_scenes(dict(prompted), seed=seed), {}
            metrics.update(text_to_image_fidelity(pipe, scenes, seed=seed, prefix=f"{prefix}fidelity/", images_out=images))
            scores = geneval_scores(metrics, prefix=f"{prefix}fidelity/")
            metrics.update({f"{prefix}geneval/{category}": value for category, value in scores.items()})
            metrics.update(self._balanced_distribution(pipe, scenes, images, seed=seed, prefix=prefix))
        if fidelity and edits and decoded:
            scenes = balanced_scenes(dict(decoded), seed=seed)
            metrics.update(variations_fidelity(pipe, scenes, seed=seed, prefix=f"{prefix}fidelity_variations/"))
        k = self.pipeline_items.get("edits", 0)
        if edits and k and "val" in sets:
            edited = evaluate_edits(pipe, sets["val"]["images"][:k], sets["val"]["metas"][:k], seed=seed)
            metrics.update({f"{prefix}{key}": value for key, value in edited.items()})
        return metrics

    def _balanced_distribution(self, pipe, scenes: dict, images: dict, *, seed: int, prefix: str) -> dict:
        """``<prefix>distribution/...``: the balanced set's generated images (the splits of ``DISTRIBUTION_SPLITS``
        together) against the renders of their scenes, calibrated against the renders of another draw of the same
        set; CLIP score to the prompts."""
        if self.metrics is None:
            return {}
        ordered = [split for split in scenes if split in images and split in DISTRIBUTION_SPLITS]
        if not ordered:
            return {}
        size = pipe.image_size
        generated = from_pil([image for split in ordered for image in images[split]])
        real = from_pil([scene.render(size) for split in ordered for scene in scenes[split]])
        counts = {split: len(scenes[split]) for split in ordered}
        other = from_pil([scene.render(size) for split in ordered
                          for scene in balanced_scenes(counts, seed=seed + 1)[split]])
        captions = [scene.caption for split in ordered for scene in scenes[split]]
        with pipe.autocast():
            found = self.distribution_metrics(pipe.clip, generated, real, captions=captions, seed=seed,
                                              calibration_sets=(real, other))
        return {f"{prefix}distribution/{key}": value for key, value in found.items()}

    def unconditional_metrics(self, pipe, n: int, *, seed: int = 0, reference: int = 1024, rerank: int = 1,
                              prior_candidates: int = 1, captions: int = 8192) -> dict:
        """``unconditional/...``: ``n`` samples of ``pipe.unconditional`` read as scenes by the pixel judge (valid
        share, scene kinds, held-out share) and their attribute frequencies' TV distance to ``reference`` training
        images', beside a second training draw, its shuffle and the uniform distribution
        (:mod:`unclip.eval.unconditional`). ``rerank=k``: each sample the best of k candidates by a caption bank of
        ``captions`` training captions (``pipe.unconditional(rerank=, captions=)``); ``prior_candidates=m`` (unCLIP):
        each candidate's image embedding the best of m prior samples by that bank."""
        if self.train is None:
            raise ValueError("the shapes evaluator was built without its training split (train=), which unconditional "
                             "samples are compared with; give train=${data.train} (conf/data/shapes.yaml does)")
        pipe.require("unconditional", "unconditional evaluation")
        bank = {} if rerank == prior_candidates == 1 else {
            "rerank": rerank, "captions": training_captions(self.train, captions, seed),
            **({"prior_candidates": prior_candidates} if prior_candidates > 1 else {})}
        images = pipe.unconditional(n, seed=seed, output="tensor", **bank)
        heldout = getattr(getattr(self.train, "config", None), "heldout", DEFAULT_HELDOUT)
        metrics = unconditional_metrics(images, self.train, reference=reference, heldout=heldout, seed=seed)
        return {**metrics, "unconditional/rerank": rerank, "unconditional/prior_candidates": prior_candidates,
                **({"unconditional/bank_captions": len(set(bank["captions"]))} if bank else {})}

    def reconstruction_metrics(self, reconstruct, items: dict[str, int], image_size: int | None = None) -> dict:
        """PSNR, and the judge on every attribute of every object, named in the caption or not:
        ``recon_<attribute>_<split>`` (colour, shape, size, position; pairs: objects, relation) and
        ``recon_all_<split>`` (every attribute of the scene right)."""
        metrics = {}
        for split, n in items.items():
            if split not in self.splits or n < 1:
                continue
            batch = self.items(split, n)
            images = reconstruct(batch["image"])
            metrics[f"psnr_{split}"] = psnr(images, resize(batch["image"], image_size or images.shape[-1]))
            judged = [judge_scene(j, {**meta, "named_size": True, "named_position": True})
                      for j, meta in zip(judge_batch(images), batch["meta"])]
            for attribute in sorted({key for result in judged for key in result}):
                values = [result[attribute] for result in judged if attribute in result]
                metrics[f"recon_{attribute}_{split}"] = sum(values) / len(values)
        return metrics

    def prompt_metrics(self, images, prompts: list[str], prefix: str = "grid/") -> dict:
        """The judge's accuracy on images made from any prompts (one prompt per image); prompts outside the data
        set's vocabulary are listed under ``<prefix>out_of_vocabulary``, not counted."""
        return judge_prompts(images, prompts, prefix=prefix)

    def summary(self, metrics: dict, prefix: str = "") -> str:
        lines = []
        for name, title in (("fidelity/", "text to image"), ("fidelity_variations/", "decoded true embeddings")):
            if any(key.startswith(f"{prefix}{name}") for key in metrics):
                lines += [f"balanced prompt set, {title}:", format_table(metrics, prefix=f"{prefix}{name}")]
        scores = {key[len(f"{prefix}geneval/"):]: value for key, value in metrics.items()
                  if key.startswith(f"{prefix}geneval/")}
        if scores:
            lines += ["", "GenEval's categories on the balanced prompt set (text to image):",
                      geneval_table(scores, name=str(metrics.get("generator", "this pipeline")))]
        if f"{prefix}unconditional/n" in metrics:
            lines += ["", unconditional_table(metrics, prefix=f"{prefix}unconditional/")]
        return "\n".join(lines)

    def sample_prompts(self) -> list[str]:
        return list(self.prompts)
