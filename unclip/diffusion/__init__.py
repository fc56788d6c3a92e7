"""Gaussian diffusion shared by every diffusion stage (prior on vectors, decoder and upsamplers on images).

- ``schedules``: cosine and linear noise schedules.
- ``gaussian``: ``GaussianDiffusion``, the forward process, objectives (eps / x0 / v) and training loss.
- ``sampling``: DDPM and DDIM samplers as plain functions of ``model_fn(x_t, t)``, with strided steps, and
  image-to-image's noised start.
- ``repaint``: inpainting with any model (RePaint: known-region replacement with resampling jumps).
- ``guidance``: classifier-free guidance as one batched forward, with an optional negative conditioning.
- ``timesteps``: the sinusoidal timestep embedding the networks share.
"""

from .gaussian import LOSS_WEIGHTINGS, OBJECTIVES, GaussianDiffusion
from .guidance import classifier_free_guidance
from .repaint import Inpainting, repaint_schedule, sample_repaint
from .sampling import (
    noised_start,
    respaced_timesteps,
    sample_ddim,
    sample_ddpm,
    strength_skip,
)
from .schedules import SCHEDULES, cosine_betas, linear_betas, make_betas
from .timesteps import timestep_embedding

__all__ = [
    "GaussianDiffusion",
    "Inpainting",
    "LOSS_WEIGHTINGS",
    "OBJECTIVES",
    "SCHEDULES",
    "classifier_free_guidance",
    "cosine_betas",
    "linear_betas",
    "make_betas",
    "noised_start",
    "repaint_schedule",
    "respaced_timesteps",
    "sample_ddim",
    "sample_ddpm",
    "sample_repaint",
    "strength_skip",
    "timestep_embedding",
]
