"""How well a prior predicts CLIP image embeddings: cosine to the truth, and retrieval of an image with the
prompt's label (the data set's evaluator says what a label is: colour and shape, or the caption)."""

from __future__ import annotations

from typing import Callable, Hashable

import torch

from unclip.data.embeddings import EmbeddingShards

Label = Callable[[dict | None, str], Hashable | None]  # (meta, caption) -> label; None: not scored


@torch.no_grad()
def evaluate_prior(
    prior,
    splits: dict[str, EmbeddingShards],
    gallery: list[EmbeddingShards],
    *,
    label: Label,
    kind: str,
    max_items: int = 256,
    batch_size: int = 128,
    generator_seed: int = 0,
    **sample_kwargs,
) -> dict:
    """For each split: ``cosine_<split>`` (mean cosine of predicted and true image embedding), and
    ``retrieval_<kind>_<split>``: the real image nearest to the predicted embedding among all the ``gallery``
    shards' images has the prompt's label. ``passthrough_*`` give the same for the text embedding itself."""
    gallery_embeds = torch.cat([g.tensors["image_embed"].float() for g in gallery])
    gallery_labels = [label(m, c) for g in gallery for m, c in zip(g.metas, g.captions)]
    generator = torch.Generator(device=prior.embed_mean.device if hasattr(prior, "embed_mean") else "cpu")
    generator.manual_seed(generator_seed)
    metrics = {}
    for name, shards in splits.items():
        n = min(len(shards), max_items)
        preds = []
        for start in range(0, n, batch_size):
            index = torch.arange(start, min(n, start + batch_size))
            preds.append(prior.sample(shards.text_condition(index), generator=generator, **sample_kwargs).float().cpu())
        predicted = torch.cat(preds)
        truth = shards.tensors["image_embed"][:n].float()
        text = shards.tensors["text_embed"][:n].float()
        labels = [label(m, c) for m, c in zip(shards.metas[:n], shards.captions[:n])]
        for prefix, embeds in (("", predicted), ("passthrough_", text)):
            metrics[f"{prefix}cosine_{name}"] = (embeds * truth).sum(-1).mean().item()
            nearest = (embeds @ gallery_embeds.T).argmax(dim=1).tolist()
            hits = [labels[i] == gallery_labels[j] for i, j in enumerate(nearest) if labels[i] is not None]
            if hits:
                metrics[f"{prefix}retrieval_{kind}_{name}"] = sum(hits) / len(hits)
    return metrics
