"""Corruptions of an upsampler's conditioning image during training (DALL-E 2, appendix on the upsamplers).

At sampling time an upsampler is given the previous stage's output, which is softer and less clean than the
downsized real image it trains on; corrupting the training input teaches it to repair what it will be given instead
of copying it. DALL-E 2 blurs the input of its first upsampler and applies the more varied BSR degradation (Zhang et
al. 2021, "BSRGAN") to its second. Here both work on the low-resolution image at its own size (16 to 64 px), batched,
on the images' device; every image gets its own draw, every draw comes from ``generator`` (torch's default generator
of the images' device when it is None, as the rest of ``training_loss`` draws), so that a seeded run repeats exactly.

- ``none``: the image as it is.
- ``blur``: Gaussian blur of a random sigma in ``BLUR_SIGMA`` px, on half the images (``BLUR_PROBABILITY``), as
  Cascaded Diffusion Models and DALLE2-pytorch do: the other half keeps the upsampler able to take a sharp input.
- ``bsr``: latent-diffusion's light BSR variant (``degradation_bsrgan_variant``, written for 4x super-resolution to a
  64-px input), in a random order per image: a random isotropic or anisotropic Gaussian blur, a down-then-up resize
  with random interpolation, Gaussian noise of a random level and colour structure, and JPEG compression at a random
  quality. Its size changes are dropped (the upsampler's input size is fixed) and its strengths are stated in pixels
  of the low-resolution image; the ranges are the constants below.
"""

from __future__ import annotations

import io

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

DEGRADATIONS = ("none", "blur", "bsr")

# blur: the sigma range used at 64 px (Cascaded Diffusion Models; DALLE2-pytorch's default is 0.6), kept in pixels of
# the low-resolution image whatever its size: the flaws it imitates, the previous stage's softness, are about a pixel
# wide at any size. A 5-tap kernel holds the Gaussian out to 3 sigma at 0.6 px (DALLE2-pytorch's 3-tap one cuts it at
# 1.7 sigma, nearer a box).
BLUR_SIGMA = (0.4, 0.6)
BLUR_KERNEL = 5
BLUR_PROBABILITY = 0.5

# bsr, in pixels of the low-resolution image. Blur: isotropic sigma, or the two axis sigmas of an anisotropic kernel at
# a random angle (the light variant's at the 64-px input size), in a 7-tap kernel (3 sigma at 1 px).
BSR_ISOTROPIC_SIGMA = (0.2, 0.8)
BSR_ANISOTROPIC_SIGMA = (0.2, 1.0)
BSR_KERNEL = 7
# Down by a factor in this range (the light variant's down-sampling, relative to its output size), to no fewer than
# BSR_MIN_SIZE px, then back up; down by area, bilinear or bicubic, up by bilinear or bicubic (upsampling by area is
# nearest-neighbour blocks, a flaw no stage makes).
BSR_RESIZE_FACTOR = (1.0, 2.0)
BSR_MIN_SIZE = 8
# Noise std in 8-bit levels (of 255; twice that on the [-1, 1] scale): between the light variant's 1-2 and BSRGAN's
# 2-25, since the upsampler adds its own Gaussian noise augmentation on top. Independent per channel, the same in
# every channel (grey) or colour-correlated, with BSRGAN's probabilities 0.4 / 0.4 / 0.2.
BSR_NOISE_LEVEL = (1.0, 10.0)
BSR_NOISE_KINDS = (0.4, 0.4, 0.2)
# JPEG quality: an 8x8 block and 4:2:0 chroma are a large part of a 16- to 64-px image, so the low end stays high
# (BSRGAN's 30 smears such an image into blocks; the light variant uses 80-95).
BSR_JPEG_QUALITY = (70, 95)


def check_degradation(kind: str) -> str:
    """``kind`` if it names a degradation, else a ValueError naming it and the choices."""
    if not isinstance(kind, str) or kind not in DEGRADATIONS:
        choices = ", ".join(DEGRADATIONS)
        raise ValueError(f"unknown degradation {kind!r}: upsampler.degradation must be one of {choices}")
    return kind


def degrade(low_res: torch.Tensor, kind: str, generator: torch.Generator | None = None) -> torch.Tensor:
    """Corrupt ``low_res`` [B, 3, s, s] in [-1, 1] by ``kind`` (one of DEGRADATIONS), each image its own draw.

    Returns the same dtype, shape and device, clamped to [-1, 1]; ``none`` returns ``low_res`` itself. ``generator``
    must be on the images' device. ``bsr`` JPEG-compresses on the CPU (PIL), so on a GPU it costs a copy there and
    back, a few kB an image."""
    check_degradation(kind)
    if kind == "none" or low_res.shape[0] == 0:
        return low_res
    if low_res.ndim != 4 or low_res.shape[1] != 3 or low_res.shape[-1] != low_res.shape[-2]:
        raise ValueError(f"degrade takes square images [B, 3, s, s], got {tuple(low_res.shape)}")
    if low_res.shape[-1] < BSR_MIN_SIZE:
        raise ValueError(f"degrade takes images of at least {BSR_MIN_SIZE} px, got {low_res.shape[-1]}")
    images = low_res.float().clone()
    out = _blur(images, generator) if kind == "blur" else _bsr(images, generator)
    return out.clamp(-1, 1).to(low_res.dtype)


def _uniform(n: int, bounds: tuple[float, float], device, generator) -> torch.Tensor:
    low, high = bounds
    return low + (high - low) * torch.rand(n, device=device, generator=generator)


def gaussian_kernels(sigma_x: torch.Tensor, sigma_y: torch.Tensor, angle: torch.Tensor, size: int) -> torch.Tensor:
    """[B] axis sigmas (px) and rotation angles -> [B, size, size] normalised Gaussian kernels. A sigma of 0 gives
    the identity kernel (a single 1)."""
    offsets = torch.arange(size, device=sigma_x.device, dtype=torch.float32) - (size - 1) / 2
    y, x = torch.meshgrid(offsets, offsets, indexing="ij")
    cos, sin = angle.cos().view(-1, 1, 1), angle.sin().view(-1, 1, 1)
    along, across = cos * x + sin * y, -sin * x + cos * y  # coordinates on the kernel's own axes
    var_x = sigma_x.clamp(min=1e-4).square().view(-1, 1, 1)
    var_y = sigma_y.clamp(min=1e-4).square().view(-1, 1, 1)
    kernels = torch.exp(-0.5 * (along.square() / var_x + across.square() / var_y))
    return kernels / kernels.sum(dim=(1, 2), keepdim=True)


def convolve(images: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
    """Each image [B, 3, H, W] with its own kernel [B, k, k] (odd k), in one grouped convolution; mirror padding,
    so that a flat image stays flat to the edge."""
    batch, channels, height, width = images.shape
    pad = kernels.shape[-1] // 2
    padded = F.pad(images.reshape(1, batch * channels, height, width), (pad, pad, pad, pad), mode="reflect")
    weight = kernels.to(images.dtype).repeat_interleave(channels, dim=0).unsqueeze(1)
    return F.conv2d(padded, weight, groups=batch * channels).reshape(batch, channels, height, width)


def _blur(images: torch.Tensor, generator) -> torch.Tensor:
    batch, device = images.shape[0], images.device
    sigma = _uniform(batch, BLUR_SIGMA, device, generator)
    sigma = torch.where(torch.rand(batch, device=device, generator=generator) < BLUR_PROBABILITY, sigma, 0.0)
    return convolve(images, gaussian_kernels(sigma, sigma, torch.zeros_like(sigma), BLUR_KERNEL))


def _bsr_blur(images: torch.Tensor, generator) -> torch.Tensor:
    """Half isotropic, half anisotropic at a random angle."""
    batch, device = images.shape[0], images.device
    isotropic = torch.rand(batch, device=device, generator=generator) < 0.5
    round_sigma = _uniform(batch, BSR_ISOTROPIC_SIGMA, device, generator)
    sigma_x = torch.where(isotropic, round_sigma, _uniform(batch, BSR_ANISOTROPIC_SIGMA, device, generator))
    sigma_y = torch.where(isotropic, round_sigma, _uniform(batch, BSR_ANISOTROPIC_SIGMA, device, generator))
    angle = _uniform(batch, (0.0, torch.pi), device, generator)
    return convolve(images, gaussian_kernels(sigma_x, sigma_y, angle, BSR_KERNEL))


def _bsr_resize(images: torch.Tensor, generator) -> torch.Tensor:
    """Down by a random factor and mode, back up by a random mode; one interpolation per (size, modes) group."""
    batch, size, device = images.shape[0], images.shape[-1], images.device
    factor = _uniform(batch, BSR_RESIZE_FACTOR, device, generator)
    small = (size / factor).round().clamp(min=min(BSR_MIN_SIZE, size)).long()
    down = torch.randint(0, 3, (batch,), device=device, generator=generator)
    up = torch.randint(0, 2, (batch,), device=device, generator=generator)
    keys = list(zip(small.tolist(), down.tolist(), up.tolist()))
    out = images.clone()
    for key in sorted(set(keys)):
        if key[0] == size:
            continue
        index = torch.tensor([i for i, k in enumerate(keys) if k == key], device=device)
        shrunk = _interpolate(images[index], key[0], ("area", "bilinear", "bicubic")[key[1]])
        out[index] = _interpolate(shrunk, size, ("bilinear", "bicubic")[key[2]])
    return out.clamp(-1, 1)


def _interpolate(images: torch.Tensor, size: int, mode: str) -> torch.Tensor:
    if mode == "area":
        return F.interpolate(images, size=(size, size), mode="area")
    return F.interpolate(images, size=(size, size), mode=mode, align_corners=False)


def _bsr_noise(images: torch.Tensor, generator) -> torch.Tensor:
    """Gaussian noise, per image independent per channel, grey, or colour-correlated (a random mixing matrix
    scaled to unit mean variance per channel)."""
    batch, device = images.shape[0], images.device
    level = _uniform(batch, BSR_NOISE_LEVEL, device, generator) * 2 / 255  # std on the [-1, 1] scale
    kind = torch.multinomial(torch.tensor(BSR_NOISE_KINDS, device=device).expand(batch, -1), 1, generator=generator)
    kind = kind.view(-1, 1, 1)
    grey = torch.zeros(3, 3, device=device)
    grey[:, 0] = 1.0
    mixing = torch.randn(batch, 3, 3, device=device, generator=generator)
    mixing = mixing * (3**0.5 / mixing.square().sum(dim=(1, 2), keepdim=True).sqrt())
    matrix = torch.where(kind == 0, torch.eye(3, device=device), torch.where(kind == 1, grey, mixing))
    white = torch.randn(images.shape, device=device, generator=generator)
    noise = torch.einsum("bij,bjhw->bihw", matrix, white)
    return (images + level.view(-1, 1, 1, 1) * noise).clamp(-1, 1)


def _bsr_jpeg(images: torch.Tensor, generator) -> torch.Tensor:
    """JPEG at a random quality per image, through PIL on the CPU (torchvision 0.29's encode_jpeg/decode_jpeg would
    do the same but are deprecated, to be removed in favour of TorchCodec)."""
    low, high = BSR_JPEG_QUALITY
    quality = torch.randint(low, high + 1, (images.shape[0],), device=images.device, generator=generator).tolist()
    pixels = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    decoded = []
    for array, q in zip(pixels, quality):
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="JPEG", quality=q)
        decoded.append(np.asarray(Image.open(buffer).convert("RGB")))
    out = torch.from_numpy(np.stack(decoded)).to(images.device).permute(0, 3, 1, 2)
    return out.float() / 127.5 - 1.0


BSR_STEPS = (_bsr_blur, _bsr_resize, _bsr_noise, _bsr_jpeg)


def _bsr(images: torch.Tensor, generator) -> torch.Tensor:
    """The steps in a random order per image: at each position, each step runs on the images that have it there."""
    batch, device = images.shape[0], images.device
    order = torch.rand(batch, len(BSR_STEPS), device=device, generator=generator).argsort(dim=1)
    for position in range(len(BSR_STEPS)):
        for number, step in enumerate(BSR_STEPS):
            index = (order[:, position] == number).nonzero().view(-1)
            if index.numel():
                images[index] = step(images[index], generator)
    return images
