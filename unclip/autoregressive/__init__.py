"""Autoregressive token models: a GPT-style transformer with a key/value cache, and DALL-E's transformer over
[caption tokens | image tokens] with its compact text vocabulary and sampling filters."""

from unclip.autoregressive.sampling import (
    check_sampling,
    draw,
    filter_logits,
    guided_logits,
)
from unclip.autoregressive.text_image_transformer import TextImageTransformer
from unclip.autoregressive.transformer import CausalTransformer, KVCache
from unclip.autoregressive.vocabulary import PAD, UNK, TextVocabulary

__all__ = [
    "PAD",
    "UNK",
    "CausalTransformer",
    "KVCache",
    "TextImageTransformer",
    "TextVocabulary",
    "check_sampling",
    "draw",
    "filter_logits",
    "guided_logits",
]
