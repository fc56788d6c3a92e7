"""Gaussian diffusion shared by every diffusion stage (prior on vectors, decoder and upsamplers on images).

- ``schedules``: cosine and linear noise schedules.
- ``gaussian``: ``GaussianDiffusion``, the forward process, objectives (eps / x0 / v) and training loss.
- ``sampling``: DDPM and DDIM samplers as plain functions of ``model_fn(x_t, t)``, with strided steps.
- ``guidance``: classifier-free guidance as one batched forward.
- ``timesteps``: the sinusoidal timestep embedding the networks share.
"""

from .gaussian import LOSS_WEIGHTINGS, OBJECTIVES, GaussianDiffusion
from .guidance import classifier_free_guidance
from .sampling import respaced_timesteps, sample_ddim, sample_ddpm
from .schedules import SCHEDULES, cosine_betas, linear_betas, make_betas
from .timesteps import timestep_embedding

__all__ = [
    "GaussianDiffusion",
    "LOSS_WEIGHTINGS",
    "OBJECTIVES",
    "SCHEDULES",
    "classifier_free_guidance",
    "cosine_betas",
    "linear_betas",
    "make_betas",
    "respaced_timesteps",
    "sample_ddim",
    "sample_ddpm",
    "timestep_embedding",
]
