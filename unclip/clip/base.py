"""What every CLIP encoder shares: the cached embedding space, caption checks, image preprocessing."""

from __future__ import annotations

import html
import re
import warnings
from typing import Sequence

import torch
from torch import nn

from unclip.embedding import EmbeddingSpace
from unclip.images import resize


def strip_special(text: str, special: re.Pattern) -> str:
    """``text`` with every match of a tokenizer's ``special``-token pattern removed, also HTML-escaped ones
    (a caption must not be able to end itself early)."""
    previous = None
    while previous != text:  # escapes may be nested: &amp;lt;end_of_text&amp;gt;
        previous, text = text, special.sub(" ", html.unescape(text))
    return text


class ClipEncoderBase(nn.Module):
    """Base of the CLIP encoders (``unclip.embedding.ClipEncoder``). A subclass sets ``model`` (with a
    ``logit_scale``), ``image_size``, ``context_length`` and ``special`` (its special-token pattern), calls
    :meth:`_set_normalisation`, and implements ``compute_space``, ``tokenize``, ``encode_text``, ``encode_image``,
    ``_special_ids`` (start and end ids) and ``_decode_ids`` (ids of words -> text)."""

    special: re.Pattern

    def _set_normalisation(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self.image_mean = tuple(float(m) for m in mean)
        self.image_std = tuple(float(s) for s in std)
        if len(self.image_mean) != 3 or len(self.image_std) != 3:
            raise ValueError(f"image_mean and image_std need 3 values, got {self.image_mean} and {self.image_std}")
        self.register_buffer("_mean", torch.tensor(self.image_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_std", torch.tensor(self.image_std).view(1, 3, 1, 1), persistent=False)
        self._space: EmbeddingSpace | None = None

    # -- space --------------------------------------------------------------------------------
    @property
    def space(self) -> EmbeddingSpace:
        if self._space is None:
            self._space = self.compute_space()
        return self._space

    def compute_space(self) -> EmbeddingSpace:
        raise NotImplementedError

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        self._space = None  # new weights, new fingerprint
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    @property
    def device(self) -> torch.device:
        """Where the encoder runs (its inputs are moved there)."""
        return self._mean.device

    @property
    def logit_scale(self) -> nn.Parameter:
        return self.model.logit_scale

    # -- text ---------------------------------------------------------------------------------
    def _captions(self, texts: Sequence[str] | str) -> list[str]:
        """Captions as a non-empty list of str, special-token strings removed."""
        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        if not texts:
            raise ValueError("tokenize got an empty list of captions; expected at least one")
        for text in texts:
            if not isinstance(text, str):
                raise TypeError(f"captions must be str, got {type(text).__name__}: {text!r}")
        return [strip_special(t, self.special) for t in texts]

    def _warn_truncated(self, texts: Sequence[str], token_counts: Sequence[int]) -> None:
        """Warn about the captions whose ``token_counts`` (with start and end tokens) exceed the context."""
        too_long = [t for t, n in zip(texts, token_counts) if n > self.context_length]
        if too_long:
            warnings.warn(
                f"{len(too_long)} caption(s) longer than the {self.context_length}-token context were "
                f"truncated, e.g. {too_long[0][:80]!r}",
                stacklevel=3,
            )

    def decode(self, tokens: torch.Tensor | Sequence[Sequence[int]]) -> list[str]:
        """Token rows (``tokenize``'s, or a captioner's, with or without the start token) -> captions: each row
        read up to its first end token (or to its end), the special and padding ids left out, spaces normalised."""
        rows = tokens.tolist() if isinstance(tokens, torch.Tensor) else [list(row) for row in tokens]
        if isinstance(tokens, torch.Tensor) and tokens.ndim != 2:
            raise ValueError(f"decode takes token rows [B, L], got shape {tuple(tokens.shape)}")
        start, end = self._special_ids()
        texts = []
        for row in rows:
            row = [int(i) for i in row]
            row = row[:row.index(end)] if end in row else row
            texts.append(" ".join(self._decode_ids([i for i in row if i != start and i > 0]).split()))
        return texts

    def _special_ids(self) -> tuple[int, int]:
        raise NotImplementedError

    def _decode_ids(self, ids: list[int]) -> str:
        raise NotImplementedError

    # -- images -------------------------------------------------------------------------------
    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W] in [-1, 1] to the model's input size and normalisation."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [B, 3, H, W] in [-1, 1], got shape {tuple(images.shape)}")
        pixels = (resize(images, self.image_size) + 1) / 2
        return (pixels - self._mean) / self._std
