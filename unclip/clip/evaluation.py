"""Zero-shot classification and image-text retrieval for any ClipEncoder."""

from __future__ import annotations

from typing import Sequence

import torch


@torch.no_grad()
def embed_images(encoder, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Unit-norm image embeddings [N, D] for images [N, 3, H, W] in [-1, 1]."""
    return torch.cat([encoder.encode_image(images[i : i + batch_size]).float() for i in range(0, len(images), batch_size)])


@torch.no_grad()
def embed_texts(encoder, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
    """Unit-norm text embeddings [N, D]."""
    texts = list(texts)
    return torch.cat([encoder.encode_text(texts[i : i + batch_size]).embed.float() for i in range(0, len(texts), batch_size)])


def zero_shot_top1(image_embeds: torch.Tensor, class_embeds: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of images whose most similar class prompt is their own class (an image with a non-finite
    similarity is a miss: argmax would pick a NaN as the best)."""
    scores = image_embeds @ class_embeds.T
    predictions = scores.argmax(dim=-1).masked_fill(~torch.isfinite(scores).all(dim=-1), -1)
    return (predictions.cpu() == labels.cpu()).float().mean().item()


def ranks_of_true(scores: torch.Tensor, true_scores: torch.Tensor) -> torch.Tensor:
    """Per row, how many candidates score at least as high as ``true_scores`` (the true match's, [N, 1]), itself
    not counted: ties count against it, and so does a non-finite candidate; a non-finite true score is a miss
    (rank = the largest integer). Comparisons with NaN are all false: counted naively, a NaN CLIP ranks every true
    match first and scores perfect recall."""
    ahead = (scores >= true_scores) | ~torch.isfinite(scores)
    rank = ahead.sum(dim=1) - 1
    return rank.masked_fill(~torch.isfinite(true_scores.squeeze(1)), torch.iinfo(rank.dtype).max)


def retrieval_recall(image_embeds: torch.Tensor, text_embeds: torch.Tensor, ks: Sequence[int] = (1, 5, 10)) -> dict:
    """Recall@k of image→text and text→image retrieval, item i's match being caption i."""
    if image_embeds.shape != text_embeds.shape:
        raise ValueError(f"image and text embeddings differ in shape: {tuple(image_embeds.shape)} vs {tuple(text_embeds.shape)}")
    similarity = image_embeds.float() @ text_embeds.float().T  # [N images, N texts]
    target = torch.arange(len(similarity), device=similarity.device)
    metrics = {}
    for name, scores in (("image_to_text", similarity), ("text_to_image", similarity.T)):
        # rank of the true match: how many other candidates score at least as high (ties count against it)
        rank = ranks_of_true(scores, scores[target, target].unsqueeze(1))
        for k in ks:
            metrics[f"{name}_R@{k}"] = (rank < k).float().mean().item()
    return metrics
