"""The discrete VAE stage (DALL-E, section 2.1): image -> grid of codebook tokens -> image.

A conv encoder gives logits over ``codebook_size`` entries for every cell of a ``grid_size`` x ``grid_size``
grid. While training, a Gumbel-softmax sample of them (straight-through optional) mixes the codebook
vectors that the conv decoder turns back into the image; after training, ``encode`` takes the argmax token
of each cell and ``decode`` looks the tokens up. The loss is the reconstruction error plus a weighted KL
divergence of the cells' token distributions from the uniform prior (the paper's), and optionally
(``usage_kl_weight``) the KL divergence of the batch's aggregate token distribution from the uniform one
(wav2vec 2.0's diversity loss), which keeps codebook entries in use without making each cell uncertain:
on ``shapes``, where most cells are white background, the per-cell term alone lets the codebook collapse
to a few dozen entries early in training, after which the encoder no longer learns (a saturated softmax
passes no gradient).

The temperature and KL weight follow :mod:`unclip.dvae.schedules` as functions of the update step. The step
is passed to :meth:`DiscreteVAE.training_loss` or read from the ``schedule_step`` buffer, which a training
job advances once per optimizer update with :meth:`DiscreteVAE.advance_schedule`; the buffer lives in the
weights, so an exact resume continues the schedules where they were.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import einsum, rearrange
from torch import nn

from unclip.configurable import configurable
from unclip.distributed import global_mean
from unclip.dvae.schedules import gumbel_temperature, kl_weight

RECONSTRUCTION_LOSSES = ("mse", "l1")


class ResBlock(nn.Module):
    """relu -> conv3x3 -> relu -> conv3x3, added to the input (no normalisation: the paper's dVAE has none)."""

    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.ReLU(), nn.Conv2d(channels, channels, 3, padding=1),
            nn.ReLU(), nn.Conv2d(channels, channels, 3, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


def _encoder(channels: list[int], res_blocks: int, codebook_size: int) -> nn.Sequential:
    """[B, 3, S, S] -> logits [B, K, S / 2^levels, S / 2^levels]: one stride-2 conv per entry of ``channels``."""
    layers: list[nn.Module] = []
    previous = 3
    for width in channels:
        layers.append(nn.Conv2d(previous, width, 4, stride=2, padding=1))
        layers.extend(ResBlock(width) for _ in range(res_blocks))
        previous = width
    layers += [nn.ReLU(), nn.Conv2d(previous, codebook_size, 1)]
    return nn.Sequential(*layers)


def _decoder(channels: list[int], res_blocks: int, codebook_dim: int) -> nn.Sequential:
    """Codebook vectors [B, D, g, g] -> images [B, 3, g * 2^levels, ...]: the encoder mirrored."""
    layers: list[nn.Module] = [nn.Conv2d(codebook_dim, channels[-1], 1)]
    for i in reversed(range(len(channels))):
        layers.extend(ResBlock(channels[i]) for _ in range(res_blocks))
        out = channels[i - 1] if i > 0 else channels[0]
        layers += [nn.ReLU(), nn.ConvTranspose2d(channels[i], out, 4, stride=2, padding=1)]
    layers += [nn.ReLU(), nn.Conv2d(channels[0], 3, 3, padding=1)]
    return nn.Sequential(*layers)


@configurable
class DiscreteVAE(nn.Module):
    """Images [B, 3, S, S] in [-1, 1] <-> token grids [B, g, g] with ids in [0, codebook_size).

    ``channels`` lists the encoder's widths, one per halving of the resolution, so ``grid_size`` must be
    ``image_size / 2 ** len(channels)``. ``straight_through`` uses hard one-hot samples forward (soft
    gradients), which matches the argmax tokens of ``encode`` more closely at a high temperature.
    """

    def __init__(
        self,
        *,
        image_size: int = 64,
        grid_size: int = 8,
        codebook_size: int = 512,
        codebook_dim: int = 64,
        channels: list[int] | tuple[int, ...] = (64, 128, 128),
        res_blocks: int = 1,
        reconstruction: str = "mse",
        straight_through: bool = False,
        temperature_start: float = 1.0,
        temperature_end: float = 1 / 16,
        temperature_steps: int = 10_000,
        kl_weight_max: float = 0.0,
        kl_steps: int = 1_000,
        usage_kl_weight: float = 0.0,
    ):
        super().__init__()
        channels = list(channels)
        _check_geometry(image_size, grid_size, channels)
        if codebook_size < 2:
            raise ValueError(f"codebook_size must be >= 2, got {codebook_size}")
        if reconstruction not in RECONSTRUCTION_LOSSES:
            raise ValueError(f"reconstruction must be one of {RECONSTRUCTION_LOSSES}, got {reconstruction!r}")
        if not temperature_start >= temperature_end > 0:
            raise ValueError(
                f"temperatures must satisfy start >= end > 0, got start={temperature_start}, end={temperature_end}"
            )
        for name, weight in (("kl_weight_max", kl_weight_max), ("usage_kl_weight", usage_kl_weight)):
            if weight < 0:
                raise ValueError(f"{name} must be >= 0, got {weight}")
        self.image_size = image_size
        self.grid_size = grid_size
        self.codebook_size = codebook_size
        self.reconstruction = reconstruction
        self.straight_through = straight_through
        self.temperature_schedule = {"start": temperature_start, "end": temperature_end, "steps": temperature_steps}
        self.kl_schedule = {"maximum": kl_weight_max, "steps": kl_steps}
        self.usage_kl_weight = usage_kl_weight
        self.encoder = _encoder(channels, res_blocks, codebook_size)
        self.codebook = nn.Embedding(codebook_size, codebook_dim)
        self.decoder = _decoder(channels, res_blocks, codebook_dim)
        self.register_buffer("schedule_step", torch.zeros((), dtype=torch.long))

    # -- schedules --------------------------------------------------------------------------
    def temperature(self, step: int) -> float:
        return gumbel_temperature(step, **self.temperature_schedule)

    def kl_weight(self, step: int) -> float:
        return kl_weight(step, **self.kl_schedule)

    @torch.no_grad()
    def advance_schedule(self) -> None:
        """Count one optimizer update (a training job calls this after every step)."""
        self.schedule_step += 1

    # -- checks -----------------------------------------------------------------------------
    def _check_images(self, images: torch.Tensor) -> None:
        expected = (3, self.image_size, self.image_size)
        if images.ndim != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(
                f"images must be [B, {', '.join(map(str, expected))}] in [-1, 1] (the size this dVAE was built for), "
                f"got shape {tuple(images.shape)}"
            )

    def _check_tokens(self, tokens: torch.Tensor) -> None:
        g = self.grid_size
        if tokens.ndim != 3 or tuple(tokens.shape[1:]) != (g, g):
            raise ValueError(f"tokens must be a [B, {g}, {g}] grid (this dVAE's grid), got shape {tuple(tokens.shape)}")
        if tokens.dtype.is_floating_point or tokens.dtype == torch.bool:
            raise ValueError(f"tokens must be integer ids, got dtype {tokens.dtype}")
        if tokens.numel() and (tokens.min() < 0 or tokens.max() >= self.codebook_size):
            raise ValueError(
                f"token ids must be in [0, {self.codebook_size}) (the codebook size), got ids from "
                f"{int(tokens.min())} to {int(tokens.max())}"
            )

    # -- encode / decode --------------------------------------------------------------------
    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, S, S] -> logits over the codebook [B, K, g, g]."""
        self._check_images(images)
        return self.encoder(images)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, S, S] in [-1, 1] -> token ids [B, g, g] (the most likely entry of each cell)."""
        return self.logits(images).argmax(dim=1)

    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Codebook vectors (or mixtures of them) [B, D, g, g] -> images [B, 3, S, S], not clamped."""
        return self.decoder(codes)

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids [B, g, g] -> images [B, 3, S, S] in [-1, 1]."""
        self._check_tokens(tokens)
        codes = rearrange(self.codebook(tokens), "b h w d -> b d h w")
        return self.decode_codes(codes).clamp(-1, 1)

    # -- training ---------------------------------------------------------------------------
    def training_loss(
        self, images: torch.Tensor, *, step: int | None = None, gumbel: torch.Tensor | None = None
    ) -> dict:
        """Reconstruction + KL-to-uniform loss of a batch of images [B, 3, S, S] in [-1, 1].

        ``step`` picks the point of the schedules (default: the ``schedule_step`` buffer). ``gumbel``
        [B, K, g, g] replaces the random Gumbel noise (e.g. drawn per item, to compare data-parallel runs).
        Returns ``loss``, ``recon``, ``kl`` (nats per cell), ``tau``, ``kl_weight`` and ``codes_used`` (how many
        codebook entries the batch's argmax tokens use: a collapsing codebook shows here first).
        """
        step = int(self.schedule_step) if step is None else step
        tau, beta = self.temperature(step), self.kl_weight(step)
        logits = self.logits(images).float()
        if gumbel is None:
            gumbel = -torch.empty_like(logits).exponential_().log()
        soft = F.softmax((logits + gumbel) / tau, dim=1)
        if self.straight_through:
            hard = F.one_hot(soft.argmax(dim=1), self.codebook_size).permute(0, 3, 1, 2).to(soft.dtype)
            soft = hard - soft.detach() + soft
        codes = einsum(soft, self.codebook.weight, "b k h w, k d -> b d h w")
        reconstructed = self.decode_codes(codes).float()
        if self.reconstruction == "mse":
            recon = F.mse_loss(reconstructed, images.float())
        else:
            recon = F.l1_loss(reconstructed, images.float())
        log_q = F.log_softmax(logits, dim=1)
        kl = (log_q.exp() * log_q).sum(dim=1).mean() + math.log(self.codebook_size)
        # the aggregate token distribution of the whole (data-parallel) batch [K]
        usage = global_mean(log_q.exp().mean(dim=(0, 2, 3)))
        usage_kl = (usage * usage.clamp_min(1e-12).log()).sum() + math.log(self.codebook_size)
        return {
            "loss": recon + beta * kl + self.usage_kl_weight * usage_kl,
            "recon": recon.detach(),
            "kl": kl.detach(),
            "usage_kl": usage_kl.detach(),
            "tau": torch.tensor(tau),
            "kl_weight": torch.tensor(beta),
            "codes_used": torch.tensor(float(logits.argmax(dim=1).unique().numel())),
        }


def _check_geometry(image_size: int, grid_size: int, channels: list[int]) -> None:
    if not channels:
        raise ValueError("channels must list at least one width (one per halving of the resolution)")
    levels = len(channels)
    if grid_size < 1 or grid_size * 2**levels != image_size:
        raise ValueError(
            f"grid_size {grid_size} does not fit image_size {image_size} with {levels} downsamplings "
            f"(channels={channels}): expected grid_size = image_size / 2**{levels} = {image_size / 2**levels:g}"
        )
