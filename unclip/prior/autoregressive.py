"""DALL-E 2's autoregressive prior (section 2.1): the CLIP image embedding as a sequence of discrete codes.

The image embedding is reduced by PCA to the fewest principal components whose reconstruction keeps a mean
cosine of ``min_cosine`` with the fitted embeddings (the paper kept 319 of 1,024), each component is quantised
into ``num_buckets`` buckets, and a causal transformer predicts the bucket ids in order of decreasing eigenvalue
after a prefix of::

    [caption token states (T, projected) | CLIP text embedding (projected) | dot-product token]

The dot-product token is the image-text dot product ``z_i . z_t`` of the training pair, quantised; at sampling it
is drawn from the upper half of its buckets ("we find it beneficial to sample the dot product from the top half
of the distribution"), so the prior is asked for an image its caption describes well.

Bucket layout: per-dimension quantiles (equal mass). The PCA coordinates have very different spreads (the first
eigenvalues are many times the last) and bell-shaped marginals; equal-mass edges give every bucket of every
component the same share of the training data, so resolution goes where the embeddings are, no class of the
softmax is dead, and a uniform draw over the upper half of the dot-product buckets is exactly a draw from the top
half of the training distribution. Each bucket decodes to the mean of the training values that fell in it (the
reconstruction that minimises the squared error for these edges).

Classifier-free guidance, as the DALL-E transformer does it: training drops the caption (token states, text
embedding and dot-product token together) to learned nulls with probability ``cond_drop_prob``, and sampling
mixes the conditional and null logits (``unclip.autoregressive.guided_logits``) before top-k / top-p /
temperature filtering (``unclip.autoregressive.draw``).

Everything fitted (PCA mean and basis, bucket edges and centres, the dot-product edges, the kept count) is a
buffer, so it travels inside the checkpoint's weights. Their sizes are fixed by the config (``embed_dim``,
``components`` or, without it, ``embed_dim``, ``num_buckets``, ``dot_buckets``), never by the fit, so a saved
prior rebuilds from its config alone.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# cpu_math_attention, as the diffusion prior: at these short sequences the CPU flash kernel's backward is the slower
# one (a bf16 training step of the demo's size 1.6 s -> 1.4 s, a busy core)
from unclip.attention_kernels import cpu_math_attention
from unclip.autoregressive import CausalTransformer, check_sampling, draw, guided_logits
from unclip.configurable import configurable
from unclip.embedding import TextCondition
from unclip.pipeline_inputs import check_trained_null
from unclip.prior.diffusion_prior import check_prompts


@torch.no_grad()
def reconstruction_cosines(embeds: torch.Tensor, mean: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """[K]: the mean cosine of ``embeds`` [N, D] with their PCA reconstructions from the first 1..K columns of
    ``basis`` [D, K] (orthonormal), computed for every K at once from cumulative sums."""
    centred = embeds - mean
    coords = centred @ basis  # [N, K]
    mean_along = mean @ basis  # [K]
    dot = (embeds @ mean)[:, None] + (coords * (mean_along + coords)).cumsum(1)  # <x, x_hat_k>
    norm_sq = mean.square().sum() + (coords * (2 * mean_along + coords)).cumsum(1)  # |x_hat_k|^2
    cosine = dot / (embeds.norm(dim=1, keepdim=True) * norm_sq.clamp_min(1e-12).sqrt())
    return cosine.mean(0)


@torch.no_grad()
def equal_mass_buckets(values: torch.Tensor, buckets: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per column of ``values`` [N, K]: the inner edges [K, buckets - 1] at the 1/buckets ... quantiles and each
    bucket's centre [K, buckets], the mean of the values in it (an empty bucket: the middle of its edges)."""
    levels = torch.arange(1, buckets, dtype=values.dtype, device=values.device) / buckets
    edges = torch.quantile(values, levels, dim=0).T.contiguous()  # [K, buckets - 1]
    ids = torch.searchsorted(edges, values.T.contiguous())  # [K, N]
    sums = torch.zeros(values.shape[1], buckets, dtype=values.dtype, device=values.device)
    counts = torch.zeros_like(sums)
    sums.scatter_add_(1, ids, values.T)
    counts.scatter_add_(1, ids, torch.ones_like(values.T))
    bounds = torch.cat([values.min(0).values[:, None], edges, values.max(0).values[:, None]], dim=1)
    middles = (bounds[:, :-1] + bounds[:, 1:]) / 2
    return edges, torch.where(counts > 0, sums / counts.clamp_min(1), middles)


def _check_settings(embed_dim: int, min_cosine, components, num_buckets: int, dot_buckets: int,
                    cond_drop_prob: float) -> None:
    if components is None and not (isinstance(min_cosine, (int, float)) and 0 < min_cosine <= 1):
        raise ValueError(f"min_cosine must be in (0, 1] (the mean reconstruction cosine the kept PCA components "
                         f"reach), got {min_cosine!r}; or set components to keep a fixed number")
    if components is not None and not (isinstance(components, int) and 1 <= components <= embed_dim):
        raise ValueError(f"components must be an int in [1, {embed_dim}] (the embedding's dimension) or null, got "
                         f"{components!r}")
    if not (isinstance(num_buckets, int) and num_buckets >= 2):
        raise ValueError(f"num_buckets must be an int >= 2 (the buckets per PCA component), got {num_buckets!r}")
    if not (isinstance(dot_buckets, int) and dot_buckets >= 2):
        raise ValueError(f"dot_buckets must be an int >= 2 (sampling draws from the upper half), got {dot_buckets!r}")
    if not 0 <= cond_drop_prob < 1:
        raise ValueError(f"cond_drop_prob must be in [0, 1), got {cond_drop_prob}")


@configurable
class AutoregressivePrior(nn.Module):
    """Text condition -> unit-norm CLIP image embedding, one quantised PCA component at a time.

    ``min_cosine``: keep the fewest components whose reconstruction reaches this mean cosine with the fitted
    embeddings; ``components``: keep exactly this many instead (``min_cosine`` is then only reported).
    ``temperature`` / ``top_k`` / ``top_p``: the sampling filters (``sample`` may override them).
    """

    def __init__(
        self,
        *,
        embed_dim: int,
        token_dim: int,
        text_length: int,
        min_cosine: float | None = 0.99,
        components: int | None = None,
        num_buckets: int = 256,
        dot_buckets: int = 16,
        width: int = 256,
        depth: int = 4,
        heads: int = 4,
        dropout: float = 0.0,
        cond_drop_prob: float = 0.2,
        use_caption_tokens: bool = True,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
    ):
        super().__init__()
        _check_settings(embed_dim, min_cosine, components, num_buckets, dot_buckets, cond_drop_prob)
        check_sampling(temperature=temperature, top_k=top_k, top_p=top_p, vocab_size=num_buckets)
        self.embed_dim, self.token_dim, self.text_length = embed_dim, token_dim, text_length
        self.min_cosine, self.fixed_components = min_cosine, components
        self.max_components = components or embed_dim
        self.num_buckets, self.dot_buckets, self.cond_drop_prob = num_buckets, dot_buckets, cond_drop_prob
        self.use_caption_tokens = use_caption_tokens
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        self.prefix_length = (text_length if use_caption_tokens else 0) + 2
        self.transformer = CausalTransformer(width=width, depth=depth, heads=heads, dropout=dropout,
                                             max_length=self.prefix_length + self.max_components - 1)
        self.token_norm, self.token_proj = nn.LayerNorm(token_dim), nn.Linear(token_dim, width)
        self.text_norm, self.text_proj = nn.LayerNorm(embed_dim), nn.Linear(embed_dim, width)
        self.null_text = nn.Parameter(torch.randn(width) * 0.02)
        self.padding_embed = nn.Parameter(torch.randn(text_length, width) * 0.02)  # padding and dropped captions
        self.dot_embed = nn.Embedding(dot_buckets + 1, width)  # the last id: the dropped (null) dot product
        self.bucket_embed = nn.Embedding(num_buckets, width)
        self.head = nn.Linear(width, num_buckets)
        for embedding in (self.dot_embed, self.bucket_embed):
            nn.init.normal_(embedding.weight, std=0.02)
        k = self.max_components
        self.register_buffer("embed_mean", torch.zeros(embed_dim))
        self.register_buffer("basis", torch.zeros(embed_dim, k))
        self.register_buffer("edges", torch.zeros(k, num_buckets - 1))
        self.register_buffer("centres", torch.zeros(k, num_buckets))
        self.register_buffer("dot_edges", torch.zeros(dot_buckets - 1))
        self.register_buffer("num_components", torch.tensor(0))  # 0 until fitted
        self.register_buffer("pca_cosine", torch.tensor(0.0))

    # -- fitting ----------------------------------------------------------------------------
    @torch.no_grad()
    def fit_normalisation(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor | None = None) -> dict:
        """Fit the PCA and the buckets on training image embeddings [N, D] and the dot-product buckets on their
        pairs' text embeddings [N, D]; returns what was kept (``pca_components``, ``pca_cosine``: the mean
        reconstruction cosine of the kept components, ``quantised_cosine``: the same after quantisation)."""
        if text_embeds is None or len(text_embeds) != len(image_embeds):
            raise ValueError("the autoregressive prior fits its dot-product buckets on image-text pairs: give "
                             "fit_normalisation the text embeddings of the image embeddings' captions too")
        x = image_embeds.float().to(self.embed_mean.device)
        mean = x.mean(0)
        eigenvalues, vectors = torch.linalg.eigh((x - mean).T @ (x - mean) / len(x))
        basis = vectors.flip(1)[:, : self.max_components]  # in order of decreasing eigenvalue
        cosines = reconstruction_cosines(x, mean, basis)
        if self.fixed_components is not None:
            kept = self.fixed_components
        else:
            reached = (cosines >= self.min_cosine).nonzero()
            kept = int(reached[0]) + 1 if len(reached) else self.max_components
        edges, centres = equal_mass_buckets((x - mean) @ basis[:, :kept], self.num_buckets)
        self.embed_mean.copy_(mean)
        self.basis.zero_()[:, :kept] = basis[:, :kept]
        self.edges.zero_()[:kept], self.centres.zero_()[:kept] = edges, centres
        dots = (x * text_embeds.float().to(x.device)).sum(-1)
        levels = torch.arange(1, self.dot_buckets, device=x.device) / self.dot_buckets
        self.dot_edges.copy_(torch.quantile(dots, levels))
        self.num_components.fill_(kept)
        self.pca_cosine.fill_(float(cosines[kept - 1]))
        quantised = (self.dequantise(self.quantise(x)) * x).sum(-1).mean()
        return {"pca_components": kept, "pca_cosine": float(cosines[kept - 1]), "quantised_cosine": float(quantised)}

    @property
    def kept(self) -> int:
        kept = int(self.num_components)
        if kept == 0:
            raise RuntimeError("the autoregressive prior has no fitted PCA yet: call fit_normalisation(image_embeds, "
                               "text_embeds) first (train/prior.py does)")
        return kept

    def quantise(self, image_embed: torch.Tensor) -> torch.Tensor:
        """Image embeddings [B, D] -> bucket ids [B, kept], the components in order of decreasing eigenvalue."""
        kept = self.kept
        coords = (image_embed.float() - self.embed_mean) @ self.basis[:, :kept]
        return torch.searchsorted(self.edges[:kept], coords.T.contiguous()).T

    def dequantise(self, ids: torch.Tensor) -> torch.Tensor:
        """Bucket ids [B, kept] -> unit-norm image embeddings [B, D] (each bucket's centre)."""
        kept = ids.shape[1]
        coords = self.centres[:kept].gather(1, ids.T).T
        return F.normalize(self.embed_mean + coords @ self.basis[:, :kept].T, dim=-1)

    def dot_ids(self, image_embed: torch.Tensor, text_embed: torch.Tensor) -> torch.Tensor:
        return torch.bucketize((image_embed.float() * text_embed.float()).sum(-1), self.dot_edges)

    # -- the network ------------------------------------------------------------------------
    def _prefix(self, text_embed, token_embeds, mask, dot_ids, drop) -> torch.Tensor:
        """[B, prefix_length, W]: the caption's token states, the text embedding and the dot-product token; a
        dropped row (``drop``) gets the learned nulls in all three."""
        parts = []
        if self.use_caption_tokens:
            tokens = self.token_proj(self.token_norm(token_embeds.float()))
            keep = (mask & ~drop[:, None])[..., None]
            parts.append(torch.where(keep, tokens, self.padding_embed[: tokens.shape[1]].to(tokens.dtype)))
        text = self.text_proj(self.text_norm(text_embed))
        text = torch.where(drop[:, None], self.null_text.to(text.dtype), text)
        dot = self.dot_embed(torch.where(drop, self.dot_buckets, dot_ids))
        return torch.cat([*parts, text[:, None], dot[:, None].to(text.dtype)], dim=1)

    def training_loss(self, batch: dict) -> dict:
        """Cross-entropy of every kept component's bucket (teacher forcing). An optional batch key ``drop`` [B]
        (bool) replaces the random choice of captions dropped to the nulls."""
        image_embed, text_embed = batch["image_embed"], batch["text_embed"]
        drop = batch.get("drop")
        if drop is None:
            drop = torch.rand(image_embed.shape[0], device=image_embed.device) < self.cond_drop_prob
        ids = self.quantise(image_embed)
        prefix = self._prefix(text_embed.float(), batch.get("token_embeds"), batch.get("mask"),
                              self.dot_ids(image_embed, text_embed), drop)
        with cpu_math_attention(prefix.device):
            hidden = self.transformer(torch.cat([prefix, self.bucket_embed(ids[:, :-1]).to(prefix.dtype)], dim=1))
        logits = self.head(hidden[:, self.prefix_length - 1:])
        return {"loss": F.cross_entropy(logits.flatten(0, 1).float(), ids.flatten())}

    # -- sampling ---------------------------------------------------------------------------
    def _check_text(self, text: TextCondition, name: str) -> None:
        dims = (text.embed.shape[-1], text.token_embeds.shape[-1])
        if dims != (self.embed_dim, self.token_dim):
            raise ValueError(f"{name} come from a CLIP with embeddings of dim {dims[0]} and token states of dim "
                             f"{dims[1]}; this autoregressive prior was trained in a space of {self.embed_dim} and "
                             f"{self.token_dim}: pair it with the CLIP its embedding shards were made with")

    def _sampling_prefix(self, text, negative, num_candidates: int, guided: bool, generator) -> torch.Tensor:
        """The prefix rows: conditional [B * n] (then, when ``guided``, the unconditional: the negative's or
        the nulls), each candidate with a dot-product token drawn from the upper half of the buckets."""
        device = self.embed_mean.device
        rows = text.to(device).repeat_interleave(num_candidates)
        dot_ids = torch.randint(self.dot_buckets // 2, self.dot_buckets, (len(rows),), device=device,
                                generator=generator)
        keep = torch.zeros(len(rows), dtype=torch.bool, device=device)
        prefix = self._prefix(rows.embed.float(), rows.token_embeds.float(), rows.mask, dot_ids, keep)
        if not guided:
            return prefix
        if negative is None:
            other = self._prefix(rows.embed.float(), rows.token_embeds.float(), rows.mask, dot_ids, ~keep)
        else:
            neg = negative.to(device).repeat_interleave(num_candidates)
            other = self._prefix(neg.embed.float(), neg.token_embeds.float(), neg.mask, dot_ids, keep)
        return torch.cat([prefix, other])

    @torch.no_grad()
    def sample(
        self,
        text: TextCondition,
        *,
        guidance_scale: float = 1.0,
        num_candidates: int = 2,
        generator: torch.Generator | None = None,
        negative: TextCondition | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        steps: int | None = None,
        eta: float | None = None,
        sampler: str | None = None,
        spacing: str | None = None,
        cuda_graphs: str | bool | None = None,
    ) -> torch.Tensor:
        """Unit-norm image embeddings [B, D] for the captions in ``text``: the best of ``num_candidates`` by dot
        product with the text embedding. ``guidance_scale`` != 1 guides the logits away from the null caption
        (or from ``negative``, captions [B]). ``temperature`` / ``top_k`` / ``top_p``: None takes the config's.

        ``steps``, ``eta``, ``sampler``, ``spacing`` and ``cuda_graphs`` are the diffusion prior's: accepted and
        ignored, so that ``UnCLIPPipeline`` and its ``GenerationSettings`` drive either prior unchanged (this
        one draws one token per kept component)."""
        check_prompts(text)
        self._check_text(text, "the captions' embeddings")
        if negative is not None:
            self._check_text(negative, "the negative captions' embeddings")
            if len(negative) != len(text):
                raise ValueError(f"{len(negative)} negative captions for {len(text)} captions")
        if isinstance(guidance_scale, bool) or not (math.isfinite(guidance_scale) and guidance_scale >= 0):
            raise ValueError(f"guidance scale must be a finite number >= 0, got {guidance_scale!r}")
        if num_candidates < 1:
            raise ValueError(f"num_candidates must be >= 1, got {num_candidates}")
        filters = dict(temperature=self.temperature if temperature is None else temperature,
                       top_k=self.top_k if top_k is None else top_k, top_p=self.top_p if top_p is None else top_p)
        check_sampling(**filters, vocab_size=self.num_buckets)
        guided = guidance_scale != 1
        with cpu_math_attention(self.embed_mean.device):
            ids = self._draw_ids(self._sampling_prefix(text, negative, num_candidates, guided, generator),
                                 guidance_scale if guided else None, filters, generator)
        candidates = self.dequantise(ids).view(len(text), num_candidates, -1)
        scores = torch.einsum("bnd,bd->bn", candidates, text.embed.float().to(candidates.device))
        return candidates[torch.arange(len(text), device=candidates.device), scores.argmax(dim=1)]

    def check_unconditional(self) -> None:
        """An error unless caption dropout trained the learned nulls."""
        check_trained_null("autoregressive prior", "cond_drop_prob", self.cond_drop_prob, 0.2)

    @torch.no_grad()
    def sample_unconditional(self, count: int, *, generator: torch.Generator | None = None,
                             temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
                             **diffusion_settings) -> torch.Tensor:
        """Unit-norm image embeddings [count, D] drawn after the learned nulls (caption, text embedding and
        dot-product token all dropped, as caption dropout trained them): the prior's own distribution of images.
        One candidate each (no text embedding to rank by), no guidance; ``diffusion_settings`` (steps, sampler,
        ...) are ignored as in ``sample``."""
        self.check_unconditional()
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ValueError(f"count must be a whole number >= 1, got {count!r}")
        device = self.embed_mean.device
        length = self.text_length
        drop = torch.ones(count, dtype=torch.bool, device=device)
        prefix = self._prefix(torch.zeros(count, self.embed_dim, device=device),
                              torch.zeros(count, length, self.token_dim, device=device),
                              torch.zeros(count, length, dtype=torch.bool, device=device),
                              torch.zeros(count, dtype=torch.long, device=device), drop)
        filters = dict(temperature=self.temperature if temperature is None else temperature,
                       top_k=self.top_k if top_k is None else top_k, top_p=self.top_p if top_p is None else top_p)
        check_sampling(**filters, vocab_size=self.num_buckets)
        with cpu_math_attention(device):
            ids = self._draw_ids(prefix, None, filters, generator)
        return self.dequantise(ids)

    def _draw_ids(self, prefix: torch.Tensor, guidance_scale: float | None, filters: dict, generator) -> torch.Tensor:
        """Bucket ids [R, kept] after the prefix rows [R or 2R, P, W] (2R: conditional then unconditional, mixed
        by ``guidance_scale``), one component per step through the key/value cache."""
        kept, cache = self.kept, self.transformer.new_cache()
        rows = prefix.shape[0] // 2 if guidance_scale is not None else prefix.shape[0]
        hidden = self.transformer(prefix, cache)[:, -1]
        ids = []
        for component in range(kept):
            logits = self.head(hidden).float()
            if guidance_scale is not None:
                logits = guided_logits(logits[:rows], logits[rows:], guidance_scale)
            token = draw(logits, **filters, generator=generator)
            ids.append(token)
            if component + 1 < kept:
                fed = token.repeat(2) if guidance_scale is not None else token
                hidden = self.transformer(self.bucket_embed(fed[:, None]).to(prefix.dtype), cache)[:, -1]
        return torch.stack(ids, dim=1)
