"""The diffusion prior: text condition -> CLIP image embedding (DALL-E 2, section 2.2), and baselines."""

from unclip.prior.diffusion_prior import DiffusionPrior
from unclip.prior.passthrough import PassthroughPrior
from unclip.prior.transformer import PriorTransformer, timestep_embedding

__all__ = ["DiffusionPrior", "PassthroughPrior", "PriorTransformer", "timestep_embedding"]
