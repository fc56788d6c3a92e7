"""How `shapes` is evaluated: every stage judged from the pixels (unclip.eval.judge) or by class."""

from __future__ import annotations

from functools import cached_property

import torch

from unclip.configurable import register
from unclip.eval.clip_shapes import ShapesClipEvaluator
from unclip.eval.evaluator import DataEvaluator
from unclip.eval.judge import judge_batch, score
from unclip.eval.pipeline import evaluate_edits, evaluate_on_shapes, shapes_prompt_sets

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
)


@register
class ShapesEvaluator(DataEvaluator):
    """CLIP: zero-shot colour x shape classification and retrieval; prior: retrieval of an image of the
    prompt's colour and shape; decoder and pipeline: the pixel judge's accuracies (pipeline: on prompt sets
    of their own, ``val``, ``heldout`` and ``pair``, plus ``edits`` variations, interpolations, text diffs)."""

    retrieval_kind = "colour_shape"

    def __init__(self, splits: dict, pipeline_items: dict | None = None, clip_items: int = 512,
                 prompts: list[str] | None = None):
        super().__init__(splits, pipeline_items or {"val": 64, "heldout": 32, "pair": 32, "edits": 8}, clip_items)
        self.prompts = list(prompts or SAMPLE_PROMPTS)

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

    def pipeline_metrics(self, pipe, *, seed: int, prefix: str = "", edits: bool = True) -> dict:
        """Text-to-image accuracy on the prompt sets, then (``edits``; they do not use the prior) variations,
        interpolation and text diffs of ``pipeline_items["edits"]`` val images."""
        sets = self._prompt_sets
        metrics = evaluate_on_shapes(pipe, sets, seed=seed, prefix=prefix)
        k = self.pipeline_items.get("edits", 0)
        if edits and k and "val" in sets:
            edited = evaluate_edits(pipe, sets["val"]["images"][:k], sets["val"]["metas"][:k], seed=seed)
            metrics.update({f"{prefix}{key}": value for key, value in edited.items()})
        return metrics

    def sample_prompts(self) -> list[str]:
        return list(self.prompts)
