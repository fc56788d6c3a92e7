"""The discrete VAE stage of DALL-E: images <-> grids of codebook tokens, and its training schedules."""

from unclip.dvae.discrete_vae import DiscreteVAE
from unclip.dvae.schedules import gumbel_temperature, kl_weight

__all__ = ["DiscreteVAE", "gumbel_temperature", "kl_weight"]
