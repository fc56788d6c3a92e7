"""CLIP encoders, the contrastive objective and zero-shot / retrieval evaluation."""

from unclip.clip.contrastive import ContrastiveLoss, clamp_logit_scale
from unclip.clip.evaluation import embed_images, embed_texts, retrieval_recall, zero_shot_top1
from unclip.clip.hf_encoder import HFClipEncoder
from unclip.clip.open_clip_encoder import OpenClipEncoder

__all__ = [
    "OpenClipEncoder",
    "HFClipEncoder",
    "ContrastiveLoss",
    "clamp_logit_scale",
    "embed_images",
    "embed_texts",
    "retrieval_recall",
    "zero_shot_top1",
]
