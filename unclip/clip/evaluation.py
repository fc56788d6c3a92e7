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
    """Fraction of images whose most similar class prompt is their own class."""
    predictions = (image_embeds @ class_embeds.T).argmax(dim=-1)
    return (predictions.cpu() == labels.cpu()).float().mean().item()


def retrieval_recall(image_embeds: torch.Tensor, text_embeds: torch.Tensor, ks: Sequence[int] = (1, 5, 10)) -> dict:
    """Recall@k of image→text and text→image retrieval, item i's match being caption i."""
    if image_embeds.shape != text_embeds.shape:
        raise ValueError(f"image and text embeddings differ in shape: {tuple(image_embeds.shape)} vs {tuple(text_embeds.shape)}")
    similarity = image_embeds.float() @ text_embeds.float().T  # [N images, N texts]
    target = torch.arange(len(similarity), device=similarity.device)
    metrics = {}
    for name, scores in (("image_to_text", similarity), ("text_to_image", similarity.T)):
        # rank of the true match: how many other candidates score at least as high (ties count against it)
        true_scores = scores[target, target].unsqueeze(1)
        rank = (scores >= true_scores).sum(dim=1) - 1
        for k in ks:
            metrics[f"{name}_R@{k}"] = (rank < k).float().mean().item()
    return metrics
