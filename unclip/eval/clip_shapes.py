"""CLIP evaluation on `shapes`: zero-shot colour×shape classification, retrieval recall and pair binding."""

from __future__ import annotations

import random

import torch
import torch.nn.functional as F

from unclip.clip.evaluation import embed_images, embed_texts, retrieval_recall, zero_shot_top1
from unclip.data.collate import first_items
from unclip.data.shapes import ShapeObject, class_prompts, pair_caption
from unclip.eval.prompt_set import balanced_scenes
from unclip.images import from_pil

# A pair scene's caption against its bound-swapped twins: what a CLIP must tell apart to bind attributes.
BINDING_TWINS = ("colours_swapped", "shapes_swapped", "order_reversed")


def binding_captions(scene, seed: int) -> list[str]:
    """A pair scene's caption and its three twins, in one template: the colours swapped between the objects, the
    shapes swapped, and the objects named in the other order (the relation then says the opposite)."""
    (a, b), relation, named = scene.objects, scene.meta["relation"], scene.meta["named_size"]

    def caption(first: ShapeObject, second: ShapeObject) -> str:
        return pair_caption(random.Random(seed), (first, second), relation, named)

    def swapped(x: ShapeObject, **change) -> ShapeObject:
        return ShapeObject(change.get("colour", x.colour), change.get("shape", x.shape), x.size, x.position, x.centre)

    return [caption(a, b), caption(swapped(a, colour=b.colour), swapped(b, colour=a.colour)),
            caption(swapped(a, shape=b.shape), swapped(b, shape=a.shape)), caption(b, a)]


def binding_inputs(scenes, image_size: int) -> tuple[torch.Tensor, list[list[str]]]:
    """The pair scenes' rendered images [N, 3, S, S] and, per scene, its caption and three twins
    (:func:`binding_captions`): what :func:`binding_metrics` scores, made once."""
    return from_pil([s.render(image_size) for s in scenes]), [binding_captions(s, i) for i, s in enumerate(scenes)]


def binding_metrics(encoder, images: torch.Tensor, captions: list[list[str]], prefix: str = "pair_binding") -> dict:
    """How often each pair scene's image (``images``, from :func:`binding_inputs`) scores its own caption above a
    twin's (``<prefix>_beats_<twin>``) and above all three (``<prefix>``; chance 25%). Twins that equal the caption
    (two objects of one shape: "shapes swapped" says the same) are left out of that scene's comparison."""
    image_embeds = F.normalize(embed_images(encoder, images).float(), dim=-1)
    text_embeds = F.normalize(embed_texts(encoder, [c for four in captions for c in four]).float(), dim=-1)
    scores = torch.einsum("nd,nkd->nk", image_embeds, text_embeds.view(len(captions), 4, -1))
    differs = torch.tensor([[c != four[0] for c in four[1:]] for four in captions])
    beats = scores[:, :1] > scores[:, 1:]
    metrics = {prefix: (beats | ~differs).all(dim=1).float().mean().item()}
    for k, twin in enumerate(BINDING_TWINS):
        metrics[f"{prefix}_beats_{twin}"] = beats[differs[:, k], k].float().mean().item()
    return metrics


class ShapesClipEvaluator:
    """Callable ``evaluator(encoder) -> metrics`` over fixed evaluation splits (rendered once).

    For every split: ``zero_shot_top1_<split>`` over the 32 colour×shape classes (prompt "a {colour}
    {shape}", single-object `shapes` items; other data sets skip it), and ``image_to_text_R@k_<split>`` / ``text_to_image_R@k_<split>`` with
    the item's own caption as the only correct match. With ``binding_scenes`` (pair scenes of the balanced prompt
    set, :func:`unclip.eval.prompt_set.balanced_scenes`): ``pair_binding`` and ``pair_binding_beats_<twin>``
    (:func:`binding_metrics`), whatever pairs the splits hold.
    """

    def __init__(self, splits: dict, max_items: int = 512, binding_scenes: int = 64):
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
        image_size = next(iter(self.splits.values()))[0].shape[-1] if self.splits else 64
        self.binding = binding_inputs(balanced_scenes({"pair": binding_scenes})["pair"], image_size) if binding_scenes else None

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
        if self.binding is not None:
            metrics.update(binding_metrics(encoder, *self.binding))
        return metrics
