"""DALL-E's transformer (section 2.2): caption tokens then image tokens, modelled autoregressively; or, trained in
the other direction (``order="image_first"``), image tokens then caption tokens: a captioner.

The sequence is ``[t_0 ... t_{T-1} | i_0 ... i_{N-1}]``: ``text_length`` caption tokens (CLIP's start token
first, so it doubles as the beginning of the sequence) and ``image_length`` image tokens (a dVAE's grid in
raster order, or any other token sequence). Text and image tokens have their own embeddings and output
heads; a caption's padding positions take a learned embedding per position. The loss is the paper's
weighted sum of the text and image cross-entropies (1/8 and 7/8).

Captions arrive as the CLIP stage's token ids and are mapped to a compact vocabulary
(:class:`~unclip.autoregressive.vocabulary.TextVocabulary`) whose ids are part of the model's config.
Training drops a caption to all-padding (the null caption) with probability ``cond_drop_prob``, so that
sampling can use classifier-free guidance.

``order="image_first"`` models ``[i_0 ... i_{N-1} | t_1 ... t_{T-1}]``: the caption's start token is left out (the
image's end, at a fixed position, says where the caption starts), so the last image position predicts the first
word. :meth:`TextImageTransformer.sample_captions` draws captions for image tokens; ``sample`` (images for
captions) is the text-first model's. The same loss weights apply, so a captioner's config weights its text loss
as it needs (conf/dalle/captioner.yaml).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from unclip.autoregressive.sampling import check_sampling, draw, guided_logits
from unclip.autoregressive.transformer import CausalTransformer, KVCache
from unclip.autoregressive.vocabulary import NUM_SPECIAL, PAD, TextVocabulary
from unclip.configurable import configurable
from unclip.distributed import global_sum, world_size
from unclip.pipeline_inputs import check_trained_null

CLIP_END_OF_TEXT = 49407
ORDERS = ("text_first", "image_first")


@configurable
class TextImageTransformer(nn.Module):
    """p(image tokens | caption) and p(caption) in one decoder-only transformer.

    ``text_vocab`` lists the CLIP token ids the model knows (build it with
    ``TextVocabulary.from_token_rows(clip.tokenize(train_captions), end_id)``); ``text_end_id`` is the
    tokenizer's end-of-text id. ``order``: ``text_first`` (p(image | caption), DALL-E) or ``image_first``
    (p(caption | image), a captioner); saved in the config (a checkpoint from before it existed is text_first).
    """

    def __init__(
        self,
        *,
        text_vocab: list[int],
        text_length: int,
        image_vocab_size: int,
        image_length: int,
        text_end_id: int = CLIP_END_OF_TEXT,
        width: int = 256,
        depth: int = 4,
        heads: int = 4,
        dropout: float = 0.0,
        text_loss_weight: float = 1 / 8,
        cond_drop_prob: float = 0.1,
        order: str = "text_first",
    ):
        super().__init__()
        if order not in ORDERS:
            raise ValueError(f"order must be one of {ORDERS} (text_first: images from captions, image_first: a "
                             f"captioner), got {order!r}")
        if text_length < 2:
            raise ValueError(f"text_length must be >= 2 (start token and end token), got {text_length}")
        if image_length < 1 or image_vocab_size < 2:
            raise ValueError(f"need image_length >= 1 and image_vocab_size >= 2, got {image_length}, {image_vocab_size}")
        if not 0 <= text_loss_weight <= 1:
            raise ValueError(f"text_loss_weight must be in [0, 1] (the image loss gets the rest), got {text_loss_weight}")
        if not 0 <= cond_drop_prob < 1:
            raise ValueError(f"cond_drop_prob must be in [0, 1), got {cond_drop_prob}")
        self.vocabulary = TextVocabulary(text_vocab, text_end_id)
        self.text_length, self.image_length, self.image_vocab_size = text_length, image_length, image_vocab_size
        self.text_loss_weight, self.cond_drop_prob, self.order = text_loss_weight, cond_drop_prob, order
        self.text_embed = nn.Embedding(len(self.vocabulary), width)
        self.padding_embed = nn.Parameter(torch.randn(text_length, width) * 0.02)  # one per text position
        self.image_embed = nn.Embedding(image_vocab_size, width)
        self.transformer = CausalTransformer(
            width=width, depth=depth, heads=heads, max_length=text_length + image_length - 1, dropout=dropout
        )
        self.text_head = nn.Linear(width, len(self.vocabulary))
        self.image_head = nn.Linear(width, image_vocab_size)
        for embedding in (self.text_embed, self.image_embed):
            nn.init.normal_(embedding.weight, std=0.02)

    # -- inputs -----------------------------------------------------------------------------

    def _rebuild_arguments(self, given: dict) -> dict:
        """The vocabulary as plain ints (a config is JSON)."""
        return {**given, "text_vocab": [int(i) for i in given["text_vocab"]]}

    def text_ids(self, text_tokens: torch.Tensor) -> torch.Tensor:
        """CLIP token ids [B, L] -> compact ids [B, text_length] (truncated with a warning when too long)."""
        return self.vocabulary.encode(text_tokens, self.text_length)

    def _image_ids(self, image_tokens: torch.Tensor, length: int | None = None) -> torch.Tensor:
        """Image tokens [B, N] or [B, h, w] -> [B, N], checked against the length and the vocabulary."""
        ids = image_tokens.flatten(1) if image_tokens.ndim > 2 else image_tokens
        length = self.image_length if length is None else length
        if ids.ndim != 2 or ids.shape[1] != length or ids.dtype.is_floating_point:
            raise ValueError(
                f"image tokens must be integer ids [B, {length}] (or a grid of that many), got "
                f"{image_tokens.dtype} of shape {tuple(image_tokens.shape)}"
            )
        if ids.numel() and (ids.min() < 0 or ids.max() >= self.image_vocab_size):
            raise ValueError(
                f"image token ids must be in [0, {self.image_vocab_size}) (this model's image vocabulary), got "
                f"ids from {int(ids.min())} to {int(ids.max())}"
            )
        return ids

    def _embed_text(self, text_ids: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Compact ids [B, S] at text positions ``start ... start + S - 1`` -> [B, S, W]; padding positions get
        their own learned embedding."""
        padding = (text_ids == PAD)[..., None]
        return torch.where(padding, self.padding_embed[start:start + text_ids.shape[1]], self.text_embed(text_ids))

    def require_order(self, order: str, use: str) -> None:
        """A ValueError naming this model's order when ``use`` needs the other one."""
        if self.order != order:
            what = ("a captioner: it reads image tokens and writes captions" if self.order == "image_first"
                    else "it draws images for captions")
            config = "captioner" if order == "image_first" else "transformer"
            raise ValueError(f"{use} needs a transformer of order={order}, but this one's is {self.order} ({what}); "
                             f"train one with `python train/dalle.py dalle={config}`")

    def _null_text(self, batch: int, device) -> torch.Tensor:
        return torch.full((batch, self.text_length), PAD, dtype=torch.long, device=device)

    # -- training ---------------------------------------------------------------------------
    def logits(self, text_ids: torch.Tensor, image_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Compact text ids [B, T] and image ids [B, N] -> the logits predicting text tokens 1..T-1
        [B, T-1, V_text] and image tokens 0..N-1 [B, N, V_image] (teacher forcing); image_first: image tokens
        1..N-1 [B, N-1, V_image] (the first has nothing before it)."""
        if self.order == "image_first":
            sequence = torch.cat([self.image_embed(image_ids), self._embed_text(text_ids[:, 1:-1], start=1)], dim=1)
            hidden = self.transformer(sequence)
            split = image_ids.shape[1] - 1
            return self.text_head(hidden[:, split:]), self.image_head(hidden[:, :split])
        sequence = torch.cat([self._embed_text(text_ids), self.image_embed(image_ids[:, :-1])], dim=1)
        hidden = self.transformer(sequence)
        split = self.text_length - 1
        return self.text_head(hidden[:, :split]), self.image_head(hidden[:, split:])

    def training_loss(
        self, text_tokens: torch.Tensor, image_tokens: torch.Tensor, *, drop: torch.Tensor | None = None
    ) -> dict:
        """CLIP token ids [B, L] and image tokens [B, N] (or [B, h, w]) -> ``loss`` (weighted), ``text_loss``,
        ``image_loss``. ``drop`` [B] (bool) replaces the random choice of captions dropped to the null caption;
        a dropped caption has no text loss."""
        text_ids = self.text_ids(text_tokens)
        image_ids = self._image_ids(image_tokens.to(text_ids.device))
        if text_ids.shape[0] != image_ids.shape[0]:
            raise ValueError(f"{text_ids.shape[0]} captions for {image_ids.shape[0]} token sequences")
        if drop is None:
            drop = torch.rand(text_ids.shape[0], device=text_ids.device) < self.cond_drop_prob
        text_ids = torch.where(drop[:, None], self._null_text(len(drop), text_ids.device), text_ids)
        text_logits, image_logits = self.logits(text_ids, image_ids)
        targets = image_ids[:, image_ids.shape[1] - image_logits.shape[1]:]  # image_first: all but the first
        image_loss = (F.cross_entropy(image_logits.flatten(0, 1).float(), targets.flatten()) if targets.numel()
                      else image_logits.sum() * 0)
        # The kept captions' mean of their tokens' mean cross-entropy (a dropped caption has no text loss), over the
        # whole data-parallel batch: each process's sum over the global count, times the processes DDP averages over.
        per_token = F.cross_entropy(text_logits.flatten(0, 1).float(), text_ids[:, 1:].flatten(), reduction="none")
        kept = (~drop).float()
        kept_sum = (per_token.view(len(drop), -1).mean(dim=1) * kept).sum()
        text_loss = kept_sum * world_size() / global_sum(kept.sum()).clamp_min(1)
        loss = self.text_loss_weight * text_loss + (1 - self.text_loss_weight) * image_loss
        return {"loss": loss, "text_loss": text_loss.detach(), "image_loss": image_loss.detach()}

    # -- sampling ---------------------------------------------------------------------------
    @torch.no_grad()
    def sample(
        self,
        text_tokens: torch.Tensor,
        *,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        guidance_scale: float | None = None,
        prime: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        use_cache: bool = True,
    ) -> torch.Tensor:
        """Image tokens [B, N] for CLIP token ids [B, L].

        ``guidance_scale`` (None: off) mixes the logits with those of the null caption (classifier-free
        guidance; 1 gives the conditional model). ``prime`` [B, P] fixes the first P image tokens (image
        completion). ``use_cache=False`` recomputes the whole sequence at every step (same tokens, slower).
        """
        self.require_order("text_first", "sampling images for captions")
        return self._sample(self.text_ids(text_tokens), temperature=temperature, top_k=top_k, top_p=top_p,
                            guidance_scale=guidance_scale, prime=prime, generator=generator, use_cache=use_cache)

    @torch.no_grad()
    def sample_unconditional(self, count: int, *, temperature: float = 1.0, top_k: int | None = None,
                             top_p: float | None = None, generator: torch.Generator | None = None,
                             use_cache: bool = True) -> torch.Tensor:
        """Image tokens [count, N] drawn after the null caption (all padding, what caption dropout,
        ``cond_drop_prob``, trained): the model's own distribution of images. No guidance: both of its branches
        would be the null caption."""
        self.require_order("text_first", "sampling images without a caption")
        self.check_unconditional()
        null = self._null_text(count, self.padding_embed.device)
        return self._sample(null, temperature=temperature, top_k=top_k, top_p=top_p, guidance_scale=None,
                            prime=None, generator=generator, use_cache=use_cache)

    def check_unconditional(self) -> None:
        """An error unless caption dropout trained the null caption."""
        check_trained_null("transformer", "cond_drop_prob", self.cond_drop_prob, 0.1)

    def _sample(self, text_ids: torch.Tensor, *, temperature, top_k, top_p, guidance_scale, prime, generator,
                use_cache) -> torch.Tensor:
        """``sample`` from compact text ids [B, text_length]."""
        check_sampling(temperature=temperature, top_k=top_k, top_p=top_p, vocab_size=self.image_vocab_size)
        batch, device = text_ids.shape[0], text_ids.device
        if batch == 0:
            raise ValueError("got zero captions to sample for; expected at least one")
        image_ids = torch.zeros(batch, 0, dtype=torch.long, device=device)
        if prime is not None:
            prime_length = prime.shape[1] if prime.ndim == 2 else -1
            if not 0 <= prime_length < self.image_length or prime.shape[0] != batch:
                raise ValueError(
                    f"prime must be image tokens [{batch}, P] with P < {self.image_length}, got shape {tuple(prime.shape)}"
                )
            image_ids = self._image_ids(prime.to(device), prime_length)
        guided = guidance_scale is not None
        rows_text = torch.cat([text_ids, self._null_text(batch, device)]) if guided else text_ids
        rows_image = image_ids.repeat(2, 1) if guided else image_ids
        prefix = torch.cat([self._embed_text(rows_text), self.image_embed(rows_image)], dim=1)
        next_logits = self._steps(prefix, lambda token: self.image_embed(token[:, None]), self.image_head, use_cache)
        logits = next_logits(None)
        while True:
            if guided:
                logits = guided_logits(logits[:batch], logits[batch:], guidance_scale)
            token = draw(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
            image_ids = torch.cat([image_ids, token[:, None]], dim=1)
            if image_ids.shape[1] == self.image_length:
                return image_ids
            logits = next_logits(token.repeat(2) if guided else token)

    @torch.no_grad()
    def sample_captions(
        self,
        image_tokens: torch.Tensor,
        *,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        generator: torch.Generator | None = None,
        use_cache: bool = True,
    ) -> torch.Tensor:
        """A captioner's captions for image tokens [B, N] (or [B, h, w]): the tokenizer's ids [B, S] after the start
        token (S <= text_length - 1), each row up to its end token, then zeros, for the CLIP stage's ``decode``.
        Sampling stops once every row has drawn its end token (or at the text length); the unknown-word and
        padding ids are never drawn."""
        self.require_order("image_first", "sampling captions for images")
        check_sampling(temperature=temperature, top_k=top_k, top_p=top_p, vocab_size=len(self.vocabulary))
        image_ids = self._image_ids(image_tokens)
        if image_ids.shape[0] == 0:
            raise ValueError("got zero images to caption; expected at least one")
        position = 0  # the text position of the newest token fed

        def embed(token: torch.Tensor) -> torch.Tensor:
            nonlocal position
            position += 1
            return self._embed_text(token[:, None], start=position)

        next_logits = self._steps(self.image_embed(image_ids), embed, self.text_head, use_cache)
        end = self.vocabulary.compact_id(self.vocabulary.end_id)
        finished = torch.zeros(len(image_ids), dtype=torch.bool, device=image_ids.device)
        tokens, logits = [], next_logits(None)
        while True:
            logits[:, :NUM_SPECIAL] = float("-inf")  # never an unknown word or padding before the end
            token = draw(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
            token = token.masked_fill(finished, PAD)
            tokens.append(token)
            finished |= token == end
            if bool(finished.all()) or len(tokens) == self.text_length - 1:
                return self.vocabulary.decode(torch.stack(tokens, dim=1))
            logits = next_logits(token)

    def _steps(self, prefix: torch.Tensor, embed, head: nn.Module, use_cache: bool):
        """For the embedded prefix [R, P, W]: a function from the newest token [R] (None at first) to the logits
        [R, V] of the next one (``embed``: token [R] -> [R, 1, W]; ``head``: the output head). With the cache it
        feeds the transformer only the new positions; without it, the whole sequence again (the same logits)."""
        cache: KVCache | None = self.transformer.new_cache() if use_cache else None
        sequence = prefix

        def next_logits(token: torch.Tensor | None) -> torch.Tensor:
            nonlocal sequence
            new = prefix if token is None else embed(token)
            if cache is None:
                sequence = new if token is None else torch.cat([sequence, new], dim=1)
                return head(self.transformer(sequence)[:, -1]).float()
            return head(self.transformer(new, cache)[:, -1]).float()

        return next_logits
