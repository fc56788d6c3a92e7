"""How well a prior predicts CLIP image embeddings: cosine to the truth, and retrieval by colour and shape
(`shapes`) or by caption (other data sets)."""

from __future__ import annotations

import torch

from unclip.data.embeddings import EmbeddingShards


def _label(meta: dict | None):
    if not meta or meta.get("scene") != "single":
        return None
    obj = meta["objects"][0]
    return obj["colour"], obj["shape"]


@torch.no_grad()
def evaluate_prior(
    prior,
    splits: dict[str, EmbeddingShards],
    gallery: list[EmbeddingShards],
    *,
    max_items: int = 256,
    batch_size: int = 128,
    generator_seed: int = 0,
    **sample_kwargs,
) -> dict:
    """For each split: ``cosine_<split>`` (mean cosine of predicted and true image embedding), and
    ``retrieval_colour_shape_<split>``: the real image nearest to the predicted embedding among all the
    ``gallery`` shards' images has the prompt's colour and shape. Without `shapes` metadata,
    ``retrieval_caption_<split>``: that image's caption is the prompt. ``passthrough_*`` give the same for the
    text embedding itself."""
    gallery_embeds = torch.cat([g.tensors["image_embed"].float() for g in gallery])
    gallery_labels = [_label(m) for g in gallery for m in g.metas]
    by_caption = all(label is None for label in gallery_labels)
    if by_caption:
        gallery_labels = [c for g in gallery for c in g.captions]
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
        labels = list(shards.captions[:n]) if by_caption else [_label(m) for m in shards.metas[:n]]
        kind = "caption" if by_caption else "colour_shape"
        for prefix, embeds in (("", predicted), ("passthrough_", text)):
            metrics[f"{prefix}cosine_{name}"] = (embeds * truth).sum(-1).mean().item()
            nearest = (embeds @ gallery_embeds.T).argmax(dim=1).tolist()
            hits = [labels[i] == gallery_labels[j] for i, j in enumerate(nearest) if labels[i] is not None]
            if hits:
                metrics[f"{prefix}retrieval_{kind}_{name}"] = sum(hits) / len(hits)
    return metrics
