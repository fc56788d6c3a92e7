"""How captioned data (image folders, webdataset shards, emoji) is evaluated: by CLIP, with identical
captions counted as one class (a data set of template captions such as "a handwritten 7" repeats them)."""

from __future__ import annotations

import torch

from unclip.configurable import register
from unclip.eval.clip_retrieval import clip_agreement, retrieval_metrics
from unclip.eval.evaluator import DataEvaluator
from unclip.eval.pipeline import evaluate_captions, generate_for


@register
class CaptionsEvaluator(DataEvaluator):
    """CLIP: image<->caption retrieval recall, a caption shared by several images being correct for each; prior:
    retrieval of an image with the prompt's caption; decoder and pipeline: CLIP agreement of the generated
    images with their real images and captions, beside the same for shuffled pairs."""

    def __init__(self, splits: dict, pipeline_items: dict | None = None, clip_items: int = 512,
                 prompts_per_split: int = 8, metrics: dict | None = None):
        super().__init__(splits, pipeline_items or {split: 64 for split in splits}, clip_items, metrics)
        self.prompts_per_split = prompts_per_split

    def clip_metrics(self, encoder) -> dict:
        metrics = {}
        for split in self.splits:
            batch = self.items(split, self.clip_items)
            recall = retrieval_metrics(encoder, batch["image"], batch["caption"], ks=(1, 5, 10))
            metrics.update({f"{key}_{split}": value for key, value in recall.items()})
        return metrics

    def score_decoded(self, samples: torch.Tensor, batch: dict, clip) -> dict:
        return clip_agreement(clip, samples, batch["image"], batch["caption"])

    def _pipeline_splits(self):
        for split, n in self.pipeline_items.items():
            if split in self.splits and n > 0:  # counts for other data sets' splits are ignored
                yield split, self.items(split, n)

    def pipeline_metrics(self, pipe, *, seed: int, prefix: str = "", edits: bool = True,
                         fidelity: bool = True) -> dict:
        """``<prefix><split>_{image_cosine,clip_score}`` (and their ``shuffled_*``) of one image per caption; with
        ``metrics`` on, ``<prefix>distribution/<split>/...``: FID, KID, precision/recall of those images against the
        split's real images of the same captions, and the calibration rows against the split's next as many."""
        metrics = {}
        for split, batch in self._pipeline_splits():
            generated = generate_for(pipe, batch["caption"], seed=seed)
            metrics.update(evaluate_captions(pipe, batch["caption"], batch["image"], seed=seed, prefix=f"{prefix}{split}_",
                                             generated=generated))
            if self.metrics is not None:
                with pipe.autocast():
                    found = self.distribution_metrics(pipe.clip, generated, batch["image"], seed=seed,
                                                      calibration_sets=self._real_halves(split, len(generated)))
                metrics.update({f"{prefix}distribution/{split}/{key}": value for key, value in found.items()})
        return metrics

    def _real_halves(self, split: str, count: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Two disjoint sets of the split's real images for the calibration rows: its first ``count`` and its next
        ``count`` where it has them, else its two halves (the rows' ``n_fid_*_calibration`` says how many)."""
        pool = self.items(split, 2 * count)["image"]
        half = count if len(pool) >= 2 * count else len(pool) // 2
        return (pool[:half], pool[half : 2 * half]) if half >= 2 else None

    def sample_prompts(self) -> list[str]:
        """The first ``prompts_per_split`` captions of every evaluated split, each once."""
        captions = [c for _, batch in self._pipeline_splits() for c in batch["caption"][: self.prompts_per_split]]
        return list(dict.fromkeys(captions))  # each caption once
