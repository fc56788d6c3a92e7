"""CLIP evaluation on `shapes`: zero-shot colour×shape classification and retrieval recall."""

from __future__ import annotations

import torch

from unclip.clip.evaluation import embed_images, embed_texts, retrieval_recall, zero_shot_top1
from unclip.data.collate import first_items
from unclip.data.shapes import class_prompts


class ShapesClipEvaluator:
    """Callable ``evaluator(encoder) -> metrics`` over fixed evaluation splits (rendered once).

    For every split: ``zero_shot_top1_<split>`` over the 32 colour×shape classes (prompt "a {colour}
    {shape}", single-object `shapes` items; other data sets skip it), and ``image_to_text_R@k_<split>`` / ``text_to_image_R@k_<split>`` with
    the item's own caption as the only correct match.
    """

    def __init__(self, splits: dict, max_items: int = 512):
        self.classes = class_prompts()
        index = {(colour, shape): i for i, (colour, shape, _) in enumerate(self.classes)}
        self.splits = {}
        for name, dataset in splits.items():
            batch = first_items(dataset, max_items)
            labels = [
                index[(m["objects"][0]["colour"], m["objects"][0]["shape"])]
                if isinstance(m, dict) and m.get("scene") == "single" else -1
                for m in batch["meta"]
            ]
            self.splits[name] = (batch["image"], batch["caption"], torch.tensor(labels))

    def __call__(self, encoder) -> dict:
        class_embeds = embed_texts(encoder, [prompt for _, _, prompt in self.classes])
        metrics = {}
        for name, (images, captions, labels) in self.splits.items():
            image_embeds = embed_images(encoder, images)
            single = labels >= 0
            if single.any():
                metrics[f"zero_shot_top1_{name}"] = zero_shot_top1(image_embeds[single], class_embeds, labels[single])
            recall = retrieval_recall(image_embeds, embed_texts(encoder, captions))
            metrics.update({f"{key}_{name}": value for key, value in recall.items()})
        return metrics
