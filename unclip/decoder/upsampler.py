"""The upsampler stage: a diffusion UNet conditioned on a noise-augmented low-resolution image."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from unclip.configurable import Configurable
from unclip.decoder.unet import UNet, sampling_layout, with_resolved_upsample_width
from unclip.diffusion import GaussianDiffusion, sample_ddim


def resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """Bicubic resize of [-1, 1] images (antialiased when shrinking), clamped back to [-1, 1]."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    out = F.interpolate(images.float(), size=(size, size), mode="bicubic", antialias=size < images.shape[-1], align_corners=False)
    return out.clamp(-1, 1)


class Upsampler(Configurable, nn.Module):
    """``low_res_size`` -> ``image_size``. Training corrupts the conditioning image with Gaussian noise of a
    random level in [0, ``max_aug_level``] (fed to the model), so that it tolerates the decoder's flaws.

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
    ):
        super().__init__()
        if not 0 < low_res_size < image_size:
            raise ValueError(f"low_res_size must be in (0, image_size={image_size}), got {low_res_size}")
        if not 0 <= max_aug_level <= 1:
            raise ValueError(f"max_aug_level must be in [0, 1], got {max_aug_level}")
        unet = with_resolved_upsample_width(unet)
        self.remember_config(
            low_res_size=low_res_size, image_size=image_size, unet=unet, num_steps=num_steps, schedule=schedule,
            objective=objective, loss_weighting=loss_weighting, max_aug_level=max_aug_level,
            predict_residual=predict_residual,
        )
        self.predict_residual = predict_residual
        self.low_res_size, self.image_size, self.max_aug_level = low_res_size, image_size, max_aug_level
        self.unet = UNet(image_size=image_size, low_res_channels=3, aug_level_conditioning=True, **unet)
        bound = 2.0 if predict_residual else 1.0  # a residual of [-1, 1] images lies in [-2, 2]
        self.diffusion = GaussianDiffusion(num_steps, schedule, objective, loss_weighting, clip_denoised=(-bound, bound))

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

    def training_loss(self, images: torch.Tensor) -> dict:
        """images [B, 3, image_size, image_size] in [-1, 1]; the low-res input is made from them."""
        if images.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(f"images must be {self.image_size}x{self.image_size}, got {tuple(images.shape[-2:])}")
        low_res = resize(images, self.low_res_size)
        aug_level = torch.rand(images.shape[0], device=images.device) * self.max_aug_level
        cond = self.condition(low_res, aug_level)
        scaled = aug_level / max(self.max_aug_level, 1e-8)
        target = images.float() - resize(low_res, self.image_size) if self.predict_residual else images.float()
        losses = self.diffusion.training_loss(lambda x, t: self.unet(x, t, low_res=cond, aug_level=scaled), target)
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
        cuda_graphs: str | bool | None = "auto",
    ) -> torch.Tensor:
        """Upsample [B, 3, low_res_size, low_res_size] in [-1, 1] to [B, 3, image_size, image_size];
        ``cuda_graphs``: see ``unclip.diffusion.graphs``."""
        self._check_low_res(low_res)
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
        out = sample_ddim(model_fn, self.diffusion, sampling_layout(noise), steps=steps, eta=eta, generator=generator,
                          progress=progress, cuda_graphs=cuda_graphs).contiguous()
        if self.predict_residual:
            out = resize(low_res, self.image_size) + out
        return out.clamp(-1, 1)
