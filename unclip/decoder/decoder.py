"""The decoder stage (DALL-E 2, section 2.1): CLIP image embedding (+ caption) -> image, GLIDE-style."""

from __future__ import annotations

import torch
from torch import nn

from unclip.configurable import Configurable
from unclip.decoder.text_encoder import CaptionEncoder, ClipTokenProjection
from unclip.decoder.unet import UNet, sampling_layout, with_resolved_upsample_width
from unclip.diffusion import (
    GaussianDiffusion,
    classifier_free_guidance,
    sample_ddim,
    sample_ddpm,
)
from unclip.embedding import TextCondition

CAPTION_MODES = ("transformer", "clip_tokens", "none")
SAMPLERS = ("ddim", "ddpm")


class Decoder(Configurable, nn.Module):
    """A diffusion UNet conditioned on a unit-norm CLIP image embedding and, optionally, the caption.

    ``caption="transformer"``: the decoder's own small caption transformer over CLIP token ids (GLIDE);
    ``"clip_tokens"``: the CLIP text encoder's per-token states, projected; ``"none"``: no caption.
    Training drops the image embedding (``image_embed_drop_prob``) and the caption (``caption_drop_prob``)
    to learned nulls, so that sampling can use classifier-free guidance.
    """

    def __init__(
        self,
        *,
        image_size: int,
        image_embed_dim: int,
        text_length: int,
        token_dim: int | None = None,
        unet: dict | None = None,
        caption: str = "transformer",
        caption_width: int = 128,
        caption_layers: int = 2,
        caption_heads: int = 4,
        vocab_size: int = 49408,
        num_steps: int = 1000,
        schedule: str = "cosine",
        objective: str = "v",
        loss_weighting: str = "min_snr",
        image_embed_drop_prob: float = 0.1,
        caption_drop_prob: float = 0.5,
    ):
        super().__init__()
        if caption not in CAPTION_MODES:
            raise ValueError(f"caption must be one of {CAPTION_MODES}, got {caption!r}")
        for name, p in (("image_embed_drop_prob", image_embed_drop_prob), ("caption_drop_prob", caption_drop_prob)):
            if not 0 <= p < 1:
                raise ValueError(f"{name} must be in [0, 1), got {p}")
        unet = with_resolved_upsample_width(unet)
        self.remember_config(
            image_size=image_size, image_embed_dim=image_embed_dim, text_length=text_length, token_dim=token_dim,
            unet=unet, caption=caption, caption_width=caption_width, caption_layers=caption_layers,
            caption_heads=caption_heads, vocab_size=vocab_size, num_steps=num_steps, schedule=schedule,
            objective=objective, loss_weighting=loss_weighting, image_embed_drop_prob=image_embed_drop_prob,
            caption_drop_prob=caption_drop_prob,
        )
        self.caption = caption
        if caption == "transformer":
            self.caption_encoder = CaptionEncoder(
                vocab_size=vocab_size, context_length=text_length, width=caption_width,
                layers=caption_layers, heads=caption_heads,
            )
        elif caption == "clip_tokens":
            if token_dim is None:
                raise ValueError("caption='clip_tokens' needs token_dim (the CLIP text encoder's width)")
            self.caption_encoder = ClipTokenProjection(token_dim=token_dim, width=caption_width)
        else:
            self.caption_encoder = None
        self.unet = UNet(
            image_size=image_size,
            image_embed_dim=image_embed_dim,
            context_dim=caption_width if self.caption_encoder is not None else None,
            **unet,
        )
        self.image_size = image_size
        self.image_embed_dim = image_embed_dim
        self.diffusion = GaussianDiffusion(num_steps, schedule, objective, loss_weighting, clip_denoised=(-1.0, 1.0))
        self.image_embed_drop_prob = image_embed_drop_prob
        self.caption_drop_prob = caption_drop_prob

    # -- conditioning -----------------------------------------------------------------------
    def _check_embed(self, image_embed: torch.Tensor) -> None:
        if image_embed.ndim != 2 or image_embed.shape[1] != self.image_embed_dim:
            raise ValueError(
                f"image_embed must be [B, {self.image_embed_dim}] (the CLIP embedding width this decoder was "
                f"built for), got {tuple(image_embed.shape)}"
            )

    def _caption_context(self, text: TextCondition | None):
        if self.caption_encoder is None or text is None:
            return None, None, None
        if self.caption == "transformer":
            states, pooled = self.caption_encoder(text.tokens, text.mask)
        else:
            states, pooled = self.caption_encoder(text.token_embeds, text.mask)
        return states, text.mask, pooled

    def _net(self, x, t, drop, image_embed, context, context_mask, pooled_context, drop_caption=None):
        drop_caption = drop if drop_caption is None else drop_caption | drop
        return self.unet(
            x, t, image_embed=image_embed, context=context, context_mask=context_mask,
            pooled_context=pooled_context, drop_image_embed=drop, drop_context=drop_caption,
        )

    # -- training ---------------------------------------------------------------------------
    def training_loss(
        self,
        images: torch.Tensor,
        image_embed: torch.Tensor,
        text: TextCondition | None = None,
        *,
        t: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        drop_image_embed: torch.Tensor | None = None,
        drop_caption: torch.Tensor | None = None,
    ) -> dict:
        """images [B, 3, S, S] in [-1, 1]; image_embed [B, D] unit-norm; text for the caption (optional).

        ``t`` [B], ``noise`` [B, 3, S, S] and the drop flags [B] (bool) are drawn at random unless given.
        """
        if images.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(f"images must be {self.image_size}x{self.image_size}, got {tuple(images.shape[-2:])}")
        self._check_embed(image_embed)
        batch, device = images.shape[0], images.device
        drop_embed = drop_image_embed
        if drop_embed is None:
            drop_embed = torch.rand(batch, device=device) < self.image_embed_drop_prob
        if drop_caption is None:
            drop_caption = torch.rand(batch, device=device) < self.caption_drop_prob
        context, context_mask, pooled = self._caption_context(text)
        losses = self.diffusion.training_loss(
            lambda x, t: self.unet(
                x, t, image_embed=image_embed, context=context, context_mask=context_mask,
                pooled_context=pooled, drop_image_embed=drop_embed,
                drop_context=drop_caption if context is not None else None,
            ),
            images,
            t=t,
            noise=noise,
        )
        return {"loss": losses.mean()}

    # -- sampling ---------------------------------------------------------------------------
    @torch.no_grad()
    def sample(
        self,
        image_embed: torch.Tensor,
        text: TextCondition | None = None,
        *,
        steps: int = 50,
        guidance_scale: float = 3.0,
        sampler: str = "ddim",
        eta: float = 0.0,
        generator: torch.Generator | None = None,
        noise: torch.Tensor | None = None,
        progress: bool = False,
        cuda_graphs: str | bool | None = "auto",
    ) -> torch.Tensor:
        """Images [B, 3, S, S] in [-1, 1] for unit-norm image embeddings [B, D]; ``cuda_graphs``: see
        ``unclip.diffusion.graphs`` (on CUDA the steps are replayed from a CUDA graph unless ``"off"``)."""
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
        self._check_embed(image_embed)
        if image_embed.shape[0] == 0:
            raise ValueError("the decoder got zero image embeddings; expected at least one")
        device = next(self.parameters()).device
        image_embed = image_embed.to(device).float()
        batch = image_embed.shape[0]
        if text is not None:
            if len(text) != batch:
                raise ValueError(f"{len(text)} captions for {batch} image embeddings")
            text = text.to(device)
        context, context_mask, pooled = self._caption_context(text)
        model_fn = classifier_free_guidance(
            self._net, guidance_scale, image_embed=image_embed, context=context,
            context_mask=context_mask, pooled_context=pooled,
        )
        shape = (batch, 3, self.image_size, self.image_size)
        if noise is None:
            noise = torch.randn(shape, device=device, generator=generator)
        elif tuple(noise.shape) != shape:
            raise ValueError(f"noise must have shape {shape}, got {tuple(noise.shape)}")
        noise = sampling_layout(noise.to(device))
        common = dict(steps=steps, generator=generator, progress=progress, cuda_graphs=cuda_graphs)
        if sampler == "ddpm":
            out = sample_ddpm(model_fn, self.diffusion, noise, **common)
        else:
            out = sample_ddim(model_fn, self.diffusion, noise, eta=eta, **common)
        return out.contiguous()
