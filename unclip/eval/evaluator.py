"""How a data set is evaluated, stage by stage. A data config names its evaluator (``data.evaluator`` in
conf/data/*.yaml), so that no job guesses what data it was given: `shapes` is judged from the pixels
(``unclip.eval.shapes.ShapesEvaluator``), captioned data by CLIP (``unclip.eval.captions.CaptionsEvaluator``).
"""

from __future__ import annotations

import warnings
from typing import Hashable

import torch

from unclip.data.collate import first_items
from unclip.data.embeddings import EmbeddingShards
from unclip.eval.clip_retrieval import clip_score
from unclip.eval.decoder import evaluate_decoder, psnr
from unclip.eval.distribution import KNN_K, MetricsSettings, calibration, image_set_metrics
from unclip.eval.prior import evaluate_prior
from unclip.images import resize


class DataEvaluator:
    """One method per stage that is evaluated, plus the prompts of the demo's sample grid.

    ``splits``: the data set's evaluation splits (name -> data set; the data config gives its own);
    ``pipeline_items``: how many items (or prompts) of each split or prompt set ``pipeline_metrics`` uses.
    A subclass says how a decoded image is scored and what a label is for the prior's retrieval.
    """

    retrieval_kind = "caption"  # the prior's metric: retrieval_<kind>_<split>

    def __init__(self, splits: dict, pipeline_items: dict, clip_items: int = 512, metrics: dict | None = None):
        self.splits = dict(splits)
        self.pipeline_items = dict(pipeline_items)
        self.clip_items = clip_items
        self.metrics = MetricsSettings.from_config(metrics)  # FID/KID/precision/recall; None: not computed
        self._first: dict[tuple[str, int], dict] = {}

    def distribution_metrics(self, clip, generated: torch.Tensor, real: torch.Tensor, *, captions=None,
                             calibration_sets: tuple[torch.Tensor, torch.Tensor] | None = None, seed: int = 0) -> dict:
        """FID, KID, precision/recall of ``generated`` against ``real`` images (of the same captions) in the feature
        space ``metrics.features`` names; the calibration rows from ``calibration_sets`` (two disjoint real sets, as
        large as can be had; with ``metrics.calibration``); the CLIP score against ``captions``. {} where metrics are
        off. Real images are compared at the generated ones' size: resolution is not what is measured."""
        if self.metrics is None:
            return {}
        if min(len(generated), len(real)) <= KNN_K:  # e.g. a stage evaluation of 2 items: no distribution to speak of
            warnings.warn(f"distribution metrics need more than {KNN_K} images, got {len(generated)} generated and "
                          f"{len(real)} real; skipped (evaluate more items, or metrics.enabled=false)", stacklevel=2)
            return {}
        size = generated.shape[-1]
        features = self.metrics.space(clip, device=getattr(clip, "device", "cpu"))
        metrics = image_set_metrics(features, generated, resize(real, size), kid_subsets=self.metrics.kid_subsets,
                                    seed=seed)
        if self.metrics.calibration and calibration_sets is not None:
            metrics.update(calibration(features, *(resize(images, size) for images in calibration_sets), seed=seed))
        if captions is not None:
            metrics["clip_score"] = clip_score(clip, generated.to(clip.device), list(captions))
        return metrics

    def items(self, split: str, n: int) -> dict:
        """The first ``n`` items of ``split``, collated (read once)."""
        if split not in self.splits:
            raise KeyError(f"{type(self).__name__} has no split {split!r}; its splits: {sorted(self.splits)}")
        if (split, n) not in self._first:
            self._first[split, n] = first_items(self.splits[split], n)
        return self._first[split, n]

    # -- stages ---------------------------------------------------------------------------
    def clip_metrics(self, encoder) -> dict:
        raise NotImplementedError

    def prior_label(self, meta: dict | None, caption: str) -> Hashable | None:
        return caption  # identical captions are one class

    def prior_metrics(self, prior, shards: dict[str, EmbeddingShards], *, max_items: int, **sampling) -> dict:
        """Cosine to the true image embedding and retrieval by label, per split of embedding shards."""
        return evaluate_prior(prior, shards, list(shards.values()), label=self.prior_label, kind=self.retrieval_kind,
                              max_items=max_items, **sampling)

    def score_decoded(self, samples: torch.Tensor, batch: dict, clip) -> dict:
        raise NotImplementedError

    def decoder_metrics(self, decoder, clip, items: dict[str, int], *, guidance_scales, steps: int,
                        sampler: str = "ddim", spacing: str = "uniform") -> dict:
        """Decode the true image embeddings of the first ``items[split]`` items of each split named there
        (sampled with ``sampler`` at ``steps`` in ``spacing``: unclip.diffusion.samplers)."""
        metrics = {}
        for split, n in items.items():
            if split not in self.splits or n < 1:
                continue
            batch = self.items(split, n)
            result, _ = evaluate_decoder(
                decoder, clip, batch["image"].to(clip.device), batch["caption"],
                lambda samples: {**self.score_decoded(samples, batch, clip),  # noqa: B023 (called at once)
                                 **self.distribution_metrics(clip, samples, batch["image"])},  # noqa: B023
                guidance_scales=guidance_scales, steps=steps, sampler=sampler, spacing=spacing, suffix=f"_{split}",
                metas=batch.get("meta"),
            )
            metrics.update(result)
        return metrics

    def pipeline_metrics(self, pipe, *, seed: int, prefix: str = "", edits: bool = True,
                         fidelity: bool = True) -> dict:
        """A whole pipeline's metrics; ``edits``: also those of the edits it supports (``pipe.supports``)."""
        raise NotImplementedError

    def unconditional_metrics(self, pipe, n: int, *, seed: int = 0, reference: int = 1024, rerank: int = 1,
                              prior_candidates: int = 1, captions: int = 8192) -> dict:
        """``n`` unconditional samples of ``pipe`` (``pipe.unconditional``; ``rerank=k``, ``prior_candidates=m``:
        best of k images, of m prior samples, by a bank of ``captions`` training captions) judged against the training
        data."""
        raise NotImplementedError(f"{type(self).__name__} cannot judge unconditional samples (the shapes data set's "
                                  "evaluator can: data=shapes or data=shapes_pairs); leave unconditional=0")

    def reconstruction_metrics(self, reconstruct, items: dict[str, int], image_size: int | None = None) -> dict:
        """An image tokenizer's round trip (``reconstruct``: images [B, 3, S, S] -> images, e.g. a dVAE's encode
        then decode) on the first ``items[split]`` items of each split named there: ``psnr_<split>`` (against the
        images resized to ``image_size``, the reconstructions' size, if given)."""
        metrics = {}
        for split, n in items.items():
            if split in self.splits and n > 0:
                images = self.items(split, n)["image"]
                metrics[f"psnr_{split}"] = psnr(reconstruct(images), resize(images, image_size or images.shape[-1]))
        return metrics

    def prompt_metrics(self, images, prompts: list[str], prefix: str = "grid/") -> dict:
        """What the evaluator can say about images made from any prompts (one per image); nothing by default."""
        return {}

    def summary(self, metrics: dict, prefix: str = "") -> str:
        """A short text table of the headline pipeline metrics ("" where the evaluator has none)."""
        return ""

    def sample_prompts(self) -> list[str]:
        raise NotImplementedError
