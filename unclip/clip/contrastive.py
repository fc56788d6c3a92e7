"""The CLIP contrastive objective, with open_clip's ClipLoss (negatives gathered across processes)."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

MAX_LOGIT_SCALE = 100.0


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class ContrastiveLoss:
    """``loss_fn(encoder, batch)``: symmetric cross-entropy over the N×N cosine-similarity matrix.

    A batch may carry ``twin_image`` / ``twin_caption``: a hard negative for each item (the same scene with one
    attribute changed, ``ShapesDataset(twins=True)``). They join the batch as pairs of their own, so that each
    image must tell its caption from its twin's and each caption its image from the twin image.

    With several processes the features of every process are gathered (with gradients), so each
    image is contrasted against the captions of the whole global batch, not just its own slice.
    """

    def __call__(self, encoder, batch: dict) -> dict:
        images, captions = batch["image"], batch["caption"]
        if "twin_image" in batch:  # hard negatives (e.g. shapes' twins): more pairs in the same contrast
            images = torch.cat([images, batch["twin_image"]])
            captions = list(captions) + list(batch["twin_caption"])
        if images.shape[0] != len(captions):
            raise ValueError(f"batch has {images.shape[0]} images but {len(captions)} captions")
        rank, world_size = _world()
        from open_clip.loss import ClipLoss  # here: importing open_clip takes about 3 s (see open_clip_encoder)

        loss_fn = ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world_size)
        image_features = encoder.encode_image(images)
        text_features = encoder.encode_text(captions).embed
        logit_scale = encoder.logit_scale.exp()
        loss = loss_fn(image_features, text_features, logit_scale)
        return {"loss": loss, "logit_scale": logit_scale.detach()}


def clamp_logit_scale(encoder) -> None:
    """Keep the learnable temperature at most 100 (CLIP paper), after every optimizer step."""
    with torch.no_grad():
        encoder.logit_scale.clamp_(0, math.log(MAX_LOGIT_SCALE))
