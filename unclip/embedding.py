"""The embedding contract every stage shares.

A CLIP model defines a joint embedding space. Every later stage (prior, decoder, upsampler) is trained
inside one such space and records it in its checkpoint; stages from different spaces refuse to compose.

Normalisation conventions (the one place they are stated; every stage follows them):

* ``ClipEncoder.encode_text(...).embed`` and ``ClipEncoder.encode_image(...)`` are L2-normalised:
  every row has unit norm. Stored embedding shards hold these unit vectors.
* ``TextCondition.token_embeds`` are the text encoder's last hidden states after its final layer
  norm, *not* normalised; ``mask`` marks the real tokens (start, words, end), padding is ``False``.
* The diffusion prior standardises image embeddings internally with a per-dimension mean and std
  measured on its training data and stored as buffers inside its weights (no side file). It takes
  and returns unit-norm embeddings; what it returns is re-normalised to unit norm.
* The decoder is conditioned on unit-norm image embeddings.
* Images inside the library are float tensors in [-1, 1], NCHW; an encoder converts them to the
  mean/std normalisation its model expects (``EmbeddingSpace.image_mean`` / ``image_std``).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, fields
from typing import Protocol, Sequence, runtime_checkable

import torch


@dataclass(frozen=True)
class EmbeddingSpace:
    """What a CLIP model's joint space is, enough to check that two stages can meet."""

    dim: int  # width of the joint (projected) embedding
    text_length: int  # tokens per caption (context length)
    token_dim: int  # width of the per-token text states
    image_size: int  # side of the square image the image encoder expects
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    fingerprint: str  # hash of the encoder's config and weights
    name: str = ""  # a human-readable label, not part of identity

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "EmbeddingSpace":
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown EmbeddingSpace fields {sorted(unknown)}; expected {sorted(known)}")
        data = dict(data)
        data["image_mean"] = tuple(data["image_mean"])
        data["image_std"] = tuple(data["image_std"])
        return cls(**data)

    def describe(self) -> str:
        return f"{self.name or 'clip'} (dim {self.dim}, fingerprint {self.fingerprint})"

    def check_same(self, other: "EmbeddingSpace", this_what: str, other_what: str) -> None:
        """Raise if ``other`` is not the same space: stages of different spaces cannot compose."""
        if self.fingerprint != other.fingerprint or self.dim != other.dim:
            raise ValueError(
                f"{this_what} was trained in embedding space {self.describe()} but {other_what} in "
                f"{other.describe()}; stages from different CLIP models cannot be composed"
            )


def per_dimension_statistics(image_embeds: torch.Tensor, *, dim: int, fitter: str,
                             remedy: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-dimension mean and std (floored at 1e-4) of training image embeddings [N >= 2, dim], with which the
    prior and a ``standardise_embed`` decoder standardise every embedding. One embedding has no std (NaN), so fewer
    than two are refused, naming ``fitter`` and the ``remedy``."""
    if image_embeds.ndim != 2 or image_embeds.shape[0] < 2:
        raise ValueError(f"{fitter} fits each dimension's mean and std on [N >= 2, {dim}] training image embeddings, "
                         f"got {list(image_embeds.shape)}: {remedy}")
    image_embeds = image_embeds.float()
    return image_embeds.mean(0), image_embeds.std(0).clamp_min(1e-4)


def fingerprint_of(config: dict, state_dict: dict[str, torch.Tensor]) -> str:
    """A stable hash of a model's config and weights (16 hex digits)."""
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    for key in sorted(state_dict):
        tensor = state_dict[key].detach().to("cpu").contiguous().reshape(-1)
        digest.update(key.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()[:16]


@dataclass
class TextCondition:
    """A batch of encoded captions."""

    embed: torch.Tensor  # [B, D] unit-norm CLIP text embedding
    tokens: torch.Tensor  # [B, T] token ids (long)
    token_embeds: torch.Tensor  # [B, T, Dt] last hidden states of the text encoder
    mask: torch.Tensor  # [B, T] bool, True at real tokens

    def __post_init__(self) -> None:
        batch = self.embed.shape[0]
        for name in ("tokens", "token_embeds", "mask"):
            value = getattr(self, name)
            if value.shape[0] != batch:
                raise ValueError(f"TextCondition.{name} has batch {value.shape[0]}, embed has {batch}")

    def __len__(self) -> int:
        return self.embed.shape[0]

    def to(self, device=None, dtype: torch.dtype | None = None) -> "TextCondition":
        """Move to ``device``; ``dtype`` applies to the float tensors only."""
        return TextCondition(
            embed=self.embed.to(device=device, dtype=dtype),
            tokens=self.tokens.to(device=device),
            token_embeds=self.token_embeds.to(device=device, dtype=dtype),
            mask=self.mask.to(device=device),
        )

    def __getitem__(self, index) -> "TextCondition":
        return TextCondition(self.embed[index], self.tokens[index], self.token_embeds[index], self.mask[index])

    def repeat_interleave(self, repeats: int) -> "TextCondition":
        return TextCondition(
            self.embed.repeat_interleave(repeats, 0),
            self.tokens.repeat_interleave(repeats, 0),
            self.token_embeds.repeat_interleave(repeats, 0),
            self.mask.repeat_interleave(repeats, 0),
        )


@runtime_checkable
class ClipEncoder(Protocol):
    """What every CLIP implementation offers the other stages."""

    space: EmbeddingSpace

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        """Token ids [B, T]; captions longer than the context are truncated with a warning."""
        ...

    def decode(self, tokens: torch.Tensor | Sequence[Sequence[int]]) -> list[str]:
        """Token rows -> captions (each row up to its end token, special ids left out): ``tokenize`` undone."""
        ...

    def encode_text(self, texts: Sequence[str] | torch.Tensor) -> TextCondition:
        """Captions (or token ids from ``tokenize``) to a TextCondition."""
        ...

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W] in [-1, 1] to unit-norm embeddings [B, D]."""
        ...
