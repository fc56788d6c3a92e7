"""CLIP agreement between images and captions: retrieval recall and CLIP score, for any ClipEncoder.

Used on real data (emoji: does a CLIP find each held-out emoji by its name?) and on generated images
(does each image match its own prompt better than someone else's?).
"""

from __future__ import annotations

import random
from typing import Sequence

import torch

from unclip.clip.evaluation import embed_images, embed_texts, ranks_of_true


def _check(images: torch.Tensor, texts: Sequence[str]) -> None:
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be [N, 3, H, W], got shape {tuple(images.shape)}")
    if len(images) != len(texts):
        raise ValueError(f"got {len(images)} images but {len(texts)} texts; image i is paired with texts[i]")
    if len(texts) == 0:
        raise ValueError("need at least one image-text pair")


@torch.no_grad()
def retrieval_metrics(clip, images: torch.Tensor, texts: Sequence[str], *, ks: Sequence[int] = (1, 5),
                      batch_size: int = 256) -> dict[str, float]:
    """Recall@k of image→text and text→image retrieval among the given pairs.

    Image i's correct text is ``texts[i]``; equal texts are one candidate, so a caption shared by
    several images is correct for each of them (and, as a query, finds any of them). Candidates
    scoring at least as high as the best correct one count against it (ties are misses), and so does any
    non-finite similarity (a NaN CLIP scores no recall, not perfect recall). Keys:
    ``image_to_text_R@k`` and ``text_to_image_R@k``, each a mean over the N pairs.
    """
    _check(images, texts)
    unique = list(dict.fromkeys(texts))
    where = {text: u for u, text in enumerate(unique)}
    inverse = torch.tensor([where[t] for t in texts])
    image_embeds = embed_images(clip, images, batch_size).cpu()
    text_embeds = embed_texts(clip, unique, batch_size).cpu()
    similarity = image_embeds @ text_embeds.T  # [N images, U texts]
    rows = torch.arange(len(texts))
    correct = inverse[:, None] == torch.arange(len(unique))[None, :]  # [N, U]: image n shows text u

    # image -> text: one correct candidate per image
    image_rank = ranks_of_true(similarity, similarity[rows, inverse][:, None])
    # text -> image: a text's best-scoring correct image against every other image; non-finite scores are misses
    finite = torch.isfinite(similarity)
    best = similarity.masked_fill(~(correct & finite), float("-inf")).max(dim=0).values  # [U]
    ahead = ((similarity >= best[None, :]) | ~finite) & ~correct
    text_rank = ahead.sum(dim=0).masked_fill(~torch.isfinite(best), torch.iinfo(torch.long).max)[inverse]  # per pair's text

    metrics = {}
    for k in ks:
        metrics[f"image_to_text_R@{k}"] = (image_rank < k).float().mean().item()
    for k in ks:
        metrics[f"text_to_image_R@{k}"] = (text_rank < k).float().mean().item()
    return metrics


@torch.no_grad()
def _pair_cosines(clip, images: torch.Tensor, texts: Sequence[str], order: Sequence[int], batch_size: int) -> float:
    _check(images, texts)
    image_embeds = embed_images(clip, images, batch_size).cpu()
    text_embeds = embed_texts(clip, texts, batch_size).cpu()
    return (image_embeds * text_embeds[list(order)]).sum(dim=-1).mean().item()


def clip_score(clip, images: torch.Tensor, texts: Sequence[str], *, batch_size: int = 256) -> float:
    """Mean cosine similarity between image i and ``texts[i]`` (embeddings are unit-norm)."""
    return _pair_cosines(clip, images, texts, range(len(texts)), batch_size)


def derangement(n: int, seed: int) -> list[int]:
    """A random permutation of range(n) without fixed points (Sattolo's cycle), the same for a seed."""
    if n < 2:
        raise ValueError(f"a derangement needs at least 2 items, got {n}")
    order = list(range(n))
    rng = random.Random(seed)
    for i in range(n - 1, 0, -1):
        j = rng.randrange(i)  # j < i: one n-cycle, so nothing stays in place
        order[i], order[j] = order[j], order[i]
    return order


def shuffled_clip_score(clip, images: torch.Tensor, texts: Sequence[str], seed: int = 0, *,
                        batch_size: int = 256) -> float:
    """Mean cosine between image i and ``texts[p[i]]`` for a seeded derangement p: the CLIP score of
    mismatched pairs, the baseline ``clip_score`` should clear."""
    return _pair_cosines(clip, images, texts, derangement(len(texts), seed), batch_size)


@torch.no_grad()
def clip_agreement(clip, samples: torch.Tensor, sources: torch.Tensor, captions: Sequence[str], *, seed: int = 0,
                   batch_size: int = 256) -> dict[str, float]:
    """How much generated ``samples`` look like their ``sources`` (real images) and ``captions`` to CLIP.

    ``image_cosine``: mean cosine between sample i's and source i's image embeddings; ``clip_score``: mean
    cosine between sample i and caption i; ``shuffled_*``: the same over pairs mismatched by a seeded
    derangement, the baseline that real agreement must clearly beat.
    """
    _check(samples, captions)
    _check(sources, captions)
    fake = embed_images(clip, samples, batch_size).cpu()
    real = embed_images(clip, sources, batch_size).cpu()
    text = embed_texts(clip, captions, batch_size).cpu()
    order = derangement(len(captions), seed)
    return {
        "image_cosine": (fake * real).sum(-1).mean().item(),
        "shuffled_image_cosine": (fake * real[order]).sum(-1).mean().item(),
        "clip_score": (fake * text).sum(-1).mean().item(),
        "shuffled_clip_score": (fake * text[order]).sum(-1).mean().item(),
    }
