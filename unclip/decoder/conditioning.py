"""What a diffusion UNet is conditioned on, as parts the UNet is given (GLIDE's subclasses, composed).

Each part reads some keyword inputs of ``UNet.forward`` and returns a :class:`Conditioning`: additions to the time
embedding, context tokens every attention layer attends to, channels concatenated to the noisy input, or features
added after the input convolution. The UNet body knows none of them by name:

* :class:`ImageEmbedCondition` (the unCLIP decoder, DALL-E 2 section 2.1): the CLIP image embedding projected and
  added to the time embedding, and projected into ``num_tokens`` extra context tokens; optionally also as a
  coarse spatial map (``spatial_grid``) added to the first features. ``drop_image_embed`` swaps in a learned null.
* :class:`CaptionCondition` (GLIDE): the caption encoder's token states as context tokens (padding hidden) and its
  pooled state added to the time embedding; ``drop_context`` hides every token and swaps in a learned null pooled
  state.
* :class:`LowResCondition` (the upsamplers): the noise-augmented low-resolution image (already resized to the output
  size) concatenated to the input, its augmentation level embedded into the time embedding.
* :class:`MaskedImageCondition` (inpainting, GLIDE): the known image (zero where masked) and the mask as four
  extra input channels.

Shapes: ``emb`` [B, emb_dim]; ``tokens`` [B, T, context_width]; ``visible`` [B, T] bool (None: all visible);
``channels`` [B, C, S, S]; ``features`` [B, base_channels, S, S].
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from unclip.diffusion.timesteps import timestep_embedding
from unclip.embedding import per_dimension_statistics


@dataclass
class Conditioning:
    emb: Tensor | None = None
    tokens: Tensor | None = None
    visible: Tensor | None = None
    channels: Tensor | None = None
    features: Tensor | None = None


def check_shape(name: str, value: Tensor, expected: tuple) -> None:
    """Raise a ValueError naming ``name`` unless ``value`` has ``expected`` shape (entries may be None: any)."""
    shape = tuple(value.shape)
    if len(shape) != len(expected) or any(e is not None and s != e for s, e in zip(shape, expected)):
        want = "[" + ", ".join("*" if e is None else str(e) for e in expected) + "]"
        raise ValueError(f"{name} has shape {list(shape)}, expected {want}")


def drop_flags(name: str, flags: Tensor | None, batch: int, device) -> Tensor | None:
    """Validate a [B] bool drop-flag tensor (or None)."""
    if flags is None:
        return None
    flags = torch.as_tensor(flags, device=device)
    check_shape(name, flags, (batch,))
    if flags.dtype != torch.bool:
        raise ValueError(f"{name} must be a bool tensor [B], got dtype {flags.dtype}")
    return flags


def _mlp(in_dim: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, out_dim), nn.SiLU(), nn.Linear(out_dim, out_dim))


class Condition(nn.Module):
    """A conditioning part: ``inputs`` names the keyword inputs of ``UNet.forward`` it reads."""

    inputs: tuple[str, ...] = ()
    extra_channels: int = 0  # channels it concatenates to the noisy input
    context_width: int | None = None  # width of the context tokens it yields (None: none)

    def forward(self, batch: int, image_size: int, device, **inputs) -> Conditioning:
        raise NotImplementedError


class ImageEmbedCondition(Condition):
    inputs = ("image_embed", "drop_image_embed")

    def __init__(self, image_embed_dim: int, emb_dim: int, context_width: int, num_tokens: int = 4,
                 spatial_grid: int = 0, base_channels: int | None = None, standardise: bool = False):
        super().__init__()
        for name, value in (("image_embed_dim", image_embed_dim), ("num_image_tokens", num_tokens)):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not isinstance(spatial_grid, int) or spatial_grid < 0:
            raise ValueError(f"spatial_embed_grid must be an int >= 0, got {spatial_grid!r}")
        self.image_embed_dim, self.num_tokens, self.context_width = image_embed_dim, num_tokens, context_width
        self.null_embed = nn.Parameter(torch.randn(image_embed_dim) / math.sqrt(image_embed_dim))
        self.to_time = nn.Linear(image_embed_dim, emb_dim)
        self.to_tokens = nn.Linear(image_embed_dim, num_tokens * context_width)
        self.token_norm = nn.LayerNorm(context_width)
        self.spatial_grid = spatial_grid
        if spatial_grid:
            if not base_channels:
                raise ValueError("spatial_embed_grid needs base_channels (the UNet's)")
            self.to_spatial = nn.Linear(image_embed_dim, base_channels * spatial_grid**2)
        self.standardise = standardise
        if standardise:  # per-dimension mean and std of the training embeddings, set by fit_normalisation
            self.register_buffer("embed_mean", torch.zeros(image_embed_dim))
            self.register_buffer("embed_std", torch.ones(image_embed_dim))

    @torch.no_grad()
    def fit_normalisation(self, image_embeds: Tensor) -> None:
        if self.standardise:
            mean, std = per_dimension_statistics(
                image_embeds, dim=self.image_embed_dim, fitter="standardise_embed",
                remedy="give the data more training items or set decoder.standardise_embed=false")
            self.embed_mean.copy_(mean)
            self.embed_std.copy_(std)

    def forward(self, batch: int, image_size: int, device, image_embed=None, drop_image_embed=None) -> Conditioning:
        drop = drop_flags("drop_image_embed", drop_image_embed, batch, device)
        null = self.null_embed[None].expand(batch, -1)
        if image_embed is None:  # unconditional: the same as dropping the embedding of every row
            embed = null
        else:
            check_shape("image_embed", image_embed, (batch, self.image_embed_dim))
            embed = image_embed
            if self.standardise:
                embed = (embed.float() - self.embed_mean) / self.embed_std
            if drop is not None:
                embed = torch.where(drop[:, None], null.to(embed.dtype), embed)
        tokens = rearrange(self.to_tokens(embed), "b (n d) -> b n d", n=self.num_tokens)
        features = None
        if self.spatial_grid:
            g = self.spatial_grid
            grid = rearrange(self.to_spatial(embed), "b (c h w) -> b c h w", h=g, w=g)
            features = F.interpolate(grid, size=(image_size, image_size), mode="nearest")
        return Conditioning(emb=self.to_time(embed), tokens=self.token_norm(tokens), features=features)


class CaptionCondition(Condition):
    inputs = ("context", "context_mask", "pooled_context", "drop_context")

    def __init__(self, width: int, emb_dim: int):
        super().__init__()
        if not isinstance(width, int) or width <= 0:
            raise ValueError(f"caption_width must be a positive int, got {width!r}")
        self.context_width = width
        self.null_pooled = nn.Parameter(torch.randn(width) / math.sqrt(width))
        self.pooled_to_time = nn.Linear(width, emb_dim)

    def forward(self, batch: int, image_size: int, device, context=None, context_mask=None, pooled_context=None,
                drop_context=None) -> Conditioning:
        drop = drop_flags("drop_context", drop_context, batch, device)
        visible = None
        if context is not None:
            check_shape("context", context, (batch, None, self.context_width))
            if context_mask is not None:
                check_shape("context_mask", context_mask, tuple(context.shape[:2]))
                visible = context_mask.to(device=device, dtype=torch.bool)
            if drop is not None:  # a dropped caption is hidden from every attention layer
                keep = ~drop[:, None]
                visible = keep.expand(context.shape[:2]) if visible is None else visible & keep
        elif context_mask is not None:
            raise ValueError("context_mask given without context")
        # Pooled caption state -> time embedding; dropped (or absent) captions use the learned null.
        dropped = torch.ones(batch, dtype=torch.bool, device=device) if context is None else drop
        emb = None
        if pooled_context is not None:
            check_shape("pooled_context", pooled_context, (batch, self.context_width))
            if dropped is not None:
                pooled_context = torch.where(dropped[:, None], self.null_pooled.to(pooled_context.dtype), pooled_context)
            emb = self.pooled_to_time(pooled_context)
        elif dropped is not None:
            null = self.pooled_to_time(self.null_pooled)[None]  # [1, emb_dim]
            emb = torch.where(dropped[:, None], null, torch.zeros_like(null))
        return Conditioning(emb=emb, tokens=context, visible=visible)


class LowResCondition(Condition):
    inputs = ("low_res", "aug_level")

    def __init__(self, channels: int, emb_dim: int, base_channels: int):
        super().__init__()
        if not isinstance(channels, int) or channels <= 0:
            raise ValueError(f"the low-resolution image's channels must be a positive int, got {channels!r}")
        self.extra_channels, self.base_channels = channels, base_channels
        self.aug_embed = _mlp(base_channels, emb_dim)

    def forward(self, batch: int, image_size: int, device, low_res=None, aug_level=None) -> Conditioning:
        size = image_size
        if low_res is None:
            raise ValueError(f"this UNet is an upsampler: low_res [B, {self.extra_channels}, {size}, {size}] is required")
        check_shape("low_res", low_res, (batch, self.extra_channels, size, size))
        if aug_level is None:
            raise ValueError("this UNet embeds the noise-augmentation level: aug_level [B] in [0, 1] is required")
        aug_level = torch.as_tensor(aug_level, device=device)
        if aug_level.ndim == 0:
            aug_level = aug_level.expand(batch)
        check_shape("aug_level", aug_level, (batch,))
        emb = self.aug_embed(timestep_embedding(aug_level * 1000.0, self.base_channels))
        return Conditioning(emb=emb, channels=low_res)


class MaskedImageCondition(Condition):
    """Inpainting: the known pixels (zero where masked) and the mask (1 = keep, 0 = fill) as four input channels."""

    inputs = ("masked_image", "mask")
    extra_channels = 4

    def forward(self, batch: int, image_size: int, device, masked_image=None, mask=None) -> Conditioning:
        size = image_size
        if masked_image is None or mask is None:
            raise ValueError(f"this UNet inpaints: masked_image [B, 3, {size}, {size}] and mask [B, 1, {size}, {size}] "
                             "(1 = keep, 0 = fill) are required")
        check_shape("masked_image", masked_image, (batch, 3, size, size))
        check_shape("mask", mask, (batch, 1, size, size))
        return Conditioning(channels=torch.cat([masked_image, mask.to(masked_image.dtype)], dim=1))


def combine(parts: Sequence[Conditioning], batch: int, device) -> Conditioning:
    """One Conditioning from many: embeddings summed, tokens and channels concatenated (in the parts' order)."""
    embs = [p.emb for p in parts if p.emb is not None]
    with_tokens = [p for p in parts if p.tokens is not None]
    channels = [p.channels for p in parts if p.channels is not None]
    features = [p.features for p in parts if p.features is not None]
    tokens = visible = None
    if with_tokens:
        dtype = with_tokens[0].tokens.dtype
        tokens = torch.cat([p.tokens.to(dtype) for p in with_tokens], dim=1)
        if any(p.visible is not None for p in with_tokens):
            visible = torch.cat([p.visible if p.visible is not None else
                                 torch.ones(p.tokens.shape[:2], dtype=torch.bool, device=device) for p in with_tokens],
                                dim=1)
    return Conditioning(
        emb=sum(embs[1:], embs[0]) if embs else None,
        tokens=tokens,
        visible=visible,
        channels=torch.cat(channels, dim=1) if channels else None,
        features=sum(features[1:], features[0]) if features else None,
    )
