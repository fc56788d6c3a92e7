"""The decoder stage (DALL-E 2, section 2.1): CLIP image embedding (+ caption) -> image, GLIDE-style."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from unclip.configurable import configurable
from unclip.decoder.conditioning import (
    CaptionCondition,
    ImageEmbedCondition,
    MaskedImageCondition,
)
from unclip.decoder.inpainting import check_mask_mix, random_keep_masks
from unclip.decoder.text_encoder import CaptionEncoder, ClipTokenProjection
from unclip.decoder.unet import (
    UNet,
    embedding_width,
    sampling_layout,
    with_resolved_upsample_width,
)
from unclip.diffusion import (
    GaussianDiffusion,
    Inpainting,
    check_sampler,
    classifier_free_guidance,
    noised_start,
    sample,
    sample_repaint,
)
from unclip.diffusion.samplers import INPAINTING_SAMPLERS
from unclip.embedding import TextCondition

CAPTION_MODES = ("transformer", "clip_tokens", "none")
IMAGE_EMBED_SETTINGS = ("num_image_tokens", "spatial_embed_grid")  # the image-embedding conditioning's, not the UNet's


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

    ``inpaint=True`` (GLIDE's inpainting model): the UNet also takes the known image (zero where masked) and the
    keep mask as 4 input channels, whose input-convolution weights start at zero; it trains on random masks
    (``mask_mix``, see ``unclip.decoder.inpainting``) and samples only given one (``sample(inpaint=...)``).
    """

    def __init__(
        self,
        *,
        image_size: int,
        image_embed_dim: int,
        text_length: int,
        token_dim: int | None = None,
        unet: dict | None = None,
        num_image_tokens: int = 4,
        spatial_embed_grid: int = 0,
        caption: str = "transformer",
        caption_width: int = 128,
        caption_layers: int = 2,
        caption_heads: int = 4,
        vocab_size: int = 49408,
        num_steps: int = 1000,
        schedule: str = "cosine",
        objective: str = "v",
        loss_weighting: str = "min_snr",
        min_snr_floor: float = 0.0,
        image_embed_drop_prob: float = 0.1,
        caption_drop_prob: float = 0.5,
        standardise_embed: bool = False,
        inpaint: bool = False,
        mask_mix: dict | None = None,
    ):
        super().__init__()
        if caption not in CAPTION_MODES:
            raise ValueError(f"caption must be one of {CAPTION_MODES}, got {caption!r}")
        for name, p in (("image_embed_drop_prob", image_embed_drop_prob), ("caption_drop_prob", caption_drop_prob)):
            if not 0 <= p < 1:
                raise ValueError(f"{name} must be in [0, 1), got {p}")
        moved = sorted(set(unet or {}) & set(IMAGE_EMBED_SETTINGS))
        if moved:
            raise ValueError(f"unet: no longer takes {', '.join(moved)}: the image-embedding conditioning's settings "
                             f"stand beside unet: in the decoder's config (e.g. decoder.{moved[0]}=...)")
        unet = with_resolved_upsample_width(unet)
        self.caption = caption
        self.caption_encoder = _caption_encoder(caption, vocab_size, text_length, token_dim, caption_width,
                                                caption_layers, caption_heads)
        emb_dim = embedding_width(unet.get("base_channels", 64))
        conditions = {}
        if self.caption_encoder is not None:
            conditions["caption"] = CaptionCondition(caption_width, emb_dim)
        # image tokens join the caption's tokens, so they take its width (or the time embedding's without one)
        token_width = caption_width if self.caption_encoder is not None else emb_dim
        conditions["image"] = ImageEmbedCondition(
            image_embed_dim, emb_dim, token_width, num_image_tokens, spatial_grid=spatial_embed_grid,
            base_channels=unet.get("base_channels", 64), standardise=standardise_embed,
        )
        if inpaint:
            conditions["masked"] = MaskedImageCondition()
        self.unet = UNet(image_size=image_size, conditions=conditions, **unet)
        self.inpaints = bool(inpaint)
        self.mask_mix = check_mask_mix(mask_mix) if inpaint else None
        if inpaint:  # the known image and mask start with no say: the decoder is the plain one until fine-tuned
            torch.nn.init.zeros_(self.unet.input_conv.weight[:, 3:])
        self.image_size = image_size
        self.image_embed_dim = image_embed_dim
        self.diffusion = GaussianDiffusion(num_steps, schedule, objective, loss_weighting, clip_denoised=(-1.0, 1.0),
                                           min_snr_floor=min_snr_floor)
        self.image_embed_drop_prob = image_embed_drop_prob
        self.caption_drop_prob = caption_drop_prob
        self.standardise_embed = standardise_embed

    @classmethod
    def _upgrade_arguments(cls, arguments: dict) -> dict:
        """A config saved when the image-embedding settings stood in ``unet:``: in today's form, beside it."""
        unet = dict(arguments.get("unet") or {})
        moved = {name: unet.pop(name) for name in IMAGE_EMBED_SETTINGS if name in unet}
        return {**arguments, **moved, "unet": unet} if moved else arguments

    @torch.no_grad()
    def fit_normalisation(self, image_embeds: torch.Tensor) -> None:
        """With ``standardise_embed``: measure the per-dimension mean and std of training image embeddings [N, D],
        which the decoder then standardises every embedding with (the prior does the same)."""
        self.unet.conditions["image"].fit_normalisation(image_embeds)

    def _rebuild_arguments(self, given: dict) -> dict:
        """The saved config names the UNet's upsample_width, so a later change of its default cannot rebuild
        a saved model differently."""
        arguments = {**given, "unet": with_resolved_upsample_width(given["unet"])}
        inpaint = arguments.pop("inpaint", False)
        mask_mix = arguments.pop("mask_mix", None)
        # a plain decoder's config stays as it was before inpainting existed
        return {**arguments, "inpaint": True, "mask_mix": check_mask_mix(mask_mix)} if inpaint else arguments

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

    def _net(self, x, t, drop, image_embed, context, context_mask, pooled_context, drop_embed=None, drop_caption=None,
             masked_image=None, mask=None):
        """The UNet as guidance calls it: ``drop`` [B] (guidance's null rows) or'ed with the per-row flags."""
        drop_embed = drop if drop_embed is None else drop_embed | drop
        drop_caption = drop if drop_caption is None else drop_caption | drop
        return self.unet(
            x, t, image_embed=image_embed, context=context, context_mask=context_mask,
            pooled_context=pooled_context, drop_image_embed=drop_embed,
            drop_context=drop_caption if context is not None else None, masked_image=masked_image, mask=mask,
        )

    def _inpainting_inputs(self, images: torch.Tensor | None, keep: torch.Tensor | None) -> dict:
        """The inpainting channels' inputs (``masked_image``, ``mask``), or {} for a plain decoder."""
        if not self.inpaints:
            if keep is not None:
                raise ValueError("this decoder does not inpaint (built without inpaint=True): it takes no mask; "
                                 "inpaint with it through the RePaint sampler (sample(inpaint=...)) instead")
            return {}
        if keep is None:
            raise ValueError(
                "this is an inpainting decoder: it needs the known image and a keep mask (1 = keep, 0 = fill), "
                "e.g. sample(..., inpaint=Inpainting(known, keep)); a mask of zeros asks for a whole new image")
        size = self.image_size
        if keep.shape != (images.shape[0], 1, size, size):
            raise ValueError(f"the keep mask must be [B, 1, {size}, {size}] for images {list(images.shape)}, "
                             f"got {list(keep.shape)}")
        keep = keep.to(images.device, images.dtype)
        return {"masked_image": images * keep, "mask": keep}

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
        keep: torch.Tensor | None = None,
        metas: list | None = None,
    ) -> dict:
        """images [B, 3, S, S] in [-1, 1]; image_embed [B, D] unit-norm; text for the caption (optional).

        ``t`` [B], ``noise`` [B, 3, S, S] and the drop flags [B] (bool) are drawn at random unless given. An
        inpainting decoder also takes keep masks [B, 1, S, S], drawn from its ``mask_mix`` unless given (``metas``:
        the items' metadata, for masks over their objects).
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
        if self.inpaints and keep is None:
            keep = random_keep_masks(batch, self.image_size, metas, mix=self.mask_mix).to(device)
        inpainting = self._inpainting_inputs(images.float(), keep)
        context, context_mask, pooled = self._caption_context(text)
        losses = self.diffusion.training_loss(
            lambda x, t: self.unet(
                x, t, image_embed=image_embed, context=context, context_mask=context_mask,
                pooled_context=pooled, drop_image_embed=drop_embed,
                drop_context=drop_caption if context is not None else None, **inpainting,
            ),
            images,
            t=t,
            noise=noise,
        )
        return {"loss": losses.mean()}

    # -- sampling ---------------------------------------------------------------------------
    def _guidance_inputs(self, image_embed, text, negative_embed, negative_text, inpainting: dict):
        """The conditioning guidance passes to ``_net``, and the negative one (None without a negative). A side
        without a caption (none given, or a negative without text) has the other side's caption dropped."""
        batch = image_embed.shape[0]
        if negative_text is not None and len(negative_text) != batch:
            raise ValueError(f"{len(negative_text)} negative captions for {batch} image embeddings")
        if negative_embed is not None:
            self._check_embed(negative_embed)
            if negative_embed.shape[0] != batch:
                raise ValueError(f"{negative_embed.shape[0]} negative image embeddings for {batch} image embeddings")
        context, context_mask, pooled = self._caption_context(text)
        cond = dict(image_embed=image_embed, context=context, context_mask=context_mask, pooled_context=pooled,
                    **inpainting)
        if negative_embed is None and negative_text is None:
            return cond, None
        neg_context, neg_mask, neg_pooled = self._caption_context(negative_text)
        flags = torch.zeros(batch, dtype=torch.bool, device=image_embed.device)
        cond.update(drop_embed=flags, drop_caption=flags if context is not None else ~flags)
        negative = dict(cond, drop_embed=flags if negative_embed is not None else ~flags)
        if negative_embed is not None:
            negative["image_embed"] = negative_embed.to(image_embed)
        if neg_context is not None:
            negative.update(context=neg_context, context_mask=neg_mask, pooled_context=neg_pooled, drop_caption=flags)
            if context is None:  # the conditional side has no caption: the negative's, dropped
                cond.update(context=neg_context, context_mask=neg_mask, pooled_context=neg_pooled)
        else:
            negative["drop_caption"] = ~flags
        return cond, negative

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
        spacing: str = "uniform",
        generator: torch.Generator | None = None,
        noise: torch.Tensor | None = None,
        progress: bool = False,
        negative_embed: torch.Tensor | None = None,
        negative_text: TextCondition | None = None,
        inpaint: Inpainting | None = None,
        init_image: torch.Tensor | None = None,
        strength: float = 1.0,
        cuda_graphs: str | bool | None = "auto",
    ) -> torch.Tensor:
        """Images [B, 3, S, S] in [-1, 1] for unit-norm image embeddings [B, D].

        ``negative_embed`` [B, D] / ``negative_text``: guidance's unconditional branch (a negative prompt) instead of
        the learned nulls. ``sampler`` (``unclip.diffusion.SAMPLERS``) and ``spacing`` (``SPACINGS``): how the steps
        are taken (see ``unclip.diffusion.samplers``). ``inpaint``: keep ``inpaint.known`` [B, 3, S, S] where
        ``inpaint.keep`` [B, 1, S, S] is 1 and fill the rest (RePaint's sampler, DDIM steps with ``eta``; an inpainting
        decoder also sees them as input, and without jumps takes any sampler, the known region pasted in).
        ``init_image`` [B, 3, S, S] with ``strength`` in [0, 1]: image-to-image, starting from the image noised
        ``strength`` of the way (1: plain sampling, 0: the image back). ``cuda_graphs``: see
        ``unclip.diffusion.graphs`` (on CUDA the steps are replayed from a CUDA graph unless ``"off"``; not RePaint's).
        """
        check_sampler(sampler, steps, eta, spacing)
        self._check_embed(image_embed)
        if image_embed.shape[0] == 0:
            raise ValueError("the decoder got zero image embeddings; expected at least one")
        device = next(self.parameters()).device
        image_embed = image_embed.to(device).float()
        batch = image_embed.shape[0]
        shape = (batch, 3, self.image_size, self.image_size)
        if text is not None:
            if len(text) != batch:
                raise ValueError(f"{len(text)} captions for {batch} image embeddings")
            text = text.to(device)
        if inpaint is not None and init_image is not None:
            raise ValueError("inpaint and init_image cannot be combined; give one")
        inpaint = self._checked_inpainting(inpaint, shape, device)
        inpainting = {}  # a plain decoder inpaints through the sampler alone
        if self.inpaints:
            inpainting = self._inpainting_inputs(*((inpaint.known, inpaint.keep) if inpaint else (None, None)))
        cond, negative = self._guidance_inputs(
            image_embed, text, None if negative_embed is None else negative_embed.to(device).float(),
            None if negative_text is None else negative_text.to(device), inpainting)
        model_fn = classifier_free_guidance(self._net, guidance_scale, negative=negative, **cond)
        if noise is None:
            noise = torch.randn(shape, device=device, generator=generator)
        elif tuple(noise.shape) != shape:
            raise ValueError(f"noise must have shape {shape}, got {tuple(noise.shape)}")
        noise = sampling_layout(noise.to(device))
        run = dict(steps=steps, generator=generator, progress=progress, spacing=spacing)
        if inpaint is not None and self._repaints(sampler, inpaint):
            return sample_repaint(model_fn, self.diffusion, noise, inpaint, eta=eta, **run).contiguous()
        x, skip = self._start(noise, init_image, strength, steps, spacing)
        out = sample(sampler, model_fn, self.diffusion, x, eta=eta, skip=skip, cuda_graphs=cuda_graphs, **run)
        return (out if inpaint is None else inpaint.paste(out)).contiguous()

    def _repaints(self, sampler: str, inpaint: Inpainting) -> bool:
        """Whether inpainting runs RePaint (with DDIM steps). A sampler that cannot (DPM-Solver++) inpaints only with an
        inpainting decoder, whose network sees the known image and the mask, and no resampling jumps: it samples as
        usual and the known region is pasted into its output."""
        if sampler in INPAINTING_SAMPLERS:
            return True
        if not self.inpaints or inpaint.jumps:
            why = "this decoder does not inpaint by itself" if not self.inpaints else f"jumps={inpaint.jumps} > 0"
            raise ValueError(f"sampler {sampler!r} cannot inpaint here ({why}): RePaint steps with DDIM; use one of "
                             f"{list(INPAINTING_SAMPLERS)} (in a pipeline: decoder_sampler=...)")
        return False

    def _start(self, noise: torch.Tensor, init_image: torch.Tensor | None, strength: float, steps: int,
               spacing: str = "uniform"):
        """Where sampling starts: (x, steps to skip); image-to-image noises ``init_image`` by ``strength``."""
        if init_image is None:
            return noise, 0
        if tuple(init_image.shape) != tuple(noise.shape):
            raise ValueError(f"init_image must have shape {tuple(noise.shape)}, got {tuple(init_image.shape)}")
        image = sampling_layout(init_image.to(noise.device).float())
        return noised_start(self.diffusion, image, noise, steps, strength, spacing)

    def _checked_inpainting(self, inpaint: Inpainting | None, shape: tuple, device) -> Inpainting | None:
        if inpaint is None:
            return None
        if tuple(inpaint.known.shape) != shape or tuple(inpaint.keep.shape) != (shape[0], 1, *shape[2:]):
            raise ValueError(f"inpaint needs known [B, 3, S, S] = {list(shape)} and keep [B, 1, S, S], got "
                             f"{list(inpaint.known.shape)} and {list(inpaint.keep.shape)}")
        return dataclasses.replace(inpaint, known=sampling_layout(inpaint.known.to(device).float()),
                                   keep=inpaint.keep.to(device).float())
