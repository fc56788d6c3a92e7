"""Gaussian diffusion shared by every diffusion stage (prior on vectors, decoder and upsamplers on images).

- ``schedules``: cosine and linear noise schedules.
- ``gaussian``: ``GaussianDiffusion``, the forward process, objectives (eps / x0 / v) and training loss.
- ``sampling``: DDPM and DDIM samplers as plain functions of ``model_fn(x_t, t)``, the timestep spacings
  (uniform, log-SNR, Karras) and image-to-image's noised start.
- ``dpm_solver``: DPM-Solver++ 2M and 2S, second-order ODE solvers for few steps.
- ``samplers``: every sampler by name (``sample("dpmpp_2m", ...)``), with the checks the settings share.
- ``repaint``: inpainting with any model (RePaint: known-region replacement with resampling jumps).
- ``guidance``: classifier-free guidance as one batched forward, with an optional negative conditioning.
- ``timesteps``: the sinusoidal timestep embedding the networks share.
"""

from .dpm_solver import sample_dpmpp_2m, sample_dpmpp_2s
from .gaussian import LOSS_WEIGHTINGS, OBJECTIVES, GaussianDiffusion
from .guidance import classifier_free_guidance
from .repaint import Inpainting, repaint_schedule, sample_repaint
from .samplers import SAMPLERS, check_sampler, sample
from .sampling import (
    SPACINGS,
    noised_start,
    respaced_timesteps,
    sample_ddim,
    sample_ddpm,
    strength_skip,
    timesteps_for,
)
from .schedules import SCHEDULES, cosine_betas, linear_betas, make_betas
from .timesteps import timestep_embedding

__all__ = [
    "GaussianDiffusion",
    "Inpainting",
    "LOSS_WEIGHTINGS",
    "OBJECTIVES",
    "SAMPLERS",
    "SCHEDULES",
    "SPACINGS",
    "check_sampler",
    "classifier_free_guidance",
    "cosine_betas",
    "linear_betas",
    "make_betas",
    "noised_start",
    "repaint_schedule",
    "respaced_timesteps",
    "sample",
    "sample_ddim",
    "sample_ddpm",
    "sample_dpmpp_2m",
    "sample_dpmpp_2s",
    "sample_repaint",
    "strength_skip",
    "timesteps_for",
    "timestep_embedding",
]
