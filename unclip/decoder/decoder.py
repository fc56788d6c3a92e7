"""The decoder stage (DALL-E 2, section 2.1): CLIP image embedding (+ caption) -> image, GLIDE-style."""

from __future__ import annotations

import torch
from torch import nn

from unclip.configurable import configurable
from unclip.decoder.conditioning import CaptionCondition, ImageEmbedCondition
from unclip.decoder.text_encoder import CaptionEncoder, ClipTokenProjection
from unclip.decoder.unet import UNet, embedding_width, sampling_layout, with_resolved_upsample_width
from unclip.diffusion import GaussianDiffusion, classifier_free_guidance, sample_ddim, sample_ddpm
from unclip.embedding import TextCondition

CAPTION_MODES = ("transformer", "clip_tokens", "none")
SAMPLERS = ("ddim", "ddpm")


def _caption_encoder(caption: str, vocab_size: int, text_length: int, token_dim: int | None, width: int,
                     layers: int, heads: int) -> nn.Module | None:
    """The decoder's caption encoder for ``caption`` (every one reads a TextCondition: ``encode(text)``)."""
    if caption == "transformer":
        return CaptionEncoder(vocab_size=vocab_size, context_length=text_length, width=width, layers=layers,
                              heads=heads)
    if caption == "clip_tokens":
        if token_dim is None:
            raise ValueError("caption='clip_tokens' needs token_dim (the CLIP text encoder's width)")
        return ClipTokenProjection(token_dim=token_dim, width=width)
    return None


@configurable
class Decoder(nn.Module):
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
        standardise_embed: bool = False,
    ):
        super().__init__()
        if caption not in CAPTION_MODES:
            raise ValueError(f"caption must be one of {CAPTION_MODES}, got {caption!r}")
        for name, p in (("image_embed_drop_prob", image_embed_drop_prob), ("caption_drop_prob", caption_drop_prob)):
            if not 0 <= p < 1:
                raise ValueError(f"{name} must be in [0, 1), got {p}")
        unet = with_resolved_upsample_width(unet)
        self.caption = caption
        self.caption_encoder = _caption_encoder(caption, vocab_size, text_length, token_dim, caption_width,
                                                caption_layers, caption_heads)
        body = dict(unet)
        num_image_tokens = body.pop("num_image_tokens", 4)
        spatial_grid = body.pop("spatial_embed_grid", 0)
        embed_hidden = body.pop("image_embed_hidden", 0)
        emb_dim = embedding_width(body.get("base_channels", 64))
        conditions = {}
        if self.caption_encoder is not None:
            conditions["caption"] = CaptionCondition(caption_width, emb_dim)
        # image tokens join the caption's tokens, so they take its width (or the time embedding's without one)
        token_width = caption_width if self.caption_encoder is not None else emb_dim
        conditions["image"] = ImageEmbedCondition(
            image_embed_dim, emb_dim, token_width, num_image_tokens, spatial_grid=spatial_grid,
            base_channels=body.get("base_channels", 64), standardise=standardise_embed, hidden=embed_hidden,
        )
        self.unet = UNet(image_size=image_size, conditions=conditions, **body)
        self.image_size = image_size
        self.image_embed_dim = image_embed_dim
        self.diffusion = GaussianDiffusion(num_steps, schedule, objective, loss_weighting, clip_denoised=(-1.0, 1.0))
        self.image_embed_drop_prob = image_embed_drop_prob
        self.caption_drop_prob = caption_drop_prob
        self.standardise_embed = standardise_embed

    @torch.no_grad()
    def fit_normalisation(self, image_embeds: torch.Tensor) -> None:
        """With ``standardise_embed``: measure the per-dimension mean and std of training image embeddings [N, D],
        which the decoder then standardises every embedding with (the prior does the same)."""
        self.unet.conditions["image"].fit_normalisation(image_embeds)

    def _rebuild_arguments(self, given: dict) -> dict:
        """The saved config names the UNet's upsample_width, so a later change of its default cannot rebuild
        a saved model differently."""
        return {**given, "unet": with_resolved_upsample_width(given["unet"])}

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
        states, pooled = self.caption_encoder.encode(text)
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
    ) -> torch.Tensor:
        """Images [B, 3, S, S] in [-1, 1] for unit-norm image embeddings [B, D]."""
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
        if sampler == "ddpm":
            out = sample_ddpm(model_fn, self.diffusion, noise, steps=steps, generator=generator, progress=progress)
        else:
            out = sample_ddim(model_fn, self.diffusion, noise, steps=steps, eta=eta, generator=generator, progress=progress)
        return out.contiguous()
