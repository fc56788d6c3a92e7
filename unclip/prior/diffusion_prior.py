"""The diffusion prior stage (DALL-E 2, section 2.2): text condition -> CLIP image embedding."""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch import nn

from unclip.configurable import configurable
from unclip.diffusion import GaussianDiffusion, check_sampler, classifier_free_guidance, sample
from unclip.embedding import TextCondition, per_dimension_statistics
from unclip.pipeline_inputs import check_trained_null
from unclip.prior.transformer import PriorTransformer

SPACE_SETTINGS = ("embed_dim", "token_dim", "text_length")  # the transformer's sizes that the CLIP space gives
NET_SETTINGS = tuple(name for name in inspect.signature(PriorTransformer).parameters if name not in SPACE_SETTINGS)


def check_prompts(text: TextCondition) -> None:
    if len(text) == 0:
        raise ValueError("the prior got a batch of zero prompts; expected at least one")


@configurable
class DiffusionPrior(nn.Module):
    """A causal transformer denoising standardised CLIP image embeddings, conditioned on the text.

    Image embeddings are standardised per dimension with a mean and std measured on the training data
    (``fit_normalisation``) and kept as buffers, so they travel inside the checkpoint's weights.
    The network predicts the clean embedding (``objective="x0"``, as the paper); sampling returns unit-norm
    embeddings, the best of ``num_candidates`` by dot product with the text embedding.

    ``net``: the ``PriorTransformer``'s settings (width, depth, heads, dropout, ff_mult, use_caption_tokens), as
    the decoder's ``unet:`` holds its UNet's; the embedding space's sizes come from ``embed_dim``, ``token_dim``
    and ``text_length``.
    """

    def __init__(
        self,
        *,
        embed_dim: int,
        token_dim: int,
        text_length: int,
        num_steps: int = 1000,
        schedule: str = "cosine",
        objective: str = "x0",
        loss_weighting: str = "none",
        cond_drop_prob: float = 0.2,
        net: dict | None = None,
    ):
        super().__init__()
        if not 0 <= cond_drop_prob < 1:
            raise ValueError(f"cond_drop_prob must be in [0, 1), got {cond_drop_prob}")
        unknown = sorted(set(net or {}) - set(NET_SETTINGS))
        if unknown:
            raise ValueError(f"net.{unknown[0]} is not a setting of the prior's transformer; net takes "
                             f"{', '.join(NET_SETTINGS)} ({', '.join(SPACE_SETTINGS)} come from the CLIP space)")
        self.net = PriorTransformer(embed_dim=embed_dim, token_dim=token_dim, text_length=text_length, **(net or {}))
        self.diffusion = GaussianDiffusion(num_steps, schedule, objective, loss_weighting)
        self.cond_drop_prob = cond_drop_prob
        self.use_caption_tokens = self.net.use_caption_tokens
        self.register_buffer("embed_mean", torch.zeros(embed_dim))
        self.register_buffer("embed_std", torch.full((embed_dim,), embed_dim**-0.5))

    def _rebuild_arguments(self, given: dict) -> dict:
        """The saved config names every setting of the transformer, so a later change of its defaults cannot
        rebuild a saved prior differently."""
        settings = {k: v for k, v in self.net.config.items() if k != "_target_" and k not in SPACE_SETTINGS}
        return {**given, "net": settings}

    @classmethod
    def _upgrade_arguments(cls, arguments: dict) -> dict:
        """A config saved when the transformer's settings stood beside the prior's (``width: 256``, ...): in
        today's form, inside ``net:``."""
        flat = {k: arguments[k] for k in NET_SETTINGS if k in arguments}
        if not flat:
            return arguments
        rest = {k: v for k, v in arguments.items() if k not in flat}
        return {**rest, "net": {**flat, **(arguments.get("net") or {})}}

    # -- normalisation ----------------------------------------------------------------------
    @torch.no_grad()
    def fit_normalisation(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor | None = None) -> dict:
        """Measure the per-dimension mean and std of (unit-norm) image embeddings [N, D]. ``text_embeds``: the
        fitting hook the priors share passes the pairs' text embeddings (the autoregressive prior's dot-product
        buckets); this prior does not use them. Returns what a job reports of the fit (nothing here)."""
        mean, std = per_dimension_statistics(image_embeds, dim=self.embed_mean.shape[0], fitter="the diffusion prior",
                                             remedy="give it more training pairs (normalisation_items, the shards)")
        self.embed_mean.copy_(mean)
        self.embed_std.copy_(std)
        return {}

    def standardise(self, image_embed: torch.Tensor) -> torch.Tensor:
        return (image_embed.float() - self.embed_mean) / self.embed_std  # a new tensor: inputs untouched

    def unstandardise(self, x: torch.Tensor) -> torch.Tensor:
        return x.float() * self.embed_std + self.embed_mean

    # -- training ---------------------------------------------------------------------------
    def _net(self, x, t, drop_text, text_embed, token_embeds, mask):
        if not self.use_caption_tokens:
            token_embeds = mask = None
        return self.net(x, t, text_embed, token_embeds, mask, drop_text=drop_text)

    def _cached_net(self):
        """``_net`` for sampling: the prefix (caption tokens and text embedding) of a conditioning is encoded
        once and reused at every step; the samplers and guidance pass the same tensors at every step. The cache
        is keyed by the tensors' identity, never their values, so a step reads nothing back from the device
        (a CUDA graph can capture it); it holds the tensors, so their ids stay theirs."""
        caches: dict = {}

        def net(x, t, drop_text, text_embed, token_embeds, mask):
            if not self.use_caption_tokens:
                token_embeds = mask = None
            key = (id(text_embed), id(drop_text))
            if key not in caches:
                prefix = self.net.encode_prefix(text_embed, token_embeds, mask, drop_text=drop_text)
                caches[key] = (text_embed, drop_text, prefix)
            return self.net.forward_with_prefix(x, t, caches[key][2])

        return net

    def training_loss(self, batch: dict) -> dict:
        """Optional batch keys ``t`` [B], ``noise`` [B, D] and ``drop`` [B] (bool) replace the random draws
        (e.g. drawn per item, so that data-parallel runs can be compared with one process)."""
        image_embed = batch["image_embed"]
        batch_size = image_embed.shape[0]
        drop = batch.get("drop")
        if drop is None:
            drop = torch.rand(batch_size, device=image_embed.device) < self.cond_drop_prob
        losses = self.diffusion.training_loss(
            self._net,
            self.standardise(image_embed),
            t=batch.get("t"),
            noise=batch.get("noise"),
            drop_text=drop,
            text_embed=batch["text_embed"],
            token_embeds=batch.get("token_embeds"),
            mask=batch.get("mask"),
        )
        return {"loss": losses.mean()}

    # -- sampling ---------------------------------------------------------------------------
    @torch.no_grad()
    def sample(
        self,
        text: TextCondition,
        *,
        steps: int = 64,
        guidance_scale: float = 1.0,
        num_candidates: int = 2,
        eta: float = 0.0,
        generator: torch.Generator | None = None,
        negative: TextCondition | None = None,
        cuda_graphs: str | bool | None = "auto",
        sampler: str = "ddim",
        spacing: str = "uniform",
    ) -> torch.Tensor:
        """Unit-norm image embeddings [B, D] for the captions in ``text``. ``negative`` (captions [B]): guidance's
        unconditional branch (a negative prompt) instead of the learned null; used when ``guidance_scale != 1``.
        ``cuda_graphs``: see ``unclip.diffusion.graphs`` (on CUDA the steps are replayed from a CUDA graph).
        ``sampler`` / ``spacing``: see ``unclip.diffusion.samplers``."""
        check_prompts(text)
        check_sampler(sampler, steps, eta, spacing)
        if num_candidates < 1:
            raise ValueError(f"num_candidates must be >= 1, got {num_candidates}")
        device = self.embed_mean.device
        text = text.to(device)
        batch = len(text)
        if negative is not None and len(negative) != batch:
            raise ValueError(f"{len(negative)} negative captions for {batch} captions")

        def inputs(condition: TextCondition) -> dict:
            repeated = condition.to(device).repeat_interleave(num_candidates)
            return dict(text_embed=repeated.embed.float(), token_embeds=repeated.token_embeds.float(),
                        mask=repeated.mask)

        model_fn = classifier_free_guidance(
            self._cached_net(), guidance_scale, negative=None if negative is None else inputs(negative), **inputs(text)
        )
        x_T = torch.randn(batch * num_candidates, self.embed_mean.shape[0], device=device, generator=generator)
        x0 = sample(sampler, model_fn, self.diffusion, x_T, steps, eta=eta, generator=generator,
                    cuda_graphs=cuda_graphs, spacing=spacing)
        candidates = F.normalize(self.unstandardise(x0), dim=-1).view(batch, num_candidates, -1)
        scores = torch.einsum("bnd,bd->bn", candidates, text.embed.float())
        best = scores.argmax(dim=1)
        return candidates[torch.arange(batch, device=device), best]

    def check_unconditional(self) -> None:
        """An error unless caption dropout trained the learned null."""
        check_trained_null("prior", "cond_drop_prob", self.cond_drop_prob, 0.2)

    @torch.no_grad()
    def sample_unconditional(self, count: int, **sampling) -> torch.Tensor:
        """Unit-norm image embeddings [count, D] drawn with the text dropped to the learned null (what caption
        dropout, ``cond_drop_prob``, trained): the prior's own distribution of images. One candidate each: there is
        no text embedding to rank candidates by. ``sampling``: ``sample``'s steps, eta, generator, sampler, ...
        (not guidance_scale, negative or num_candidates)."""
        self.check_unconditional()
        device = self.embed_mean.device
        null = TextCondition(embed=torch.zeros(count, self.embed_mean.shape[0], device=device),
                             tokens=torch.zeros(count, 1, dtype=torch.long, device=device),
                             token_embeds=torch.zeros(count, 1, self.net.token_dim, device=device),
                             mask=torch.zeros(count, 1, dtype=torch.bool, device=device))
        return self.sample(null, guidance_scale=0.0, num_candidates=1, **sampling)  # 0: the null branch alone
