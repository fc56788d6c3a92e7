"""The upsampler stage: a diffusion UNet conditioned on a noise-augmented low-resolution image."""

from __future__ import annotations

import torch
from torch import nn

from unclip.configurable import configurable
from unclip.decoder.conditioning import LowResCondition
from unclip.decoder.degradation import check_degradation, degrade
from unclip.decoder.unet import (
    UNet,
    embedding_width,
    sampling_layout,
    with_resolved_upsample_width,
)
from unclip.diffusion import GaussianDiffusion, Inpainting, check_sampler, sample, sample_repaint
from unclip.diffusion.samplers import INPAINTING_SAMPLERS
from unclip.images import resize


@configurable
class Upsampler(nn.Module):
    """``low_res_size`` -> ``image_size``. Training corrupts the conditioning image with Gaussian noise of a
    random level in [0, ``max_aug_level``] (fed to the model), so that it tolerates the decoder's flaws, and first
    with ``degradation`` (``unclip.decoder.degradation``: none, blur or bsr, DALL-E 2's choices for its first and
    second upsampler).

    ``train_crop`` (DALL-E 2's recipe for its upsamplers): train on random ``train_crop`` x ``train_crop`` crops of the
    ``image_size`` target and of the upsampled conditioning image at the same place, a sixteenth of the work at a
    quarter of the side; sampling runs on the whole image. It needs a convolutional UNet (``attention_resolutions:
    []``, ``middle_attention: false``), whose convolutions see the same neighbourhoods either way; its GroupNorm
    statistics do not (a crop of `shapes` is often all white), which costs whole-image sampling steps
    (docs/results.md#the-256-px-cascade).

    With ``predict_residual`` the diffusion runs on the difference between the high-resolution image and the
    bicubic upsampling of the low-resolution one: zero wherever the low-resolution image already says it
    all (flat regions), so sampling noise cannot tint them; the result is ``bicubic + residual``.
    """

    def __init__(
        self,
        *,
        low_res_size: int,
        image_size: int,
        unet: dict | None = None,
        num_steps: int = 1000,
        schedule: str = "cosine",
        objective: str = "v",
        loss_weighting: str = "min_snr",
        max_aug_level: float = 0.2,
        predict_residual: bool = True,
        train_crop: int | None = None,
        degradation: str = "none",
    ):
        super().__init__()
        if not 0 < low_res_size < image_size:
            raise ValueError(f"low_res_size must be in (0, image_size={image_size}), got {low_res_size}")
        if not 0 <= max_aug_level <= 1:
            raise ValueError(f"max_aug_level must be in [0, 1], got {max_aug_level}")
        unet = with_resolved_upsample_width(unet)
        self.predict_residual = predict_residual
        self.low_res_size, self.image_size, self.max_aug_level = low_res_size, image_size, max_aug_level
        conditions = {"low_res": LowResCondition(3, embedding_width(unet.get("base_channels", 64)),
                                                 unet.get("base_channels", 64))}
        self.unet = UNet(image_size=image_size, conditions=conditions, **unet)
        self.degradation = check_degradation(degradation)
        self.train_crop = self._check_crop(train_crop)
        bound = 2.0 if predict_residual else 1.0  # a residual of [-1, 1] images lies in [-2, 2]
        self.diffusion = GaussianDiffusion(num_steps, schedule, objective, loss_weighting, clip_denoised=(-bound, bound))

    def _check_crop(self, crop: int | None) -> int | None:
        if crop is None or crop == self.image_size:
            return None
        if not isinstance(crop, int) or not 0 < crop <= self.image_size:
            raise ValueError(f"train_crop must be an int in (0, image_size={self.image_size}] or null, got {crop!r}")
        if crop % self.unet.size_multiple:
            raise ValueError(f"train_crop={crop} must be a multiple of the UNet's downsampling, "
                             f"{self.unet.size_multiple} (2 ** (len(channel_mult) - 1))")
        if not self.unet.convolutional:
            raise ValueError(f"train_crop={crop} needs a convolutional UNet, whose convolutions see the same neighbourhoods on a "
                             f"crop and on the whole image: set unet.attention_resolutions=[] and "
                             f"unet.middle_attention=false (conf/upsampler/unet_64_256.yaml)")
        return crop

    def _rebuild_arguments(self, given: dict) -> dict:
        """The saved config names the UNet's upsample_width, so a later change of its default cannot rebuild
        a saved model differently."""
        return {**given, "unet": with_resolved_upsample_width(given["unet"])}

    def _check_low_res(self, low_res: torch.Tensor) -> None:
        if low_res.ndim != 4 or low_res.shape[1] != 3 or low_res.shape[-2:] != (self.low_res_size, self.low_res_size):
            raise ValueError(
                f"the upsampler takes low-resolution images [B, 3, {self.low_res_size}, {self.low_res_size}], "
                f"got {tuple(low_res.shape)}"
            )

    def condition(self, low_res: torch.Tensor, aug_level: torch.Tensor, generator=None) -> torch.Tensor:
        """The model's conditioning: ``low_res`` upsampled to the output size, plus noise of ``aug_level``."""
        up = resize(low_res, self.image_size)
        noise = torch.randn(up.shape, device=up.device, generator=generator)
        return up + aug_level.view(-1, 1, 1, 1) * noise

    def _crops(self, *images: torch.Tensor, at: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        """The same ``train_crop`` square of each of ``images`` [B, C, S, S]: its own random place per row, or the
        top-left corners ``at`` [B, 2] (rows, columns)."""
        batch, size, crop = images[0].shape[0], self.image_size, self.train_crop
        at = torch.randint(0, size - crop + 1, (2, batch)).T if at is None else at
        top, left = at.T.tolist()
        return tuple(torch.stack([x[i, :, top[i]:top[i] + crop, left[i]:left[i] + crop] for i in range(batch)])
                     for x in images)

    def training_loss(self, images: torch.Tensor, *, t=None, noise=None, aug_level=None, aug_noise=None,
                      crop_at=None) -> dict:
        """images [B, 3, image_size, image_size] in [-1, 1]; the low-res input is made from them (and degraded),
        and with ``train_crop`` the loss is that of random crops. The random draws are made here unless given per
        row (a test's data-parallel equality): ``t`` [B], ``noise`` and ``aug_noise`` [B, 3, C, C] (C: the crop's
        side or image_size), ``aug_level`` [B] in [0, max_aug_level], ``crop_at`` [B, 2]."""
        if images.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(f"images must be {self.image_size}x{self.image_size}, got {tuple(images.shape[-2:])}")
        low_res = degrade(resize(images, self.low_res_size), self.degradation)
        up = resize(low_res, self.image_size)
        target = images.float() - up if self.predict_residual else images.float()
        if self.train_crop is not None:
            target, up = self._crops(target, up, at=crop_at)
        if aug_level is None:
            aug_level = torch.rand(images.shape[0], device=images.device) * self.max_aug_level
        cond = up + aug_level.view(-1, 1, 1, 1) * (torch.randn_like(up) if aug_noise is None else aug_noise)
        scaled = aug_level / max(self.max_aug_level, 1e-8)
        losses = self.diffusion.training_loss(lambda x, t: self.unet(x, t, low_res=cond, aug_level=scaled), target,
                                              t=t, noise=noise)
        return {"loss": losses.mean()}

    @torch.no_grad()
    def sample(
        self,
        low_res: torch.Tensor,
        *,
        steps: int = 25,
        aug_level: float = 0.05,
        eta: float = 0.0,
        generator: torch.Generator | None = None,
        progress: bool = False,
        inpaint: Inpainting | None = None,
        cuda_graphs: str | bool | None = "auto",
        sampler: str = "ddim",
        spacing: str = "uniform",
    ) -> torch.Tensor:
        """Upsample [B, 3, low_res_size, low_res_size] in [-1, 1] to [B, 3, image_size, image_size].

        ``sampler`` / ``spacing``: see ``unclip.diffusion.samplers`` (inpainting needs one of its
        ``INPAINTING_SAMPLERS``).

        ``inpaint``: keep ``inpaint.known`` [B, 3, image_size, image_size] where ``inpaint.keep`` [B, 1, image_size,
        image_size] is 1 (RePaint's sampler; the output equals the known image there). ``cuda_graphs``: see
        ``unclip.diffusion.graphs``."""
        self._check_low_res(low_res)
        check_sampler(sampler, steps, eta, spacing)
        if inpaint is not None and sampler not in INPAINTING_SAMPLERS:
            raise ValueError(f"sampler {sampler!r} cannot inpaint: RePaint steps with DDIM; use one of "
                             f"{list(INPAINTING_SAMPLERS)} (in a pipeline: upsampler_sampler=...)")
        if not 0 <= aug_level <= self.max_aug_level:
            raise ValueError(f"aug_level must be in [0, max_aug_level={self.max_aug_level}], got {aug_level}")
        device = next(self.parameters()).device
        low_res = low_res.to(device)
        batch = low_res.shape[0]
        level = torch.full((batch,), float(aug_level), device=device)
        cond = self.condition(low_res, level, generator)
        scaled = level / max(self.max_aug_level, 1e-8)

        def model_fn(x, t):
            return self.unet(x, t, low_res=cond, aug_level=scaled).float()

        noise = torch.randn(batch, 3, self.image_size, self.image_size, device=device, generator=generator)
        cond = sampling_layout(cond)
        base = resize(low_res, self.image_size) if self.predict_residual else torch.zeros_like(noise)
        if inpaint is None:
            out = sample(sampler, model_fn, self.diffusion, sampling_layout(noise), steps, eta=eta, generator=generator,
                         progress=progress, cuda_graphs=cuda_graphs, spacing=spacing)
        else:
            if tuple(inpaint.known.shape) != tuple(noise.shape) or tuple(inpaint.keep.shape) != (batch, 1, *noise.shape[2:]):
                raise ValueError(f"inpaint needs known {list(noise.shape)} and keep [B, 1, S, S], got "
                                 f"{list(inpaint.known.shape)} and {list(inpaint.keep.shape)}")
            known = sampling_layout(inpaint.known.to(device).float() - base)  # in the diffusion's (residual) space
            inpaint = Inpainting(known, inpaint.keep.to(device).float(), inpaint.jumps, inpaint.jump_length)
            out = sample_repaint(model_fn, self.diffusion, sampling_layout(noise), inpaint, steps=steps, eta=eta,
                                 generator=generator, progress=progress, spacing=spacing)
        return (base + out.contiguous()).clamp(-1, 1) if self.predict_residual else out.contiguous().clamp(-1, 1)
