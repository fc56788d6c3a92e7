"""The diffusion prior's network (DALL-E 2, section 2.2).

A decoder-only, pre-LayerNorm transformer with a causal mask over, in this order::

    [caption token states (T) | text embed | timestep | noised image embed | query]

The output at the final learned query position predicts the clean image embedding. The network is a
plain ``nn.Module``: noise schedules, the loss and the samplers live in ``unclip.diffusion``.

Classifier-free guidance drops the text to learned nulls per row (``drop_text``): the text embedding
slot is replaced by a learned null vector and every caption token of that row is masked out as a key.
The timestep and the noised image embedding are never dropped, so a guided step is one batched call
with the batch doubled as ``drop_text = [False] * B + [True] * B``.

Scale conventions (see ``unclip.embedding``): the text embedding arrives unit-norm and the caption
token states arrive as the text encoder's final-LayerNorm outputs; both pass through a LayerNorm
before their projection, so the network does not depend on how a caller scales them. The noised image
embedding is projected as is (its scale carries the noise level).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from unclip.activation_checkpointing import Checkpointed
from unclip.attention_kernels import cpu_math_attention
from unclip.configurable import configurable
from unclip.diffusion.timesteps import timestep_embedding

NUM_SPECIAL = 4  # text embed, timestep, noised image embed, query


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kwargs) -> torch.Tensor:
    """``F.scaled_dot_product_attention``, on the CPU in bf16/fp16 with its math kernel.

    At these short sequences the CPU flash kernel's reduced-precision backward is ~1.7x slower than
    the math kernel (torch 2.14, measured: ~12% of a training step); elsewhere SDPA picks its kernel.
    """
    with cpu_math_attention(q.device, when=q.dtype in (torch.bfloat16, torch.float16)):
        return F.scaled_dot_product_attention(q, k, v, **kwargs)


class CausalSelfAttention(nn.Module):
    def __init__(self, width: int, heads: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.width = width
        self.dropout = dropout
        self.qkv = nn.Linear(width, 3 * width)  # fused q, k, v projection
        self.out = nn.Linear(width, width)
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None, final_only: bool) -> torch.Tensor:
        """x [B, S, W]; attn_mask [B, 1, S, S] bool (True = may attend) or None (plain causal).

        With ``final_only`` only the last position is a query: returns [B, 1, W] instead of [B, S, W].
        """
        dropout_p = self.dropout if self.training else 0.0
        if final_only:
            w_q, w_kv = self.qkv.weight.split([self.width, 2 * self.width])
            b_q, b_kv = self.qkv.bias.split([self.width, 2 * self.width])
            q = rearrange(F.linear(x[:, -1:], w_q, b_q), "b s (h d) -> b h s d", h=self.heads)
            k, v = rearrange(F.linear(x, w_kv, b_kv), "b s (two h d) -> two b h s d", two=2, h=self.heads)
            # the last query sees every key that is not padding; a causal flag would mis-align (top-left)
            mask = None if attn_mask is None else attn_mask[:, :, -1:, :]
            attended = attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
        else:
            q, k, v = rearrange(self.qkv(x), "b s (three h d) -> three b h s d", three=3, h=self.heads)
            attended = attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=attn_mask is None)
        return self.resid_dropout(self.out(rearrange(attended, "b h s d -> b s (h d)")))


    def forward_prefix(self, x: torch.Tensor, attn_mask: torch.Tensor | None):
        """Self-attention over the prefix x [B, P, W]; returns the output and its keys and values [B, h, P, d]."""
        q, k, v = rearrange(self.qkv(x), "b s (three h d) -> three b h s d", three=3, h=self.heads)
        attended = attention(q, k, v, attn_mask=attn_mask, is_causal=attn_mask is None)
        return self.out(rearrange(attended, "b h s d -> b s (h d)")), k, v

    def forward_after(self, x: torch.Tensor, past_k: torch.Tensor, past_v: torch.Tensor,
                      attn_mask: torch.Tensor, final_only: bool) -> torch.Tensor:
        """The positions after a cached prefix: x [B, N, W] attends to the prefix's keys and values and
        causally to itself; ``attn_mask`` [B, 1, N, P + N] bool. ``final_only``: the last position only."""
        q, k, v = rearrange(self.qkv(x), "b s (three h d) -> three b h s d", three=3, h=self.heads)
        k, v = torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)
        if final_only:
            q, attn_mask = q[:, :, -1:], attn_mask[:, :, -1:]
        attended = attention(q, k, v, attn_mask=attn_mask)
        return self.out(rearrange(attended, "b h s d -> b s (h d)"))


class Block(Checkpointed, nn.Module):
    """Pre-LN transformer block: x + attn(ln(x)), then x + mlp(ln(x)). Its full-sequence forward (training) may
    checkpoint (``unclip.activation_checkpointing``); the cached sampling paths never do."""

    def __init__(self, width: int, heads: int, dropout: float, ff_mult: int):
        super().__init__()
        self.norm_attn = nn.LayerNorm(width)
        self.attn = CausalSelfAttention(width, heads, dropout)
        self.norm_ff = nn.LayerNorm(width)
        self.ff = nn.Sequential(
            nn.Linear(width, ff_mult * width),
            nn.GELU(),
            nn.Linear(ff_mult * width, width),
            nn.Dropout(dropout),
        )

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None, final_only: bool = False) -> torch.Tensor:
        return self.checkpointed(self._forward, x, attn_mask, final_only)

    def _forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None, final_only: bool) -> torch.Tensor:
        attended = self.attn(self.norm_attn(x), attn_mask, final_only)
        x = (x[:, -1:] if final_only else x) + attended
        return x + self.ff(self.norm_ff(x))

    def forward_prefix(self, x: torch.Tensor, attn_mask: torch.Tensor | None):
        attended, k, v = self.attn.forward_prefix(self.norm_attn(x), attn_mask)
        x = x + attended
        return x + self.ff(self.norm_ff(x)), k, v

    def forward_after(self, x, past_k, past_v, attn_mask, final_only: bool = False) -> torch.Tensor:
        attended = self.attn.forward_after(self.norm_attn(x), past_k, past_v, attn_mask, final_only)
        x = (x[:, -1:] if final_only else x) + attended
        return x + self.ff(self.norm_ff(x))


@dataclass
class PrefixCache:
    """Every block's keys and values [B, h, P, d] for the prefix [caption tokens | text embed], which
    does not depend on the timestep or the noised embedding: computed once, reused at every sampling step.
    ``key_valid`` [B, P] bool marks the prefix keys that may be attended to (None: all)."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    key_valid: torch.Tensor | None


@configurable
class PriorTransformer(nn.Module):
    """Predicts the clean CLIP image embedding from a noised one, the timestep and the caption.

    Shapes: noised_image_embed [B, D], t [B], text_embed [B, D], token_embeds [B, T, Dt] with
    T <= text_length, mask [B, T] bool (True at real tokens), drop_text [B] bool -> [B, D].
    """

    def __init__(
        self,
        *,
        embed_dim: int,
        token_dim: int,
        text_length: int,
        width: int = 512,
        depth: int = 6,
        heads: int = 8,
        dropout: float = 0.0,
        ff_mult: int = 4,
        use_caption_tokens: bool = True,
    ):
        super().__init__()
        for name, value in (("embed_dim", embed_dim), ("token_dim", token_dim), ("text_length", text_length),
                            ("width", width), ("depth", depth), ("heads", heads), ("ff_mult", ff_mult)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"PriorTransformer {name}={value!r}: expected a positive integer")
        if width % heads:
            raise ValueError(f"PriorTransformer width={width} must be divisible by heads={heads}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"PriorTransformer dropout={dropout!r}: expected a float in [0, 1)")
        self.embed_dim, self.token_dim, self.text_length = embed_dim, token_dim, text_length
        self.width, self.use_caption_tokens = width, use_caption_tokens

        if use_caption_tokens:
            self.token_proj = nn.Sequential(nn.LayerNorm(token_dim), nn.Linear(token_dim, width))
        self.text_proj = nn.Sequential(nn.LayerNorm(embed_dim), nn.Linear(embed_dim, width))
        self.time_mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.image_proj = nn.Linear(embed_dim, width)
        self.null_text = nn.Parameter(torch.zeros(width))  # replaces the text embedding under drop_text
        self.query = nn.Parameter(torch.zeros(width))
        # positions: caption tokens take 0..T-1, the four special slots always the last four
        num_positions = (text_length if use_caption_tokens else 0) + NUM_SPECIAL
        self.pos_embed = nn.Parameter(torch.zeros(num_positions, width))
        self.blocks = nn.ModuleList(Block(width, heads, dropout, ff_mult) for _ in range(depth))
        self.norm_out = nn.LayerNorm(width)
        self.to_out = nn.Linear(width, embed_dim)
        self._init_weights(depth)

    def _init_weights(self, depth: int) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
        for block in self.blocks:  # GPT-2: scale the residual-stream projections by depth
            nn.init.normal_(block.attn.out.weight, std=0.02 / math.sqrt(2 * depth))
            nn.init.normal_(block.ff[2].weight, std=0.02 / math.sqrt(2 * depth))
        for parameter in (self.null_text, self.query, self.pos_embed):
            nn.init.normal_(parameter, std=0.02)

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def forward(
        self,
        noised_image_embed: torch.Tensor,
        t: torch.Tensor,
        text_embed: torch.Tensor,
        token_embeds: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        drop_text: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predicted clean image embedding [B, D] (in the space of ``noised_image_embed``).

        ``token_embeds=None`` (or ``use_caption_tokens=False``, which ignores them) conditions on the
        text embedding alone; ``mask=None`` treats every given token as real.
        """
        x, attn_mask = self._embed(noised_image_embed, t, text_embed, token_embeds, mask, drop_text)
        for block in self.blocks[:-1]:
            x = block(x, attn_mask)
        x = self.blocks[-1](x, attn_mask, final_only=True)  # only the query's output is used
        return self.to_out(self.norm_out(x[:, 0]))

    @torch.no_grad()
    def encode_prefix(self, text_embed, token_embeds=None, mask=None, drop_text=None) -> PrefixCache:
        """Run the prefix [caption tokens | text embed] once; see :meth:`forward_with_prefix`."""
        probe = torch.zeros(text_embed.shape[0], self.embed_dim, device=text_embed.device, dtype=text_embed.dtype)
        t = torch.zeros(text_embed.shape[0], device=text_embed.device, dtype=torch.long)
        x, attn_mask = self._embed(probe, t, text_embed, token_embeds, mask, drop_text)
        prefix = x.shape[1] - (NUM_SPECIAL - 1)  # caption tokens + text embed
        x = x[:, :prefix]
        prefix_mask = None if attn_mask is None else attn_mask[:, :, :prefix, :prefix]
        keys, values = [], []
        for block in self.blocks:
            x, k, v = block.forward_prefix(x, prefix_mask)
            keys.append(k)
            values.append(v)
        key_valid = None if attn_mask is None else attn_mask[:, 0, -1, :prefix]  # the query's row: valid keys
        return PrefixCache(keys, values, key_valid)

    def forward_with_prefix(self, noised_image_embed: torch.Tensor, t: torch.Tensor, prefix: PrefixCache) -> torch.Tensor:
        """The same as :meth:`forward` with the conditioning of ``prefix`` (from :meth:`encode_prefix`),
        computing only the timestep, noised embedding and query positions: 3 of up to 81 per step."""
        batch, device = noised_image_embed.shape[0], noised_image_embed.device
        x = self._step_tokens(noised_image_embed, t) + self.pos_embed[-(NUM_SPECIAL - 1):]
        new = NUM_SPECIAL - 1
        past = prefix.keys[0].shape[2]
        key_valid = prefix.key_valid
        if key_valid is None:
            key_valid = torch.ones(batch, past, dtype=torch.bool, device=device)
        causal = torch.ones(new, new, dtype=torch.bool, device=device).tril()
        attn_mask = torch.cat([key_valid[:, None, :].expand(batch, new, past), causal.expand(batch, new, new)], dim=2)
        attn_mask = attn_mask[:, None]  # [B, 1, new, past + new]
        for i, block in enumerate(self.blocks):
            last = i == len(self.blocks) - 1
            x = block.forward_after(x, prefix.keys[i], prefix.values[i], attn_mask, final_only=last)
        return self.to_out(self.norm_out(x[:, 0]))

    def hidden_states(self, noised_image_embed, t, text_embed, token_embeds=None, mask=None, drop_text=None):
        """The last block's output at every position [B, S, W], S = kept tokens + 4 (for inspection).

        The final four positions are text embed, timestep, noised image embed, query. Trailing caption
        positions that are padding in every row are trimmed (they cannot affect any other position).
        """
        x, attn_mask = self._embed(noised_image_embed, t, text_embed, token_embeds, mask, drop_text)
        for block in self.blocks:
            x = block(x, attn_mask)
        return x

    def _step_tokens(self, noised_image_embed: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The positions that change at every sampling step: timestep, noised image embed, query [B, 3, W]."""
        dtype = self.pos_embed.dtype
        return torch.stack(
            [
                self.time_mlp(timestep_embedding(t, self.width).to(dtype)).to(dtype),
                self.image_proj(noised_image_embed).to(dtype),
                self.query.expand(noised_image_embed.shape[0], -1),
            ],
            dim=1,
        )

    def _embed(self, noised_image_embed, t, text_embed, token_embeds, mask, drop_text):
        """The input sequence [B, S, W] and its attention mask ([B, 1, S, S] bool, or None = causal)."""
        self._check_inputs(noised_image_embed, t, text_embed, token_embeds, mask, drop_text)
        batch, device = noised_image_embed.shape[0], noised_image_embed.device
        dtype = self.pos_embed.dtype
        text = self.text_proj(text_embed)
        if drop_text is not None:
            text = torch.where(drop_text[:, None], self.null_text.to(text.dtype), text)
        special = torch.cat([text.to(dtype)[:, None], self._step_tokens(noised_image_embed, t)], dim=1)  # [B, 4, W]
        positions_special = self.pos_embed[-NUM_SPECIAL:]
        if not self.use_caption_tokens or token_embeds is None:
            return special + positions_special, None

        valid = torch.ones(token_embeds.shape[:2], dtype=torch.bool, device=device) if mask is None else mask
        if drop_text is not None:
            valid = valid & ~drop_text[:, None]
        # trim trailing positions that are padding in every row: exact, and CLIP pads to 77 tokens
        any_valid = valid.any(dim=0).nonzero()
        kept = int(any_valid[-1]) + 1 if len(any_valid) else 0
        valid = valid[:, :kept]
        tokens = self.token_proj(token_embeds[:, :kept]).to(dtype)  # [B, kept, W]
        tokens = torch.where(valid[..., None], tokens, torch.zeros((), dtype=dtype, device=device))
        x = torch.cat([tokens + self.pos_embed[:kept], special + positions_special], dim=1)
        if bool(valid.all()):
            return x, None  # nothing to hide: the plain causal kernel path
        seq = kept + NUM_SPECIAL
        key_valid = torch.cat([valid, torch.ones(batch, NUM_SPECIAL, dtype=torch.bool, device=device)], dim=1)
        causal = torch.ones(seq, seq, dtype=torch.bool, device=device).tril()
        # each position may always attend to itself, so a row of padding is never fully masked (NaN)
        attn_mask = causal & (key_valid[:, None, :] | torch.eye(seq, dtype=torch.bool, device=device))
        return x, rearrange(attn_mask, "b q k -> b 1 q k")

    def _check_inputs(self, noised_image_embed, t, text_embed, token_embeds, mask, drop_text) -> None:
        def shape(tensor):
            return list(tensor.shape)

        if noised_image_embed.ndim != 2 or noised_image_embed.shape[1] != self.embed_dim:
            raise ValueError(
                f"noised_image_embed has shape {shape(noised_image_embed)}; expected [B, {self.embed_dim}]"
            )
        batch = noised_image_embed.shape[0]
        if batch == 0:
            raise ValueError("empty batch: noised_image_embed has shape [0, D]; expected at least one row")
        if text_embed.shape != (batch, self.embed_dim):
            raise ValueError(f"text_embed has shape {shape(text_embed)}; expected [{batch}, {self.embed_dim}]")
        if t.shape != (batch,):
            raise ValueError(f"t has shape {shape(t)}; expected [{batch}] (one timestep per row)")
        if drop_text is not None and (drop_text.shape != (batch,) or drop_text.dtype != torch.bool):
            raise ValueError(
                f"drop_text has shape {shape(drop_text)} and dtype {drop_text.dtype}; expected [{batch}] bool"
            )
        if not self.use_caption_tokens or token_embeds is None:
            if mask is not None and token_embeds is None:
                raise ValueError("mask was given without token_embeds; pass both or neither")
            return
        if token_embeds.ndim != 3 or token_embeds.shape[0] != batch or token_embeds.shape[2] != self.token_dim:
            raise ValueError(
                f"token_embeds has shape {shape(token_embeds)}; expected [{batch}, T, {self.token_dim}] "
                f"with T <= {self.text_length}"
            )
        if token_embeds.shape[1] > self.text_length:
            raise ValueError(
                f"token_embeds has {token_embeds.shape[1]} tokens (shape {shape(token_embeds)}); this prior "
                f"was built for text_length={self.text_length}"
            )
        if mask is not None and (mask.shape != token_embeds.shape[:2] or mask.dtype != torch.bool):
            raise ValueError(
                f"mask has shape {shape(mask)} and dtype {mask.dtype}; expected "
                f"{shape(token_embeds)[:2]} bool (True at real tokens)"
            )
