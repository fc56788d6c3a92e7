"""The priors: text condition -> CLIP image embedding (DALL-E 2: the diffusion prior, section 2.2, and the
autoregressive prior, section 2.1), and the passthrough baseline."""

from unclip.prior.autoregressive import AutoregressivePrior
from unclip.prior.diffusion_prior import DiffusionPrior
from unclip.prior.passthrough import PassthroughPrior
from unclip.prior.transformer import PriorTransformer, timestep_embedding

__all__ = ["AutoregressivePrior", "DiffusionPrior", "PassthroughPrior", "PriorTransformer", "timestep_embedding"]
